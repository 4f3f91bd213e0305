//! deploy/base/crd.yaml is generated from the types; a hand edit or a forgotten
//! regeneration fails here.

#[test]
fn checked_in_crd_matches_the_types() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/base/crd.yaml");
    let checked_in = std::fs::read_to_string(path).expect("deploy/base/crd.yaml exists");
    let generated = isthmus_api::crd_yaml().expect("CRD serialises");
    assert!(
        checked_in == generated,
        "deploy/base/crd.yaml is stale: run \
         `cargo run -p isthmus-api --bin crdgen > deploy/base/crd.yaml`"
    );
}

#[test]
fn checked_in_meshcluster_crd_matches_the_types() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/overlays/seed/meshcluster-crd.yaml"
    );
    let checked_in = std::fs::read_to_string(path).expect("meshcluster-crd.yaml exists");
    let generated = isthmus_api::meshcluster_crd_yaml().expect("CRD serialises");
    assert!(
        checked_in == generated,
        "deploy/overlays/seed/meshcluster-crd.yaml is stale: run `cargo run -p isthmus-api \
         --bin crdgen -- meshcluster > deploy/overlays/seed/meshcluster-crd.yaml`"
    );
}
