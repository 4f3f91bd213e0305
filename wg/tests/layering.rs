//! The engine's layering, held by a test rather than by convention: nothing in its build
//! (direct or indirect, normal or build dependencies) is Kubernetes, rtnetlink
//! or tokio.

use std::process::Command;

const FORBIDDEN: &[&str] = &[
    "kube",
    "kube-client",
    "kube-runtime",
    "k8s-openapi",
    "isthmus-api",
    "isthmus-routing",
    "isthmus-agent",
    // tun-rs sets up its own device over netlink (netconfig-rs); what is kept out is the
    // netlink client that programs the node's routing.
    "rtnetlink",
    "tokio",
];

#[test]
fn the_engine_depends_on_no_kubernetes_netlink_or_async_runtime() {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .args(["tree", "--offline", "-p", env!("CARGO_PKG_NAME")])
        .args(["-e", "normal,build", "--prefix", "none", "-f", "{p}"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("running cargo tree");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let tree = String::from_utf8_lossy(&out.stdout);
    let found: Vec<&str> = tree
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|name| FORBIDDEN.contains(name))
        .collect();
    assert!(found.is_empty(), "the engine pulls in {found:?}");
}

/// boringtun's `mock-instant` feature replaces its clock for the whole process with one
/// that never moves by itself; feature unification would carry it from any test into the
/// agent binary. No crate in the workspace, for any target (dev-dependencies included),
/// may turn it on: the engine's tests move boringtun's clock another way (`crate::clock`).
#[test]
fn nothing_in_the_workspace_enables_boringtuns_process_wide_mock_clock() {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .args(["tree", "--offline", "--workspace", "-i", "boringtun"])
        .args(["-e", "features,normal,build,dev", "--prefix", "none"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("running cargo tree");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let tree = String::from_utf8_lossy(&out.stdout);
    assert!(
        tree.contains("boringtun feature"),
        "no feature listing: {tree}"
    );
    let mocked: Vec<&str> = tree.lines().filter(|l| l.contains("mock")).collect();
    assert!(
        mocked.is_empty(),
        "boringtun's mock clock is enabled: {mocked:?}"
    );
}
