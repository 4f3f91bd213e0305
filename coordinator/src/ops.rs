//! What the coordinator serves on `--metrics-addr` (see `isthmus_ops`).
//!
//! Ready means "able to act": both caches synced and the last API call (the lease check every
//! replica makes) succeeded. Holding the lease is deliberately not part of it: a standby
//! must stay ready, or the PodDisruptionBudget would count it unavailable and block drains.
//! Peer counts are read from the watch cache at scrape time; [`render`] and
//! [`Readiness::check`] are pure.

use std::collections::BTreeMap;
use std::time::Duration;

use isthmus_api::WireGuardPeer;
use isthmus_ops::prometheus_client::metrics::family::Family;
use isthmus_ops::prometheus_client::metrics::gauge::Gauge;
use isthmus_ops::prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use isthmus_ops::prometheus_client::registry::{Registry, Unit};
use isthmus_ops::Watchdog;
use kube::runtime::reflector::Store;
use parking_lot::Mutex;

/// A pass includes API writes (each bounded by the client's timeouts); a pass this long
/// means the loop is wedged.
const PASS_LIMIT: Duration = Duration::from_secs(600);

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Readiness {
    pub caches_synced: bool,
    /// `None`: no API call made yet; else whether the last one succeeded.
    pub api_ok: Option<bool>,
}

impl Readiness {
    pub fn check(&self) -> Result<(), &'static str> {
        if !self.caches_synced {
            return Err("WireGuardPeer and Node caches not synced");
        }
        match self.api_ok {
            None => Err("API server not checked yet"),
            Some(false) => Err("API server unreachable (last lease check failed)"),
            Some(true) => Ok(()),
        }
    }
}

/// What a scrape reports besides the reconcile histogram.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Sample {
    pub admitted: usize,
    pub not_admitted: usize,
    pub mesh_ips_allocated: usize,
    pub leader: bool,
}

impl Sample {
    pub fn of(peers: &[std::sync::Arc<WireGuardPeer>], leader: bool) -> Sample {
        let admitted = peers.iter().filter(|p| p.is_admitted()).count();
        Sample {
            admitted,
            not_admitted: peers.len() - admitted,
            mesh_ips_allocated: peers
                .iter()
                .filter(|p| p.status.as_ref().is_some_and(|s| s.mesh_ip.is_some()))
                .count(),
            leader,
        }
    }
}

fn reconcile_histogram() -> Histogram {
    // 5 ms .. ~20 s: a pass is a list from cache and a few status writes.
    Histogram::new(exponential_buckets(0.005, 2.0, 13))
}

/// Metric labels: `cluster` in multi-cluster mode, then the metric's own.
pub type Labels = Vec<(&'static str, String)>;

/// The labels of user cluster `name`'s metrics.
pub fn cluster_labels(name: &str) -> Labels {
    vec![("cluster", name.to_string())]
}

/// Reconcile pass durations per user cluster (multi-cluster mode).
pub type ClusterReconciles = Family<Labels, Histogram, fn() -> Histogram>;

/// Multi-cluster mode's figures: per served user cluster its peers, and its passes.
pub struct Clusters<'a> {
    pub samples: &'a [(String, Sample)],
    pub reconciles: &'a ClusterReconciles,
}

