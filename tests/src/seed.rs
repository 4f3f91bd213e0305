//! A seed cluster for the multi-cluster coordinator: deploy/overlays/seed applied, one
//! MeshCluster per user cluster naming a Secret with a kubeconfig for that cluster's
//! coordinator identity, and coordinator replicas in multi-cluster mode.

use std::path::Path;

use anyhow::{bail, Context};
use base64::Engine;
use isthmus_api::MeshCluster;
use k8s_openapi::api::core::v1::{Namespace, Secret};
use k8s_openapi::ByteString;
use kube::api::{Api, PostParams};
use serde_json::json;

use crate::daemon::Daemon;
use crate::kube::{workspace_root, KubeRig};

/// A kubeconfig for `server` with `token`, `rig`'s CA inline: what a seed keeps in a Secret.
pub fn kubeconfig(rig: &KubeRig, server: &str, token: &str) -> anyhow::Result<String> {
    let ca = std::fs::read(rig.dir.path().join("ca.crt")).context("the rig's CA")?;
    let ca = base64::engine::general_purpose::STANDARD.encode(ca);
    Ok(format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: {server}\n    certificate-authority-data: {ca}\n\
         users:\n- name: u\n  user:\n    token: {token}\ncontexts:\n- name: x\n  context:\n    cluster: c\n    user: u\ncurrent-context: x\n"
    ))
}

/// Stores `kubeconfig` in the seed as Secret `name`/kubeconfig in namespace `name`.
pub async fn store_kubeconfig(seed: &KubeRig, name: &str, kubeconfig: &str) -> anyhow::Result<()> {
    let admin = seed.admin().await?;
    let namespaces: Api<Namespace> = Api::all(admin.clone());
    let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": name}}))?;
    namespaces
        .create(&PostParams::default(), &ns)
        .await
        .with_context(|| format!("namespace {name}"))?;
    let secrets: Api<Secret> = Api::namespaced(admin, name);
    let secret = Secret {
        metadata: kube::api::ObjectMeta {
            name: Some("kubeconfig".into()),
            ..Default::default()
        },
        data: Some(
            [(
                "kubeconfig".to_string(),
                ByteString(kubeconfig.as_bytes().to_vec()),
            )]
            .into(),
        ),
        ..Default::default()
    };
    secrets
        .create(&PostParams::default(), &secret)
        .await
        .with_context(|| format!("Secret {name}/kubeconfig"))?;
    Ok(())
}

/// Declares user cluster `name` (its kubeconfig stored by [`store_kubeconfig`]).
pub async fn declare(
    seed: &KubeRig,
    name: &str,
    mesh_cidr: &str,
    topology: &str,
) -> anyhow::Result<()> {
    declare_dual_stack(seed, name, mesh_cidr, None, topology).await
}

/// [`declare`], with the IPv6 pool of a dual-stack mesh (`meshCIDRv6`) when given.
pub async fn declare_dual_stack(
    seed: &KubeRig,
    name: &str,
    mesh_cidr: &str,
    mesh_cidr_v6: Option<&str>,
    topology: &str,
) -> anyhow::Result<()> {
    let api: Api<MeshCluster> = Api::all(seed.admin().await?);
    let mut spec = json!({
        "kubeconfig": {"namespace": name, "name": "kubeconfig"},
        "meshCIDR": mesh_cidr,
        "topology": topology,
    });
    if let Some(v6) = mesh_cidr_v6 {
        spec["meshCIDRv6"] = v6.into();
    }
    let mc: MeshCluster = serde_json::from_value(json!({
        "apiVersion": "isthmus.dev/v1alpha1",
        "kind": "MeshCluster",
        "metadata": {"name": name},
        "spec": spec,
    }))?;
    api.create(&PostParams::default(), &mc)
        .await
        .with_context(|| format!("MeshCluster {name}"))?;
    Ok(())
}

/// [`store_kubeconfig`] with a coordinator token of `user`'s, then [`declare`].
pub async fn serve(
    seed: &KubeRig,
    name: &str,
    user: &KubeRig,
    mesh_cidr: &str,
    topology: &str,
) -> anyhow::Result<()> {
    let token = user.coordinator_token().await?;
    store_kubeconfig(seed, name, &kubeconfig(user, &user.url(), &token)?).await?;
    declare(seed, name, mesh_cidr, topology).await
}

/// Applies deploy/overlays/seed to the seed as an admin would, refusing any warning; returns
/// the build.
pub fn install_overlay(seed: &KubeRig) -> anyhow::Result<String> {
    let dir = workspace_root().join("deploy/overlays/seed");
    let built = seed
        .kubectl(&["kustomize", &dir.display().to_string()])
        .context("kubectl kustomize deploy/overlays/seed")?;
    let path = seed.dir.path().join("seed.yaml");
    std::fs::write(&path, &built).context("writing the build")?;
    let (ok, out) = seed.kubectl_as(
        &seed.admin_token,
        &[
            "apply",
            "--server-side",
            "--validate=strict",
            "-f",
            &path.display().to_string(),
        ],
    );
    if !ok || out.to_lowercase().contains("warning") {
        bail!("the seed refused or warned:\n{out}");
    }
    seed.kubectl(&[
        "wait",
        "--for=condition=Established",
        "--timeout=30s",
        "crd/meshclusters.isthmus.dev",
    ])
    .context("MeshCluster CRD established")?;
    Ok(built)
}

/// A coordinator replica in multi-cluster mode as `identity`, with `extra_args`, logging
/// into the seed's directory (metrics off unless `extra_args` name an address).
pub fn start_coordinator(
    seed: &KubeRig,
    kubeconfig: &Path,
    identity: &str,
    extra_args: &[&str],
) -> anyhow::Result<Daemon> {
    let kubeconfig = kubeconfig.display().to_string();
    let mut args = vec![
        "run",
        "--multi-cluster",
        "--kubeconfig",
        &kubeconfig,
        "--identity",
        identity,
        "--lease-seconds",
        "4",
    ];
    args.extend_from_slice(extra_args);
    if !extra_args.contains(&"--metrics-addr") {
        args.extend_from_slice(&["--metrics-addr", "off"]);
    }
    Daemon::spawn_host(
        &crate::workspace_bin("isthmus-coordinator"),
        &args,
        &[("RUST_LOG", "info")],
        seed.dir.path().join(format!("coordinator-{identity}.log")),
    )
}
