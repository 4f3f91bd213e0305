//! An etcd member pod's entrypoint (being written).

fn main() {
    eprintln!("isthmus-etcd-member: not written yet");
    std::process::exit(2);
}
