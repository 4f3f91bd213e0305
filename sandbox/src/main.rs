//! `isthmus-sandbox [--profile default|short] [--workers-only] [--json]`: the migration on a real cluster,
//! one line per step, then the report per phase. Exits 0 only when no request and no etcd
//! write failed; 130 after Ctrl-C (everything removed first).

use std::process::ExitCode;

use isthmus_sandbox::{run, Profile};

fn usage() -> &'static str {
    "usage: isthmus-sandbox [--profile default|short] [--workers-only] [--json]\n\
     Moves a real cluster (kubelet, containerd, kube-proxy, flannel) from one cloud to the\n\
     other over isthmus, control plane included, and reports every failed request. Needs\n\
     root and the images `make sandbox` builds. --workers-only skips the control-plane\n\
     (etcd) phase."
}

fn main() -> ExitCode {
    let mut profile = "default".to_string();
    let mut json = false;
    let mut workers_only = false;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--profile" => match args.next() {
                Some(p) => profile = p,
                None => return bad("--profile needs a value"),
            },
            "--json" => json = true,
            "--workers-only" => workers_only = true,
            "-h" | "--help" => {
                println!("{}", usage());
                return ExitCode::SUCCESS;
            }
            other => return bad(&format!("unknown argument {other}")),
        }
    }
    let Some(mut profile) = Profile::by_name(&profile) else {
        return bad(&format!("no profile {profile} (default, short)"));
    };
    if workers_only {
        profile.etcd = false;
    }
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("isthmus-sandbox needs root (network namespaces, TUN, iptables, containerd)");
        return ExitCode::FAILURE;
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("isthmus-sandbox: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let outcome = runtime.block_on(async {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(t) => t,
                Err(e) => return Some(Err(anyhow::anyhow!("installing the SIGTERM handler: {e}"))),
            };
        // On a signal the run is aborted at its next await and dropped, and dropping the
        // cluster removes everything; a step blocked in kubectl returns first (a Ctrl-C at
        // the terminal interrupts kubectl too; the cluster's daemons have their own process
        // groups and are stopped in order).
        let mut task = tokio::spawn(run(profile));
        tokio::select! {
            r = &mut task => Some(r.unwrap_or_else(|e| Err(anyhow::anyhow!("the run panicked: {e}")))),
            _ = tokio::signal::ctrl_c() => { task.abort(); let _ = task.await; None }
            _ = term.recv() => { task.abort(); let _ = task.await; None }
        }
    });
    match outcome {
        None => {
            eprintln!("isthmus-sandbox: interrupted; everything it created is removed");
            ExitCode::from(130)
        }
        Some(Err(e)) => {
            eprintln!("isthmus-sandbox: {e:#}");
            ExitCode::FAILURE
        }
        Some(Ok(report)) => {
            if json {
                match serde_json::to_string_pretty(&report) {
                    Ok(j) => println!("{j}"),
                    Err(e) => eprintln!("isthmus-sandbox: {e}"),
                }
            } else {
                print!("{}", report.render());
            }
            if report.clean() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

fn bad(msg: &str) -> ExitCode {
    eprintln!("isthmus-sandbox: {msg}\n{}", usage());
    ExitCode::from(2)
}
