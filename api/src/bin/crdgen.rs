//! Prints the WireGuardPeer CRD:
//! `cargo run -p isthmus-api --bin crdgen > deploy/base/crd.yaml`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    print!("{}", isthmus_api::crd_yaml()?);
    Ok(())
}
