//! A real `kube-apiserver` with `etcd` on loopback, one pair per test (WireGuardPeers and
//! Nodes are cluster-scoped, so tests sharing a server would see each other's objects).
//! Binaries come from `scripts/build-kube.sh` (`.cache/kube/bin`, or `$KUBE_APISERVER_BIN`,
//! `$ETCD_BIN`, `$KUBECTL_BIN`). Everything started is stopped by PID on drop.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context};
use k8s_openapi::api::authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{Pod, ServiceAccount};
use kube::api::{Api, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};
use tempfile::TempDir;

use crate::daemon::{wait_until, Daemon};
use crate::ports::loopback_port;

/// Namespace the deploy/ manifests install into.
pub const NAMESPACE: &str = "isthmus-system";

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

pub fn kube_bin(name: &str, env: &str) -> PathBuf {
    let path = std::env::var_os(env)
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join(".cache/kube/bin").join(name));
    assert!(
        path.exists(),
        "{} is missing: run `bash scripts/build-kube.sh` (make test does)",
        path.display()
    );
    path
}

fn openssl(dir: &Path, args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .context("running openssl")?;
    if !out.status.success() {
        bail!(
            "openssl {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// How [`KubeRig::start_with`] sets the API server up.
#[derive(Clone, Debug, Default)]
pub struct RigOptions {
    /// More subject alternative names for the serving certificate (`IP:…` or `DNS:…`).
    pub extra_sans: Vec<String>,
    /// More API server flags; a flag given again overrides the rig's own. `{dir}` stands for
    /// the rig's directory (CA, keys, logs).
    pub apiserver_args: Vec<String>,
    /// Client certificates to issue before the API server starts: (file name without
    /// extension, subject such as `/O=system:masters/CN=someone`), into the rig's directory.
    pub client_certs: Vec<(String, String)>,
    /// Install the CRD, RBAC and admission policy from deploy/ before returning.
    pub install_isthmus: bool,
    /// An etcd that is not the rig's own ([`SharedEtcd::url`]): the rig starts none and keeps
    /// its objects under a prefix of its own, so many API servers fit on one machine (an
    /// etcd each would double the processes for nothing the tests look at).
    pub etcd_servers: Option<String>,
}

/// One etcd for many rigs (see [`RigOptions::etcd_servers`]), stopped on drop.
pub struct SharedEtcd {
    _etcd: Daemon,
    port: u16,
    pub dir: TempDir,
}

impl SharedEtcd {
    pub fn start() -> anyhow::Result<SharedEtcd> {
        let dir = tempfile::Builder::new().prefix("isthmus-etcd").tempdir()?;
        let port = loopback_port()?;
        let etcd = spawn_etcd(dir.path(), port, loopback_port()?)?;
        Ok(SharedEtcd {
            _etcd: etcd,
            port,
            dir,
        })
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

/// etcd with its data in `dir`/etcd on loopback ports, logging into `dir`.
fn spawn_etcd(dir: &Path, port: u16, peer_port: u16) -> anyhow::Result<Daemon> {
    let client_url = format!("http://127.0.0.1:{port}");
    let peer_url = format!("http://127.0.0.1:{peer_port}");
    Daemon::spawn_host(
        &kube_bin("etcd", "ETCD_BIN"),
        &[
            "--name",
            "rig",
            "--data-dir",
            &dir.join("etcd").display().to_string(),
            "--listen-client-urls",
            &client_url,
            "--advertise-client-urls",
            &client_url,
            "--listen-peer-urls",
            &peer_url,
            "--initial-advertise-peer-urls",
            &peer_url,
            "--initial-cluster",
            &format!("rig={peer_url}"),
            "--log-level",
            "warn",
        ],
        &[],
        // A log per start: a restart keeps what the previous run said.
        dir.join(format!("etcd-{}.log", crate::unique_name())),
    )
}

/// A key and certificate `<name>.key`/`.crt` in `dir` for `subject`, signed by the CA there
/// with the X.509 extensions `ext` (e.g. `extendedKeyUsage=clientAuth`).
fn issue(dir: &Path, name: &str, subject: &str, ext: &str) -> anyhow::Result<()> {
    let (key, csr, crt, extfile) = (
        format!("{name}.key"),
        format!("{name}.csr"),
        format!("{name}.crt"),
        format!("{name}.ext"),
    );
    openssl(
        dir,
        &[
            "req", "-newkey", "rsa:2048", "-nodes", "-subj", subject, "-keyout", &key, "-out", &csr,
        ],
    )?;
    std::fs::write(dir.join(&extfile), format!("{ext}\n"))?;
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            &extfile,
            "-out",
            &crt,
        ],
    )
}

/// A client certificate `<name>.crt`/`.key` in `dir` for `subject`, signed by the CA there.
pub fn client_cert(dir: &Path, name: &str, subject: &str) -> anyhow::Result<()> {
    issue(dir, name, subject, "extendedKeyUsage=clientAuth")
}

pub struct KubeRig {
    // Stopped in declaration order: the API server before its etcd.
    apiserver: Option<Daemon>,
    etcd: Option<Daemon>,
    pub dir: TempDir,
    pub port: u16,
    etcd_port: u16,
    etcd_peer_port: u16,
    pub admin_token: String,
    options: RigOptions,
}

impl KubeRig {
    /// Starts etcd and the API server, waits for `/readyz`, installs the CRD, RBAC and the
    /// admission policy from deploy/base/.
    pub async fn start() -> anyhow::Result<KubeRig> {
        KubeRig::start_with(RigOptions {
            install_isthmus: true,
            ..RigOptions::default()
        })
        .await
    }

    /// [`KubeRig::start`] as `options` say.
    pub async fn start_with(options: RigOptions) -> anyhow::Result<KubeRig> {
        let dir = tempfile::Builder::new().prefix("isthmus-kube").tempdir()?;
        let d = dir.path();
        openssl(
            d,
            &[
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-days",
                "2",
                "-subj",
                "/CN=isthmus-test-ca",
                "-keyout",
                "ca.key",
                "-out",
                "ca.crt",
            ],
        )?;
        let mut sans = vec!["IP:127.0.0.1".to_string(), "DNS:localhost".to_string()];
        sans.extend(options.extra_sans.iter().cloned());
        issue(
            d,
            "apiserver",
            "/CN=kube-apiserver",
            &format!("subjectAltName={}", sans.join(",")),
        )?;
        for (name, subject) in &options.client_certs {
            client_cert(d, name, subject)?;
        }
        openssl(d, &["genrsa", "-out", "sa.key", "2048"])?;
        openssl(d, &["rsa", "-in", "sa.key", "-pubout", "-out", "sa.pub"])?;
        let admin_token = format!(
            "admin-{:x}",
            std::process::id() as u64 * 7919 + loopback_port()? as u64
        );
        std::fs::write(
            d.join("tokens.csv"),
            format!("{admin_token},admin,admin-uid,\"system:masters\"\n"),
        )?;

        let (etcd_port, etcd_peer_port) = (loopback_port()?, loopback_port()?);
        let mut rig = KubeRig {
            apiserver: None,
            etcd: None,
            port: loopback_port()?,
            etcd_port,
            etcd_peer_port,
            admin_token,
            dir,
            options,
        };
        if rig.options.etcd_servers.is_none() {
            rig.start_etcd()?;
        }
        rig.start_apiserver().await?;
        if rig.options.install_isthmus {
            rig.install().await?;
        }
        Ok(rig)
    }

    pub fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }

    /// Starts (again) etcd on the same ports and data directory. Does not wait: the API
    /// server waits for it (and [`KubeRig::wait_ready`] for the API server).
    pub fn start_etcd(&mut self) -> anyhow::Result<()> {
        if self.options.etcd_servers.is_some() {
            bail!("this rig's etcd is shared: it is not the rig's to start");
        }
        self.etcd = Some(spawn_etcd(
            self.dir.path(),
            self.etcd_port,
            self.etcd_peer_port,
        )?);
        Ok(())
    }

    /// Stops etcd (SIGTERM, as a restart would), the API server left running.
    pub fn stop_etcd(&mut self) {
        if let Some(mut e) = self.etcd.take() {
            e.stop();
        }
    }

    /// Waits up to `timeout` for the API server's `/readyz` (etcd reachable again, say).
    pub fn wait_ready(&self, timeout: Duration) -> bool {
        wait_until(timeout, || {
            self.kubectl(&["get", "--raw", "/readyz"])
                .is_ok_and(|o| o.trim() == "ok")
        })
    }

    /// Starts (again) the API server on the same port and data.
    pub async fn start_apiserver(&mut self) -> anyhow::Result<()> {
        let d = self.dir.path();
        let p = |f: &str| d.join(f).display().to_string();
        let (etcd_servers, etcd_prefix) = match &self.options.etcd_servers {
            Some(url) => (url.clone(), format!("/rig-{}", self.port)),
            None => (
                format!("http://127.0.0.1:{}", self.etcd_port),
                "/registry".to_string(),
            ),
        };
        let mut args: Vec<String> = [
            ("--etcd-servers", etcd_servers),
            ("--etcd-prefix", etcd_prefix),
            ("--bind-address", "127.0.0.1".into()),
            ("--advertise-address", "127.0.0.1".into()),
            ("--secure-port", self.port.to_string()),
            ("--tls-cert-file", p("apiserver.crt")),
            ("--tls-private-key-file", p("apiserver.key")),
            ("--client-ca-file", p("ca.crt")),
            ("--token-auth-file", p("tokens.csv")),
            ("--service-account-key-file", p("sa.pub")),
            ("--service-account-signing-key-file", p("sa.key")),
            (
                "--service-account-issuer",
                "https://kubernetes.default.svc".into(),
            ),
            ("--service-cluster-ip-range", "10.96.0.0/16".into()),
            ("--endpoint-reconciler-type", "none".into()),
            ("--authorization-mode", "Node,RBAC".into()),
            ("--cert-dir", p("certs")),
        ]
        .into_iter()
        .flat_map(|(flag, value)| [flag.to_string(), value])
        .collect();
        let dir = d.display().to_string();
        args.extend(
            self.options
                .apiserver_args
                .iter()
                .map(|a| a.replace("{dir}", &dir)),
        );
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let apiserver = Daemon::spawn_host(
            &kube_bin("kube-apiserver", "KUBE_APISERVER_BIN"),
            &args,
            &[],
            d.join(format!("apiserver-{}.log", self.port)),
        )?;
        self.apiserver = Some(apiserver);
        let ready = wait_until(Duration::from_secs(60), || {
            self.kubectl(&["get", "--raw", "/readyz"])
                .is_ok_and(|o| o.trim() == "ok")
        });
        if !ready {
            bail!(
                "kube-apiserver never became ready; log:\n{}",
                self.apiserver.as_ref().map(Daemon::log).unwrap_or_default()
            );
        }
        Ok(())
    }

    /// Stops the API server (etcd stays), as an outage would.
    pub fn stop_apiserver(&mut self) {
        if let Some(mut a) = self.apiserver.take() {
            a.stop();
        }
    }

    pub fn apiserver_log(&self) -> String {
        self.apiserver.as_ref().map(Daemon::log).unwrap_or_default()
    }

    /// `kubectl` as admin.
    pub fn kubectl(&self, args: &[&str]) -> anyhow::Result<String> {
        let server = self.url();
        let ca = self.dir.path().join("ca.crt").display().to_string();
        let mut full = vec![
            "--server",
            &server,
            "--token",
            &self.admin_token,
            "--certificate-authority",
            &ca,
        ];
        full.extend_from_slice(args);
        crate::netns::run(
            &kube_bin("kubectl", "KUBECTL_BIN").display().to_string(),
            &full,
        )
    }

    /// `kubectl` with an arbitrary token: for checking what an identity may do.
    pub fn kubectl_as(&self, token: &str, args: &[&str]) -> (bool, String) {
        let server = self.url();
        let ca = self.dir.path().join("ca.crt").display().to_string();
        let out = Command::new(kube_bin("kubectl", "KUBECTL_BIN"))
            .args([
                "--server",
                &server,
                "--token",
                token,
                "--certificate-authority",
                &ca,
            ])
            .args(args)
            .output();
        match out {
            Ok(o) => (
                o.status.success(),
                format!(
                    "{}{}",
                    String::from_utf8_lossy(&o.stdout),
                    String::from_utf8_lossy(&o.stderr)
                ),
            ),
            Err(e) => (false, e.to_string()),
        }
    }

    async fn install(&self) -> anyhow::Result<()> {
        let deploy = workspace_root().join("deploy/base");
        for file in ["crd.yaml", "rbac.yaml", "admission-policy.yaml"] {
            let path = deploy.join(file).display().to_string();
            self.kubectl(&["apply", "--server-side", "-f", &path])
                .with_context(|| format!("applying deploy/base/{file}"))?;
        }
        self.kubectl(&[
            "wait",
            "--for=condition=Established",
            "--timeout=30s",
            "crd/wireguardpeers.isthmus.dev",
        ])?;
        self.wait_for_admission_policy()
    }

    /// A new admission policy takes a moment to be enforced. Probe with a request it must
    /// deny (a server-side dry run, so nothing is written) until it does.
    fn wait_for_admission_policy(&self) -> anyhow::Result<()> {
        let token = self.kubectl(&["create", "token", "isthmus-agent", "-n", NAMESPACE])?;
        let probe = self.dir.path().join("policy-probe.yaml");
        std::fs::write(
            &probe,
            "apiVersion: isthmus.dev/v1alpha1\nkind: WireGuardPeer\nmetadata:\n  name: policy-probe\n\
             spec:\n  publicKey: WQL+aNNIySrhb3blZyAOhC0i5K9VtYYVqSgp1AcVmhQ=\n  endpoint: 192.0.2.1:51820\n\
             \x20 location: probe\n  nodeIP: 192.0.2.1\n",
        )?;
        let probe = probe.display().to_string();
        // The heartbeat Lease policy too: a Lease is the other thing an agent writes.
        let lease_probe = self.dir.path().join("lease-policy-probe.yaml");
        std::fs::write(
            &lease_probe,
            format!(
                "apiVersion: coordination.k8s.io/v1\nkind: Lease\nmetadata:\n  name: policy-probe\n\
                 \x20 namespace: {NAMESPACE}\nspec:\n  holderIdentity: probe\n"
            ),
        )?;
        let lease_probe = lease_probe.display().to_string();
        let enforced = wait_until(Duration::from_secs(30), || {
            [&probe, &lease_probe].iter().all(|file| {
                let (ok, out) =
                    self.kubectl_as(token.trim(), &["create", "--dry-run=server", "-f", file]);
                !ok && out.contains("pod-bound")
            })
        });
        if !enforced {
            bail!("the admission policies from deploy/ were never enforced");
        }
        Ok(())
    }

    /// A kubeconfig file for `token`.
    pub fn kubeconfig(&self, name: &str, token: &str) -> anyhow::Result<PathBuf> {
        let ca = self.dir.path().join("ca.crt");
        let path = self.dir.path().join(format!("{name}.kubeconfig"));
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: rig\n  cluster:\n    server: {}\n    certificate-authority: {}\n\
             users:\n- name: {name}\n  user:\n    token: {token}\ncontexts:\n- name: {name}\n  context:\n    cluster: rig\n    user: {name}\n\
             current-context: {name}\n",
            self.url(),
            ca.display()
        );
        std::fs::write(&path, text)?;
        Ok(path)
    }

    /// A client acting as `token`.
    pub async fn client(&self, name: &str, token: &str) -> anyhow::Result<Client> {
        let path = self.kubeconfig(name, token)?;
        let kubeconfig = Kubeconfig::read_from(&path)?;
        let config =
            Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await?;
        Ok(Client::try_from(config)?)
    }

    pub async fn admin(&self) -> anyhow::Result<Client> {
        self.client("admin", &self.admin_token.clone()).await
    }

    /// A token for the agent's ServiceAccount bound to a pod on `node`, as the kubelet would
    /// mint it: the API server adds the node's name to the identity's extra info, which the
    /// admission policy checks.
    pub async fn agent_token(&self, node: &str) -> anyhow::Result<String> {
        let admin = self.admin().await?;
        let pods: Api<Pod> = Api::namespaced(admin.clone(), NAMESPACE);
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": format!("isthmus-agent-{node}")},
            "spec": {
                "nodeName": node,
                "serviceAccountName": "isthmus-agent",
                "automountServiceAccountToken": false,
                "containers": [{"name": "agent", "image": "isthmus-agent:test"}]
            }
        }))?;
        let pod = pods
            .create(&PostParams::default(), &pod)
            .await
            .context("creating agent pod")?;
        let bound = BoundObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Pod".into()),
            name: pod.metadata.name.clone(),
            uid: pod.metadata.uid.clone(),
        };
        self.token("isthmus-agent", Some(bound)).await
    }

    /// A token for the coordinator's ServiceAccount.
    pub async fn coordinator_token(&self) -> anyhow::Result<String> {
        self.token("isthmus-coordinator", None).await
    }

    async fn token(
        &self,
        account: &str,
        bound: Option<BoundObjectReference>,
    ) -> anyhow::Result<String> {
        let admin = self.admin().await?;
        let sas: Api<ServiceAccount> = Api::namespaced(admin, NAMESPACE);
        let req = TokenRequest {
            spec: Some(TokenRequestSpec {
                bound_object_ref: bound,
                expiration_seconds: Some(3600),
                ..Default::default()
            }),
            ..Default::default()
        };
        // An API server under load (ten of them on two cores) may drop a connection: try
        // again a few times before failing the run.
        let mut attempt = 0;
        let resp = loop {
            attempt += 1;
            match sas
                .create_token_request(account, &PostParams::default(), &req)
                .await
            {
                Ok(resp) => break resp,
                Err(kube::Error::Service(e)) if attempt < 4 => {
                    eprintln!("token for {account}: {e}; trying again");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                Err(e) => return Err(e).with_context(|| format!("token for {account}")),
            }
        };
        resp.status
            .and_then(|s| s.token)
            .context("token request answered without a token")
    }
}
