//! `make image` as a user meets it: scripts/build-image.sh turns this build's release
//! binaries and wg into `.cache/image/isthmus-<version>.oci.tar`, and that archive is what
//! the tools that load images accept. skopeo reads the tag and the platform from it; copied
//! to an OCI layout and unpacked with umoci (what a runtime does with its layer), the root
//! filesystem runs both binaries and `wg` under chroot, with nothing else in
//! /usr/local/bin. Needs root (chroot), skopeo and umoci (`make deps` installs them).

use std::path::{Path, PathBuf};
use std::process::Command;

use isthmus_tests::kube::workspace_root;
use isthmus_tests::{require_root, workspace_bin};
use serde_json::Value;

const VERSION: &str = env!("CARGO_PKG_VERSION");
const MAX_BYTES: u64 = 40 << 20;

/// Runs a command to completion; its stdout, or a panic with everything it printed.
fn run(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// scripts/build-image.sh for this build's target dir; the one line it prints.
fn build_image(target_dir: &Path) -> PathBuf {
    let root = workspace_root();
    let stdout = run(Command::new("bash")
        .arg(root.join("scripts/build-image.sh"))
        .arg("--target-dir")
        .arg(target_dir)
        .current_dir(&root));
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(
        lines.len(),
        1,
        "stdout must be the archive's path alone:\n{stdout}"
    );
    PathBuf::from(lines[0])
}

/// The platform's architecture as OCI names it (Go's GOARCH).
fn oci_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        "powerpc64" => "ppc64le",
        other => other,
    }
}

#[test]
fn make_image_builds_an_archive_that_loads_and_runs() {
    require_root();
    // target/release/isthmus-agent -> target/
    let agent = workspace_bin("isthmus-agent");
    let target_dir = agent
        .parent()
        .and_then(Path::parent)
        .expect("the target dir above release/");

    let archive = build_image(target_dir);
    let expected = workspace_root().join(format!(".cache/image/isthmus-{VERSION}.oci.tar"));
    assert_eq!(archive, expected);
    let meta = std::fs::metadata(&archive).expect("the archive exists");
    eprintln!(
        "{}: {:.1} MiB",
        archive.display(),
        meta.len() as f64 / (1u64 << 20) as f64
    );
    assert!(
        meta.len() < MAX_BYTES,
        "{} is {} bytes, over {MAX_BYTES}",
        archive.display(),
        meta.len()
    );

    // Built once: a second run with nothing changed leaves the archive alone.
    assert_eq!(build_image(target_dir), archive);
    let again = std::fs::metadata(&archive).unwrap();
    assert_eq!(
        again.modified().unwrap(),
        meta.modified().unwrap(),
        "rebuilt though nothing changed"
    );

    // The ref: io.containerd.image.name for `ctr images import`, the tag for skopeo.
    let index: Value = serde_json::from_str(&run(Command::new("tar")
        .arg("-xOf")
        .arg(&archive)
        .arg("index.json")))
    .expect("index.json");
    let manifests = index["manifests"].as_array().expect("manifests");
    assert_eq!(manifests.len(), 1, "{index}");
    let annotations = &manifests[0]["annotations"];
    assert_eq!(
        annotations["io.containerd.image.name"],
        format!("localhost/isthmus:{VERSION}"),
        "{index}"
    );
    assert_eq!(
        annotations["org.opencontainers.image.ref.name"], VERSION,
        "{index}"
    );

    // skopeo finds the image by its tag and reads the platform and the PATH from it.
    let source = format!("oci-archive:{}:{VERSION}", archive.display());
    let inspect: Value = serde_json::from_str(&run(
        Command::new("skopeo").args(["inspect", source.as_str()])
    ))
    .expect("skopeo inspect prints JSON");
    assert_eq!(inspect["Os"], "linux", "{inspect:#}");
    assert_eq!(inspect["Architecture"], oci_arch(), "{inspect:#}");
    let path = inspect["Env"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .find_map(|e| e.strip_prefix("PATH="))
        .unwrap_or_else(|| panic!("no PATH in the image's Env: {inspect:#}"));
    assert!(
        path.split(':').any(|d| d == "/usr/local/bin"),
        "deploy/ runs `isthmus-agent` by name: PATH={path}"
    );

    // Unpacked as a runtime would, the root filesystem runs what deploy/ and a user run.
    let dir = tempfile::Builder::new()
        .prefix("isthmus-image")
        .tempdir()
        .expect("temp dir");
    let layout = format!("{}:{VERSION}", dir.path().join("oci").display());
    let destination = format!("oci:{layout}");
    run(Command::new("skopeo").args(["copy", "-q", source.as_str(), destination.as_str()]));
    let bundle = dir.path().join("bundle");
    run(Command::new("umoci")
        .args(["unpack", "--image", layout.as_str()])
        .arg(&bundle));
    let rootfs = bundle.join("rootfs");
    for (program, expected) in [
        ("isthmus-agent", format!("isthmus-agent {VERSION}")),
        (
            "isthmus-coordinator",
            format!("isthmus-coordinator {VERSION}"),
        ),
        ("wg", "wireguard-tools".to_string()),
    ] {
        let out = run(Command::new("chroot")
            .arg(&rootfs)
            .arg(format!("/usr/local/bin/{program}"))
            .arg("--version"));
        assert!(
            out.contains(&expected),
            "{program} --version in the image printed {out:?}, expected {expected:?}"
        );
    }
    let mut bins: Vec<String> = std::fs::read_dir(rootfs.join("usr/local/bin"))
        .expect("/usr/local/bin in the image")
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    bins.sort();
    assert_eq!(bins, ["isthmus-agent", "isthmus-coordinator", "wg"]);
}
