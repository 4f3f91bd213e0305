//! WireGuardPeer -> mesh plan (`control::mesh::plan`): the input is JSON for a list of
//! WireGuardPeers, the form the agent receives them in from the API server, so serde's
//! checks are part of what is fuzzed and every field (names, keys, endpoints, CIDRs,
//! conditions, topology) can hold anything another node or an operator wrote. The first
//! byte picks which peer is this node. Checked: never a panic; the plan is empty unless
//! this node is admitted; peers sorted by key, never this node, each allowed its mesh IP.
#![no_main]

use isthmus_agent::control::mesh::plan;
use isthmus_api::WireGuardPeer;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&pick, json)) = data.split_first() else {
        return;
    };
    let Ok(peers) = serde_json::from_slice::<Vec<WireGuardPeer>>(json) else {
        return;
    };
    let own = peers
        .get(usize::from(pick) % peers.len().max(1))
        .and_then(|p| p.metadata.name.clone())
        .unwrap_or_default();
    let plan = plan(&own, &peers);
    if !plan.admitted {
        assert!(plan.peers.is_empty() && plan.remotes.is_empty() && plan.names.is_empty());
        return;
    }
    assert!(plan
        .peers
        .windows(2)
        .all(|w| w[0].public_key <= w[1].public_key));
    assert!(plan.remotes.windows(2).all(|w| w[0].name <= w[1].name));
    for p in &plan.peers {
        assert!(!p.allowed_ips.is_empty(), "a peer without its mesh IP");
        assert!(plan.names.contains_key(&p.public_key));
        assert!(p.endpoint.is_some());
    }
});
