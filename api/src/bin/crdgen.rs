//! Prints a CRD: the WireGuardPeer's (user clusters)
//! `cargo run -p isthmus-api --bin crdgen > deploy/base/crd.yaml`, or with `meshcluster` the
//! MeshCluster's (the seed)
//! `cargo run -p isthmus-api --bin crdgen -- meshcluster > deploy/overlays/seed/meshcluster-crd.yaml`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    match std::env::args().nth(1).as_deref() {
        None | Some("wireguardpeer") => print!("{}", isthmus_api::crd_yaml()?),
        Some("meshcluster") => print!("{}", isthmus_api::meshcluster_crd_yaml()?),
        Some(other) => {
            return Err(format!("unknown CRD {other:?} (wireguardpeer, meshcluster)").into())
        }
    }
    Ok(())
}
