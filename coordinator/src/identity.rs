//! The coordinator's own X25519 key, the other half of every agent's key possession proof
//! ([`isthmus_api::proof`]). It lives in a Secret beside the Lease so every replica, and a
//! restarted one, challenges with the same key: a new key would void every answer.

use std::fmt;

use anyhow::Context;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::ByteString;
use kube::api::{Api, PostParams};
use kube::Client;

/// The Secret's key holding the 32 raw bytes of the private key.
pub const SECRET_KEY: &str = "private.key";

/// The coordinator's key pair. `Debug` prints only the public half.
#[derive(Clone)]
pub struct CoordinatorKey {
    private: [u8; 32],
    public: String,
}

impl CoordinatorKey {
    pub fn from_private(private: [u8; 32]) -> Self {
        let public = isthmus_api::proof::public_key_base64(&private);
        Self { private, public }
    }

    pub fn generate() -> Self {
        Self::from_private(isthmus_api::proof::generate_private())
    }

    pub fn private(&self) -> &[u8; 32] {
        &self.private
    }

    /// Base64, as `status.keyChallenge.coordinatorKey` carries it.
    pub fn public(&self) -> &str {
        &self.public
    }
}

impl fmt::Debug for CoordinatorKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CoordinatorKey(public {})", self.public)
    }
}

fn from_secret(secret: &Secret) -> anyhow::Result<CoordinatorKey> {
    let bytes = secret
        .data
        .as_ref()
        .and_then(|d| d.get(SECRET_KEY))
        .with_context(|| format!("the Secret has no {SECRET_KEY:?} entry"))?;
    let private: [u8; 32] =
        bytes.0.clone().try_into().map_err(|b: Vec<u8>| {
            anyhow::anyhow!("{SECRET_KEY:?} holds {} bytes, not 32", b.len())
        })?;
    Ok(CoordinatorKey::from_private(private))
}

/// Reads the key from Secret `namespace/name`, creating it with a fresh key when it does
/// not exist. Two replicas starting at once: one create wins, the other reads its key.
pub async fn load_or_create(
    client: Client,
    namespace: &str,
    name: &str,
) -> anyhow::Result<CoordinatorKey> {
    let api: Api<Secret> = Api::namespaced(client, namespace);
    let what = || format!("the coordinator key Secret {namespace}/{name}");
    if let Some(secret) = api.get_opt(name).await.with_context(what)? {
        return from_secret(&secret).with_context(what);
    }
    let key = CoordinatorKey::generate();
    let secret = Secret {
        metadata: kube::api::ObjectMeta {
            name: Some(name.into()),
            ..Default::default()
        },
        type_: Some("Opaque".into()),
        data: Some([(SECRET_KEY.to_string(), ByteString(key.private.to_vec()))].into()),
        ..Default::default()
    };
    match api.create(&PostParams::default(), &secret).await {
        Ok(_) => {
            tracing::info!(secret = %format!("{namespace}/{name}"), public_key = key.public(), "created the coordinator key");
            Ok(key)
        }
        Err(kube::Error::Api(e)) if e.code == 409 => {
            let secret = api.get(name).await.with_context(what)?;
            from_secret(&secret).with_context(what)
        }
        Err(e) => Err(e).with_context(|| format!("creating {}", what())),
    }
}
