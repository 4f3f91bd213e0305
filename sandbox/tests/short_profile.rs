//! `make sandbox PROFILE=short` in CI: the whole move on the real cluster, control plane
//! included, and the figures it returns: no failed request, no failed or lost etcd write,
//! every client and the writer actually at work. Needs root, the release binaries and the
//! images (`make test` builds them).

use isthmus_sandbox::{run, Profile};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_short_move_loses_no_request_and_no_write() -> anyhow::Result<()> {
    isthmus_tests::require_root();
    let profile = Profile::by_name("short").expect("the short profile");
    let report = run(profile).await?;
    println!("{}", report.render());
    assert_eq!(report.error, None, "the move stopped early");
    assert_eq!(report.requests_failed(), 0, "requests failed");
    assert_eq!(report.etcd_failed(), 0, "etcd writes failed or were lost");
    assert!(report.etcd_writes() > 0, "the etcd writer wrote nothing");
    // Each client was at work in every phase it should have been, so a zero above means
    // something: the outside client from the start, the client pod once the new cloud
    // joined (the third phase on).
    for (i, p) in report.phases.iter().enumerate() {
        assert!(
            p.outside.sent > 0,
            "{}: the outside client sent nothing",
            p.name
        );
        if i >= 2 {
            assert!(
                p.in_cluster.sent > 0,
                "{}: the client pod sent nothing",
                p.name
            );
        }
    }
    let last = report.phases.last().expect("phases");
    let members = &last
        .steps
        .iter()
        .rev()
        .find_map(|s| s.etcd.as_ref())
        .expect("etcd figures at the end")
        .members;
    assert_eq!(members.len(), 3, "etcd members at the end: {members:?}");
    Ok(())
}
