//! The scale test's short form (issue 14, part 3; the full one is `isthmus-scale`, see
//! tests/src/scale.rs): three real user-cluster API servers of 30 nodes each behind one
//! multi-cluster coordinator, every agent but one emulated, the one real agent in a network
//! namespace answered by the emulated peers it tunnels to. The heartbeat is shortened to
//! 10 s so a 40 s window holds four of them.

use std::time::Duration;

use isthmus_tests::scale::{run, ScaleOptions};

#[tokio::test(flavor = "multi_thread")]
async fn many_clusters_admitted_connected_and_quiet() {
    let opts = ScaleOptions {
        clusters: 3,
        nodes: 30,
        real_agents: 1,
        heartbeat: Duration::from_secs(10),
        window: Duration::from_secs(40),
        joins: 2,
        settle: Duration::from_secs(120),
    };
    // Fails unless every peer of every cluster is admitted and MeshConnected, and each join
    // admitted and configured on the real agent.
    let f = run(&opts).await.expect("the scale run");
    eprintln!("{f}");

    let agent = f.agents.first().expect("the real agent's figures");
    assert!(
        agent.configured_as_planned,
        "the real agent does not hold exactly its cluster's peers in the other location: {agent:?}"
    );
    // em-0000…em-0028 alternate vsphere/aws: the odd ones, 14, are in aws.
    assert_eq!(agent.peers, 14, "the emulated nodes in aws: {agent:?}");
    assert_eq!(f.joins_configured.len(), opts.joins);

    // Steady state: each node's heartbeat, in its Lease, and nothing else: no WireGuardPeer
    // write at all (what every agent watches). A window of four heartbeats can hold a fifth
    // renewal per node where its heartbeats fall on both edges.
    let nodes = (opts.clusters * opts.nodes) as u64;
    let heartbeats = opts.window.as_secs() / opts.heartbeat.as_secs();
    assert_eq!(
        f.peer_writes_window, 0,
        "WireGuardPeer writes in a steady mesh reach every agent's watch\n{f}"
    );
    assert!(
        f.lease_writes_window <= nodes * (heartbeats + 1),
        "{} Lease writes in {:?} from {nodes} nodes: more than one per node per heartbeat\n{f}",
        f.lease_writes_window,
        opts.window
    );
    assert!(
        f.lease_writes_window >= nodes * (heartbeats - 1),
        "{} Lease writes in {:?}: the heartbeats were not counted\n{f}",
        f.lease_writes_window,
        opts.window
    );
}