/// The exposition: in single-cluster mode unlabelled; in multi-cluster mode (`clusters`)
/// the peer gauges and the reconcile histogram per user cluster, labelled `cluster`.
pub fn render(sample: &Sample, reconcile: &Histogram, clusters: Option<Clusters>) -> String {
    let mut r = Registry::default();
    let peers = Family::<Labels, Gauge>::default();
    let allocated = Family::<Labels, Gauge>::default();
    let add = |labels: Labels, s: &Sample| {
        let with = |v: &str| {
            let mut l = labels.clone();
            l.push(("admitted", v.to_string()));
            l
        };
        peers.get_or_create(&with("true")).set(s.admitted as i64);
        peers
            .get_or_create(&with("false"))
            .set(s.not_admitted as i64);
        allocated
            .get_or_create(&labels)
            .set(s.mesh_ips_allocated as i64);
    };
    match &clusters {
        None => add(Vec::new(), sample),
        Some(c) => {
            for (name, s) in c.samples {
                add(cluster_labels(name), s);
            }
        }
    }
    let leader = Gauge::<i64>::default();
    leader.set(i64::from(sample.leader));
    r.register(
        "isthmus_coordinator_peers",
        "WireGuardPeers, by admission",
        peers,
    );
    r.register(
        "isthmus_coordinator_mesh_ips_allocated",
        "WireGuardPeers holding a mesh IP",
        allocated,
    );
    r.register(
        "isthmus_coordinator_leader",
        "1 while this replica holds the lease and acts",
        leader,
    );
    let help = "Time of one reconcile pass (leader only)";
    let name = "isthmus_coordinator_reconcile_duration";
    match clusters {
        None => r.register_with_unit(name, help, Unit::Seconds, reconcile.clone()),
        Some(c) => r.register_with_unit(name, help, Unit::Seconds, c.reconciles.clone()),
    }
    isthmus_ops::encode(&r)
}

struct State {
    readiness: Readiness,
    leader: bool,
    peers: Option<Store<WireGuardPeer>>,
    /// Multi-cluster mode: the served user clusters' peer caches, by MeshCluster name.
    clusters: Option<BTreeMap<String, Store<WireGuardPeer>>>,
}

/// The coordinator's side of the ops endpoint, shared between the loop and the server.
pub struct CoordinatorOps {
    watchdog: Watchdog,
    reconcile: Histogram,
    reconciles: ClusterReconciles,
    state: Mutex<State>,
}

impl Default for CoordinatorOps {
    fn default() -> CoordinatorOps {
        CoordinatorOps {
            watchdog: Watchdog::default(),
            reconcile: reconcile_histogram(),
            reconciles: ClusterReconciles::new_with_constructor(reconcile_histogram),
            state: Mutex::new(State {
                readiness: Readiness::default(),
                leader: false,
                peers: None,
                clusters: None,
            }),
        }
    }
}

impl CoordinatorOps {
    pub fn caches_synced(&self, peers: Store<WireGuardPeer>) {
        let mut s = self.state.lock();
        s.readiness.caches_synced = true;
        s.peers = Some(peers);
    }

    /// Multi-cluster mode: the seed's MeshCluster and Secret caches are synced (peer counts
    /// live in each MeshCluster's status, not here).
    pub fn seed_synced(&self) {
        let mut s = self.state.lock();
        s.readiness.caches_synced = true;
        s.clusters.get_or_insert_with(BTreeMap::new);
    }

    /// Multi-cluster mode: user cluster `name` is served from `peers`.
    pub fn cluster_synced(&self, name: &str, peers: Store<WireGuardPeer>) {
        self.state
            .lock()
            .clusters
            .get_or_insert_with(BTreeMap::new)
            .insert(name.to_string(), peers);
    }

    /// Multi-cluster mode: a reconcile pass of user cluster `name` took `took`.
    pub fn cluster_pass(&self, name: &str, took: Duration) {
        self.reconciles
            .get_or_create(&cluster_labels(name))
            .observe(took.as_secs_f64());
    }

    /// Multi-cluster mode: user cluster `name` is served no more; its series go.
    pub fn cluster_stopped(&self, name: &str) {
        if let Some(c) = self.state.lock().clusters.as_mut() {
            c.remove(name);
        }
        self.reconciles.remove(&cluster_labels(name));
    }

    /// The outcome of a lease check: whether the API answered, and whether we lead.
    pub fn lease_checked(&self, api_ok: bool, leader: bool) {
        let mut s = self.state.lock();
        s.readiness.api_ok = Some(api_ok);
        s.leader = leader;
    }

    pub fn pass_started(&self) {
        self.watchdog.enter();
    }

