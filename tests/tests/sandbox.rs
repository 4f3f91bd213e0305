//! `make sandbox` in CI: the migration sandbox's short profile runs green. It needs the
//! release binaries (`cargo build --release --workspace --bins`, as `make test` does).

use std::process::Command;

#[test]
fn sandbox_short_profile_loses_no_request() {
    isthmus_tests::require_root();
    let sandbox = isthmus_tests::workspace_bin("isthmus-sandbox");
    let out = Command::new(&sandbox)
        .args(["--profile", "short"])
        .output()
        .expect("running the sandbox");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}");
    eprintln!("{stderr}");
    assert!(out.status.success(), "the sandbox failed: {}", out.status);
    let summary = stdout
        .lines()
        .find_map(|l| l.strip_prefix("requests: "))
        .expect("a `requests:` line in the report");
    let (sent, failed) = summary.split_once(" sent, ").expect("`N sent, M failed`");
    let sent: u64 = sent.parse().expect("a number of requests sent");
    assert!(sent > 0, "the client sent nothing");
    assert_eq!(failed, "0 failed", "requests failed: {summary}");
}
