//! The story of the move, as data: phases of steps, in the order a platform team runs them.
//! [`crate::run`] gives each step its effect; adding a phase is adding a step here.

use crate::profile::Profile;

/// Which cloud a step acts on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cloud {
    /// vsphere, where the cluster starts.
    Old,
    /// aws, where it ends.
    New,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// The cloud's nodes boot: kubelet, containerd and kube-proxy; flannel's DaemonSet on
    /// the first call; every node Ready.
    AddNodes(Cloud),
    /// The echo Deployment, its Service (ClusterIP and NodePort) and its PDB.
    DeployEcho,
    /// The client outside the cluster starts calling the NodePort through the old cloud's
    /// load balancer.
    StartOutsideClient,
    /// An etcd of three members on the old cloud's nodes.
    EtcdBootstrap,
    /// `kubectl apply --server-side -k`; every agent Ready, every peer admitted.
    InstallIsthmus,
    /// `kubectl wait --for=condition=MeshConnected wireguardpeers --all`.
    GateMeshConnected,
    /// The client Deployment in the new cloud starts calling the Service's ClusterIP.
    StartClusterClient,
    /// The load balancer sends the outside client to a new-cloud node's NodePort.
    SwitchLoadBalancer,
    /// `kubectl cordon` every node of the cloud.
    Cordon(Cloud),
    /// `kubectl rollout restart deploy/echo`: the pods move to the schedulable nodes.
    RolloutRestartEcho,
    /// The etcd writer starts, from a new-cloud node.
    EtcdStartWriter,
    /// An etcd member joins on the `n`th new-cloud node (modulo their number).
    EtcdAdd(usize),
    /// Member `etcd-<n>` leaves.
    EtcdRemove(usize),
    /// The writer stops; every acknowledged write must still be there.
    EtcdFinish,
    /// `kubectl drain` every node of the cloud.
    Drain(Cloud),
    /// The cloud's machines are deleted, then their Node objects; the coordinator collects
    /// their peers.
    RemoveNodes(Cloud),
    /// `kubectl delete -k`: the agents clean up, nodes fall back to eth0.
    UninstallIsthmus,
    /// Traffic flows for the profile's hold time.
    Hold,
}

pub struct Phase {
    pub name: &'static str,
    pub steps: Vec<Step>,
}

/// The whole move. The etcd members start in the old cloud and move before its nodes go,
/// since they live on them (as a seed's control plane lives on the seed's nodes).
pub fn story(profile: &Profile) -> Vec<Phase> {
    use Step::*;
    let mut old_cloud = vec![AddNodes(Cloud::Old), DeployEcho, StartOutsideClient];
    if profile.etcd {
        old_cloud.push(EtcdBootstrap);
    }
    old_cloud.push(Hold);
    let mut phases = vec![
        Phase {
            name: "old cloud serving",
            steps: old_cloud,
        },
        Phase {
            name: "mesh installed",
            steps: vec![InstallIsthmus, Hold],
        },
        Phase {
            name: "new cloud joins",
            steps: vec![
                AddNodes(Cloud::New),
                GateMeshConnected,
                StartClusterClient,
                Hold,
            ],
        },
        Phase {
            name: "load balancer switched",
            steps: vec![SwitchLoadBalancer, Hold],
        },
        Phase {
            name: "workloads moved",
            steps: vec![Cordon(Cloud::Old), RolloutRestartEcho, Hold],
        },
    ];
    if profile.etcd {
        // 3 → 5 → 3: two join, then each old member leaves, and the third new member
        // joins after the first old one left, so the cluster is never below four voters
        // while members move and never has an even split between the clouds at five.
        phases.push(Phase {
            name: "control plane moved",
            steps: vec![
                EtcdStartWriter,
                EtcdAdd(0),
                EtcdAdd(1),
                EtcdRemove(1),
                EtcdAdd(2),
                EtcdRemove(2),
                EtcdRemove(3),
                Hold,
            ],
        });
    }
    phases.push(Phase {
        name: "old cloud removed",
        steps: vec![Drain(Cloud::Old), RemoveNodes(Cloud::Old), Hold],
    });
    let mut last = vec![UninstallIsthmus, Hold];
    if profile.etcd {
        last.push(EtcdFinish);
    }
    phases.push(Phase {
        name: "mesh removed",
        steps: last,
    });
    phases
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The orderings the move depends on, whatever the profile.
    #[test]
    fn story_orders_what_depends_on_what() {
        for name in ["default", "short"] {
            let p = Profile::by_name(name).expect("a profile");
            let steps: Vec<Step> = story(&p).into_iter().flat_map(|ph| ph.steps).collect();
            let at = |s: &Step| {
                steps
                    .iter()
                    .position(|x| x == s)
                    .unwrap_or_else(|| panic!("{name}: no {s:?}"))
            };
            assert!(at(&Step::InstallIsthmus) < at(&Step::AddNodes(Cloud::New)));
            assert!(at(&Step::GateMeshConnected) < at(&Step::Cordon(Cloud::Old)));
            assert!(at(&Step::GateMeshConnected) < at(&Step::SwitchLoadBalancer));
            assert!(at(&Step::EtcdRemove(3)) < at(&Step::Drain(Cloud::Old)));
            assert!(at(&Step::RemoveNodes(Cloud::Old)) < at(&Step::UninstallIsthmus));
            assert_eq!(steps.last(), Some(&Step::EtcdFinish));
            // Never fewer than four voters while members move: count along the way.
            let mut voters = 3i32;
            for s in &steps {
                match s {
                    Step::EtcdAdd(_) => voters += 1,
                    Step::EtcdRemove(_) => voters -= 1,
                    _ => continue,
                }
                assert!(
                    (3..=5).contains(&voters),
                    "{name}: {voters} voters after {s:?}"
                );
            }
            assert_eq!(voters, 3);
        }
    }
}
