//! Publishing a WireGuardPeer the way an agent does, without an agent: the spec with the
//! agent's own `publish`, then the answer to the coordinator's key challenge
//! (`isthmus_api::proof`), so tests with emulated nodes are admitted like real ones.

use std::time::{Duration, Instant};

use isthmus_api::{WireGuardPeer, WireGuardPeerSpec};
use kube::api::Api;

/// An emulated node's key pair: the spec's public key comes from this private key.
#[derive(Clone, Copy)]
pub struct NodeKey(pub [u8; 32]);

impl NodeKey {
    pub fn public(&self) -> String {
        isthmus_api::proof::public_key_base64(&self.0)
    }
}

/// Applies `spec` (its `publicKey` replaced by `key`'s) as the agent of `name` would.
pub async fn apply(
    api: &Api<WireGuardPeer>,
    name: &str,
    key: NodeKey,
    spec: &WireGuardPeerSpec,
    proof: Option<String>,
) -> anyhow::Result<()> {
    let spec = WireGuardPeerSpec {
        public_key: key.public(),
        key_proof: proof,
        ..spec.clone()
    };
    isthmus_agent::control::publish::publish(api, name, &spec).await
}

/// Our answer to the challenge `name`'s status carries, if it carries one.
pub async fn answer(
    api: &Api<WireGuardPeer>,
    name: &str,
    key: NodeKey,
) -> anyhow::Result<Option<String>> {
    let Some(peer) = api.get_opt(name).await? else {
        return Ok(None);
    };
    Ok(peer
        .status
        .and_then(|s| s.key_challenge)
        .and_then(|c| isthmus_api::proof::answer(&key.0, &c.coordinator_key, name, &c.nonce)))
}

/// Publishes `spec`, waits (up to `timeout`) for the coordinator's challenge and publishes
/// again with the answer. Errors if no challenge came: no coordinator serves the cluster.
pub async fn publish_and_prove(
    api: &Api<WireGuardPeer>,
    name: &str,
    key: NodeKey,
    spec: &WireGuardPeerSpec,
    timeout: Duration,
) -> anyhow::Result<()> {
    apply(api, name, key, spec, None).await?;
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(proof) = answer(api, name, key).await? {
            return apply(api, name, key, spec, Some(proof)).await;
        }
        if Instant::now() > deadline {
            anyhow::bail!("no key challenge on WireGuardPeer {name} within {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Answers `name`'s key challenge whenever one appears (a coordinator may not run yet),
/// as the agent's loop would; the task ends once it answered, or with the test's runtime.
pub fn prove_in_background(
    api: Api<WireGuardPeer>,
    name: String,
    key: NodeKey,
    spec: WireGuardPeerSpec,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            if let Ok(Some(proof)) = answer(&api, &name, key).await {
                if apply(&api, &name, key, &spec, Some(proof)).await.is_ok() {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
}
