//! What both daemons need before they do anything of their own: logs on stderr, a kube
//! client from a kubeconfig or the pod's credentials, and a future that resolves on
//! SIGTERM or SIGINT.

use anyhow::Context;

/// `tracing` to stderr, filtered by `RUST_LOG` (default `info`), coloured only on a tty.
pub fn init_tracing() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

/// A client for `kubeconfig`, or in-cluster (then `~/.kube/config`) credentials.
pub async fn kube_client(kubeconfig: Option<&std::path::Path>) -> anyhow::Result<kube::Client> {
    let config = match kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("reading {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kc, &Default::default()).await?
        }
        None => kube::Config::infer()
            .await
            .context("finding cluster credentials")?,
    };
    Ok(kube::Client::try_from(config)?)
}

/// Resolves on the first SIGTERM or SIGINT (never, if the handlers cannot be installed).
///
/// The handlers are installed when this is called, not when the future is first polled:
/// a SIGTERM that arrives while the daemon is still starting (or stuck publishing against
/// an unreachable API server) is held until the daemon looks, instead of killing it with
/// its routing changes still in place. Call it inside the tokio runtime.
pub fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{signal, SignalKind};
    let handlers = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    );
    async move {
        match handlers {
            (Ok(mut term), Ok(mut int)) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                }
            }
            _ => std::future::pending::<()>().await,
        }
    }
}