    pub fn pass_finished(&self) {
        self.watchdog.exit();
    }

    pub fn observe_reconcile(&self, took: Duration) {
        self.reconcile.observe(took.as_secs_f64());
    }
}

impl isthmus_ops::Probes for CoordinatorOps {
    fn metrics(&self) -> String {
        let (peers, leader, clusters) = {
            let s = self.state.lock();
            (s.peers.clone(), s.leader, s.clusters.clone())
        };
        let peers = peers.map(|p| p.state()).unwrap_or_default();
        let sample = Sample::of(&peers, leader);
        let Some(clusters) = clusters else {
            return render(&sample, &self.reconcile, None);
        };
        let samples: Vec<(String, Sample)> = clusters
            .into_iter()
            .map(|(name, store)| (name, Sample::of(&store.state(), leader)))
            .collect();
        render(
            &sample,
            &self.reconcile,
            Some(Clusters {
                samples: &samples,
                reconciles: &self.reconciles,
            }),
        )
    }

    fn live(&self) -> Result<(), String> {
        self.watchdog.check(PASS_LIMIT)
    }

    fn ready(&self) -> Result<(), String> {
        self.state.lock().readiness.check().map_err(str::to_string)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_when_synced_and_the_api_answers_leader_or_not() {
        let ok = Readiness {
            caches_synced: true,
            api_ok: Some(true),
        };
        assert_eq!(ok.check(), Ok(()));
        assert!(Readiness::default().check().is_err());
        assert!(Readiness { api_ok: None, ..ok }.check().is_err());
        assert_eq!(
            Readiness {
                api_ok: Some(false),
                ..ok
            }
            .check(),
            Err("API server unreachable (last lease check failed)")
        );
    }

    #[test]
    fn renders_prometheus_names() {
        let h = reconcile_histogram();
        h.observe(0.01);
        let text = render(
            &Sample {
                admitted: 3,
                not_admitted: 1,
                mesh_ips_allocated: 3,
                leader: true,
            },
            &h,
            None,
        );
        for line in [
            "isthmus_coordinator_peers{admitted=\"true\"} 3",
            "isthmus_coordinator_peers{admitted=\"false\"} 1",
            "isthmus_coordinator_mesh_ips_allocated 3",
            "isthmus_coordinator_leader 1",
            "isthmus_coordinator_reconcile_duration_seconds_count 1",
            "# EOF",
        ] {
            assert!(text.lines().any(|l| l == line), "no {line:?} in\n{text}");
        }
    }

    #[test]
    fn multi_cluster_mode_labels_by_cluster() {
        let reconciles = ClusterReconciles::new_with_constructor(reconcile_histogram);
        reconciles.get_or_create(&cluster_labels("a")).observe(0.01);
        let sample = |admitted| Sample {
            admitted,
            not_admitted: 1,
            mesh_ips_allocated: admitted,
            leader: true,
        };
        let samples = [("a".to_string(), sample(2)), ("b".to_string(), sample(5))];
        let text = render(
            &sample(0),
            &reconcile_histogram(),
            Some(Clusters {
                samples: &samples,
                reconciles: &reconciles,
            }),
        );
        for line in [
            "isthmus_coordinator_peers{cluster=\"a\",admitted=\"true\"} 2",
            "isthmus_coordinator_peers{cluster=\"b\",admitted=\"true\"} 5",
            "isthmus_coordinator_peers{cluster=\"b\",admitted=\"false\"} 1",
            "isthmus_coordinator_mesh_ips_allocated{cluster=\"b\"} 5",
            "isthmus_coordinator_leader 1",
            "isthmus_coordinator_reconcile_duration_seconds_count{cluster=\"a\"} 1",
        ] {
            assert!(text.lines().any(|l| l == line), "no {line:?} in\n{text}");
        }
        assert!(
            !text.contains("isthmus_coordinator_peers{admitted"),
            "an unlabelled series in multi-cluster mode:\n{text}"
        );
    }
}
