//! The `--metrics-addr` endpoint end to end: an agent is not ready before the coordinator
//! has admitted it, is ready once its mesh is configured, and its metrics report the peer
//! it pings by node name; the coordinator's probes and metrics likewise. Every listener is
//! on a loopback port of the host namespace the test runs in.

use std::cell::RefCell;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use isthmus_tests::cluster::Cluster;
use isthmus_tests::daemon::eventually;
use isthmus_tests::ports::loopback_addr;
use isthmus_tests::scrape::{get, parse, value, Sample};
use isthmus_tests::traffic::ping_within;

const CONVERGE: Duration = Duration::from_secs(60);

const DROP_REASONS: [&str; 13] = [
    "no_route",
    "no_endpoint",
    "malformed",
    "handshake_rejected",
    "unknown_peer",
    "unknown_index",
    "decrypt_failed",
    "source_not_allowed",
    "under_load",
    "rate_limited",
    "io_error",
    "too_big",
    "routing_loop",
];

/// Polls `GET path` until `want` holds for (status, body); the last answer either way.
async fn poll(
    addr: SocketAddr,
    path: &str,
    timeout: Duration,
    want: impl Fn(u16, &str) -> bool,
) -> (bool, String) {
    let last = RefCell::new(String::new());
    let ok = eventually(timeout, || async {
        let (done, answer) = match get(addr, path) {
            Ok((status, body)) if want(status, &body) => (true, body),
            Ok((status, body)) => (false, format!("{status} {body}")),
            Err(e) => (false, format!("{e:#}")),
        };
        *last.borrow_mut() = answer;
        done
    })
    .await;
    (ok, last.into_inner())
}

fn scrape(addr: SocketAddr) -> Vec<Sample> {
    let (status, body) = get(addr, "/metrics").expect("scrape");
    assert_eq!(status, 200, "{body}");
    assert!(body.ends_with("# EOF\n"), "not OpenMetrics:\n{body}");
    parse(&body).unwrap_or_else(|e| panic!("{e:#}\n{body}"))
}

fn check_peer(samples: &[Sample], peer: &str) {
    let labels = [("peer", peer)];
    let rx = value(samples, "isthmus_peer_rx_bytes_total", &labels);
    let tx = value(samples, "isthmus_peer_tx_bytes_total", &labels);
    let handshake = value(samples, "isthmus_peer_last_handshake_seconds", &labels);
    assert!(
        rx.is_some_and(|v| v > 0.0),
        "rx for {peer}: {rx:?}\n{samples:#?}"
    );
    assert!(
        tx.is_some_and(|v| v > 0.0),
        "tx for {peer}: {tx:?}\n{samples:#?}"
    );
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as f64;
    assert!(
        handshake.is_some_and(|t| t > now - 300.0 && t <= now + 5.0),
        "handshake time for {peer}: {handshake:?} (now {now})"
    );
    assert_eq!(value(samples, "isthmus_peers", &[]), Some(1.0));
    for reason in DROP_REASONS {
        assert!(
            value(
                samples,
                "isthmus_dropped_packets_total",
                &[("reason", reason)]
            )
            .is_some(),
            "no dropped-packets series for {reason}"
        );
    }
    assert!(
        value(samples, "isthmus_reconcile_duration_seconds_count", &[]).is_some_and(|n| n >= 1.0)
    );
    assert!(value(samples, "isthmus_routing_reassertions_total", &[]).is_some());
    assert_eq!(value(samples, "isthmus_ready", &[]), Some(1.0));
    // The pings went out as data messages; a send call carries one or more of them.
    let sent = value(samples, "isthmus_sent_datagrams_total", &[]);
    let calls = value(samples, "isthmus_send_calls_total", &[]);
    assert!(
        matches!((sent, calls), (Some(d), Some(c)) if c >= 1.0 && c <= d),
        "sent datagrams {sent:?}, send calls {calls:?}"
    );
    // The replies came in the same way: a receive call takes one or more datagrams.
    let received = value(samples, "isthmus_received_datagrams_total", &[]);
    let calls = value(samples, "isthmus_receive_calls_total", &[]);
    assert!(
        matches!((received, calls), (Some(d), Some(c)) if c >= 1.0 && c <= d),
        "received datagrams {received:?}, receive calls {calls:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn probes_and_metrics_follow_the_mesh() {
    let mut cluster = Cluster::new().await.expect("cluster");
    let mut agents = Vec::new();
    for cloud in [0, 1] {
        let i = cluster.add_node_idle(cloud, 1).await.expect("node");
        let addr = loopback_addr().unwrap();
        cluster
            .start_node_agent(i, &["--metrics-addr", &addr.to_string()])
            .expect("agent");
        agents.push(addr);
    }

    // No coordinator yet: alive, published, but not ready, and saying why.
    for addr in &agents {
        let (ok, last) = poll(*addr, "/healthz", Duration::from_secs(10), |s, _| s == 200).await;
        assert!(ok, "healthz: {last}\n{}", cluster.logs());
        let (ok, last) = poll(*addr, "/readyz", Duration::from_secs(20), |s, body| {
            assert_eq!(s, 503, "ready before admission: {body}");
            body.trim() == "not admitted by the coordinator yet"
        })
        .await;
        assert!(ok, "readyz before admission: {last}\n{}", cluster.logs());
        let early = scrape(*addr);
        assert_eq!(value(&early, "isthmus_peers", &[]), Some(0.0));
        assert_eq!(value(&early, "isthmus_ready", &[]), Some(0.0));
    }

    let coordinator = loopback_addr().unwrap();
    cluster
        .start_coordinator_with("c1", &["--metrics-addr", &coordinator.to_string()])
        .expect("coordinator");
    assert!(
        cluster.wait_converged(CONVERGE).await,
        "mesh did not form\n{}",
        cluster.logs()
    );
    for addr in agents.iter().chain([&coordinator]) {
        let (ok, last) = poll(*addr, "/readyz", Duration::from_secs(20), |s, _| s == 200).await;
        assert!(ok, "{addr} /readyz: {last}\n{}", cluster.logs());
        assert_eq!(get(*addr, "/healthz").unwrap().0, 200);
    }

    let ips = cluster.mesh_ips().await.unwrap();
    for (from, to) in [("vsphere-1", "aws-1"), ("aws-1", "vsphere-1")] {
        let dst: IpAddr = ips[to].parse().unwrap();
        assert!(
            ping_within(&cluster.node(from).ns, dst, Duration::from_secs(10)),
            "{from} cannot reach {to}\n{}",
            cluster.logs()
        );
    }
    check_peer(&scrape(agents[0]), "aws-1");
    check_peer(&scrape(agents[1]), "vsphere-1");

    let c = scrape(coordinator);
    assert_eq!(value(&c, "isthmus_coordinator_leader", &[]), Some(1.0));
    assert_eq!(
        value(&c, "isthmus_coordinator_peers", &[("admitted", "true")]),
        Some(2.0)
    );
    assert_eq!(
        value(&c, "isthmus_coordinator_peers", &[("admitted", "false")]),
        Some(0.0)
    );
    assert_eq!(
        value(&c, "isthmus_coordinator_mesh_ips_allocated", &[]),
        Some(2.0)
    );
    assert!(value(
        &c,
        "isthmus_coordinator_reconcile_duration_seconds_count",
        &[]
    )
    .is_some_and(|n| n >= 1.0));
    assert_eq!(get(coordinator, "/nope").unwrap().0, 404);
}
