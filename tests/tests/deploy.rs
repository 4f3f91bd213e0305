//! deploy/ as one install: `kubectl kustomize deploy/overlays/local` (the base with the
//! image `make image` builds) applied with a server-side dry run (`--validate=strict`) to a
//! real kube-apiserver, so a manifest the API server would refuse fails here and not on a
//! cluster. The pods the workloads would create are dry-run too, so pod admission (priority
//! class, ServiceAccount, Pod Security) sees them. And the check is shown to bite:
//! deliberately broken copies are refused.
//!
//! The rig has already installed the Namespace, RBAC, CRD and admission policy from
//! deploy/base/ (a dry run creates nothing, so the namespaced objects need their namespace
//! to exist).

use std::collections::HashSet;

use isthmus_tests::kube::{workspace_root, KubeRig, NAMESPACE};
use serde_json::{json, Value};

/// `kubectl kustomize deploy/overlays/local`: exactly what
/// `kubectl apply -k deploy/overlays/local` would send.
fn build(rig: &KubeRig) -> String {
    build_dir(rig, "deploy/overlays/local")
}

/// `kubectl kustomize DIR`, DIR relative to the workspace root.
fn build_dir(rig: &KubeRig, dir: &str) -> String {
    let path = workspace_root().join(dir).display().to_string();
    rig.kubectl(&["kustomize", &path])
        .unwrap_or_else(|e| panic!("kubectl kustomize {dir}: {e:#}"))
}

/// (workload/container, image, imagePullPolicy) of every container and init container.
fn images(docs: &[Value]) -> Vec<(String, String, String)> {
    let mut found = Vec::new();
    for doc in docs.iter().filter(|d| d["spec"]["template"].is_object()) {
        let spec = &doc["spec"]["template"]["spec"];
        for container in ["initContainers", "containers"]
            .iter()
            .filter_map(|k| spec[k].as_array())
            .flatten()
        {
            found.push((
                format!(
                    "{}/{}",
                    doc["metadata"]["name"].as_str().unwrap_or_default(),
                    container["name"].as_str().unwrap_or_default()
                ),
                container["image"].as_str().unwrap_or_default().to_string(),
                container["imagePullPolicy"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
            ));
        }
    }
    found
}

/// The objects of a multi-document stream (kustomize separates them with `---` lines).
fn documents(yaml: &str) -> Vec<Value> {
    let mut docs = vec![String::new()];
    for line in yaml.lines() {
        if line == "---" {
            docs.push(String::new());
        } else {
            let doc = docs.last_mut().expect("one document at least");
            doc.push_str(line);
            doc.push('\n');
        }
    }
    docs.iter()
        .map(|d| serde_yaml_ng::from_str::<Value>(d).expect("a YAML document"))
        .filter(|d| !d.is_null())
        .collect()
}

fn to_yaml(docs: &[Value]) -> String {
    docs.iter()
        .map(|d| serde_yaml_ng::to_string(d).expect("YAML"))
        .collect::<Vec<_>>()
        .join("---\n")
}

fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name} in the build"))
}

fn find_mut<'a>(docs: &'a mut [Value], kind: &str, name: &str) -> &'a mut Value {
    docs.iter_mut()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name} in the build"))
}

/// Runs kubectl as admin on a manifest written to the rig's directory; (success, output).
fn kubectl_on(rig: &KubeRig, file: &str, text: &str, args: &[&str]) -> (bool, String) {
    let path = rig.dir.path().join(file);
    std::fs::write(&path, text).expect("writing the manifest");
    let path = path.display().to_string();
    let mut full = args.to_vec();
    full.extend(["-f", &path]);
    rig.kubectl_as(&rig.admin_token, &full)
}

const DRY_RUN_APPLY: &[&str] = &[
    "apply",
    "--server-side",
    "--dry-run=server",
    "--validate=strict",
];

/// Accepted without a word: no refusal and no warning. A warning is a failure too: the
/// API server accepts some invalid values and only warns (a negative grace period becomes
/// 1 second), and it warns about deprecated API versions and Pod Security violations.
fn clean(ok: bool, out: &str) -> bool {
    ok && !out.to_lowercase().contains("warning")
}

/// Every object accepted, one line each.
fn assert_accepted(ok: bool, out: &str, expected_objects: usize) {
    assert!(clean(ok, out), "the API server refused or warned:\n{out}");
    let applied = out
        .lines()
        .filter(|l| l.ends_with("(server dry run)"))
        .count();
    assert_eq!(applied, expected_objects, "one line per object:\n{out}");
}

/// (group, kind) of every cluster-scoped resource the API server serves.
fn cluster_scoped_kinds(rig: &KubeRig) -> HashSet<(String, String)> {
    let out = rig
        .kubectl(&["api-resources", "--namespaced=false", "--no-headers"])
        .expect("kubectl api-resources");
    // NAME [SHORTNAMES] APIVERSION NAMESPACED KIND: read from the right.
    out.lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let (kind, api_version) = (f.last()?, f.get(f.len().checked_sub(3)?)?);
            let group = api_version.rsplit_once('/').map_or("", |(g, _)| g);
            Some((group.to_string(), kind.to_string()))
        })
        .collect()
}

fn group_kind(doc: &Value) -> (String, String) {
    let api_version = doc["apiVersion"].as_str().unwrap_or_default();
    let group = api_version.rsplit_once('/').map_or("", |(g, _)| g);
    (
        group.to_string(),
        doc["kind"].as_str().unwrap_or_default().to_string(),
    )
}

/// Named probe ports must name a declared container port: the API server does not check
/// it, and the kubelet would then fail every probe of every pod.
fn undeclared_probe_ports(doc: &Value) -> Vec<String> {
    let spec = &doc["spec"]["template"]["spec"];
    let mut bad = Vec::new();
    for container in ["initContainers", "containers"]
        .iter()
        .filter_map(|k| spec[k].as_array())
        .flatten()
    {
        let declared: Vec<&str> = container["ports"]
            .as_array()
            .map(|ports| ports.iter().filter_map(|p| p["name"].as_str()).collect())
            .unwrap_or_default();
        for probe in ["livenessProbe", "readinessProbe", "startupProbe"] {
            let p = &container[probe];
            for port in [&p["httpGet"]["port"], &p["tcpSocket"]["port"]] {
                if let Some(name) = port.as_str() {
                    if !declared.contains(&name) {
                        bad.push(format!("{}: {probe} port {name}", container["name"]));
                    }
                }
            }
        }
    }
    bad
}

/// The pod a workload's controller would create from its template.
fn pod_from_template(workload: &Value, name: &str, namespace: &str, node: Option<&str>) -> Value {
    let template = &workload["spec"]["template"];
    let mut spec = template["spec"].clone();
    if let Some(node) = node {
        spec["nodeName"] = json!(node);
    }
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": template["metadata"]["labels"],
            "annotations": template["metadata"]["annotations"],
        },
        "spec": spec,
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn kustomize_base_passes_a_server_side_dry_run() {
    let rig = KubeRig::start().await.expect("rig");
    let started = std::time::Instant::now();
    let built = build(&rig);
    let docs = documents(&built);

    // What a user applies, byte for byte.
    let (ok, out) = kubectl_on(&rig, "deploy.yaml", &built, DRY_RUN_APPLY);
    assert_accepted(ok, &out, docs.len());
    for object in [
        "daemonset.apps/isthmus-agent",
        "deployment.apps/isthmus-coordinator",
        "poddisruptionbudget.policy/isthmus-coordinator",
        "customresourcedefinition.apiextensions.k8s.io/wireguardpeers.isthmus.dev",
        "validatingadmissionpolicy.admissionregistration.k8s.io/isthmus-agent-writes-own-peer",
        "validatingadmissionpolicy.admissionregistration.k8s.io/isthmus-agent-renews-own-lease",
        "role.rbac.authorization.k8s.io/isthmus-agent-heartbeat",
    ] {
        assert!(out.contains(object), "{object} missing from:\n{out}");
    }

    // The image `make image` builds (ref localhost/isthmus:<workspace version>), in every
    // container, taken from the node (the cluster imported the archive), never pulled.
    let local = format!("localhost/isthmus:{}", env!("CARGO_PKG_VERSION"));
    let found = images(&docs);
    assert_eq!(
        found.len(),
        3,
        "agent, its cleanup init container, coordinator: {found:?}"
    );
    for (container, image, policy) in &found {
        assert_eq!(image, &local, "{container}: deploy/overlays/local is stale");
        assert_eq!(policy, "IfNotPresent", "{container}");
    }
    // The base names no registry; the example overlay points at one's own.
    let base = images(&documents(&build_dir(&rig, "deploy/base")));
    assert_eq!(base.len(), found.len(), "{base:?}");
    for (container, image, _) in base {
        assert_eq!(
            image, "isthmus",
            "{container}: the base must leave the image to overlays"
        );
    }
    let example = images(&documents(&build_dir(
        &rig,
        "deploy/overlays/example-registry",
    )));
    assert_eq!(example.len(), found.len(), "{example:?}");
    let registry = format!(
        "registry.example.com/platform/isthmus:{}",
        env!("CARGO_PKG_VERSION")
    );
    for (container, image, _) in example {
        assert_eq!(image, registry, "{container}");
    }

    // What the API server would quietly fix up or not check at all.
    let cluster_scoped = cluster_scoped_kinds(&rig);
    assert!(cluster_scoped.contains(&(
        "admissionregistration.k8s.io".into(),
        "ValidatingAdmissionPolicy".into()
    )));
    for doc in &docs {
        let (group, kind) = group_kind(doc);
        let name = &doc["metadata"]["name"];
        let namespace = doc["metadata"]["namespace"].as_str();
        if cluster_scoped.contains(&(group.clone(), kind.clone())) {
            assert_eq!(
                namespace, None,
                "cluster-scoped {kind} {name} has a namespace"
            );
        } else {
            assert_eq!(namespace, Some(NAMESPACE), "{kind} {name}");
        }
        assert_eq!(
            doc["metadata"]["labels"]["app.kubernetes.io/part-of"], "isthmus",
            "{kind} {name} lacks the common labels"
        );
        if doc["spec"]["template"].is_object() {
            assert_eq!(
                undeclared_probe_ports(doc),
                Vec::<String>::new(),
                "{kind} {name}"
            );
        }
    }

    // The pods: pod admission runs on them, not on the workloads. The agent's runs in
    // isthmus-system, whose Pod Security label must let hostNetwork, hostPath and
    // NET_ADMIN through; system-node-critical must resolve there.
    let agent = find(&docs, "DaemonSet", "isthmus-agent");
    let pod = pod_from_template(agent, "isthmus-agent-dry-run", NAMESPACE, Some("node-a"));
    let (ok, out) = kubectl_on(
        &rig,
        "agent-pod.yaml",
        &to_yaml(&[pod]),
        &["create", "--dry-run=server", "--validate=strict"],
    );
    assert_accepted(ok, &out, 1);

    // The coordinator's must meet the restricted Pod Security level: checked in a
    // namespace that enforces it.
    let restricted = "pss-restricted";
    rig.kubectl(&["create", "namespace", restricted]).unwrap();
    rig.kubectl(&[
        "label",
        "namespace",
        restricted,
        "pod-security.kubernetes.io/enforce=restricted",
    ])
    .unwrap();
    rig.kubectl(&[
        "create",
        "serviceaccount",
        "isthmus-coordinator",
        "-n",
        restricted,
    ])
    .unwrap();
    let coordinator = find(&docs, "Deployment", "isthmus-coordinator");
    let pod = pod_from_template(coordinator, "isthmus-coordinator-dry-run", restricted, None);
    let (ok, out) = kubectl_on(
        &rig,
        "coordinator-pod.yaml",
        &to_yaml(&[pod]),
        &["create", "--dry-run=server", "--validate=strict"],
    );
    assert_accepted(ok, &out, 1);
    eprintln!(
        "deploy/overlays/local dry runs took {:?}",
        started.elapsed()
    );
}

type Break = fn(&mut [Value]);

#[tokio::test(flavor = "multi_thread")]
async fn broken_copies_of_deploy_are_refused() {
    let rig = KubeRig::start().await.expect("rig");
    let built = build(&rig);
    let pristine = documents(&built);

    let cases: &[(&str, Break, &str)] = &[
        (
            "negative grace period",
            |d| {
                find_mut(d, "DaemonSet", "isthmus-agent")["spec"]["template"]["spec"]
                    ["terminationGracePeriodSeconds"] = json!(-1)
            },
            "terminationGracePeriodSeconds: must be >= 0",
        ),
        (
            "misspelled field",
            |d| {
                let spec =
                    &mut find_mut(d, "DaemonSet", "isthmus-agent")["spec"]["template"]["spec"];
                let account = spec["serviceAccountName"].take();
                let spec = spec.as_object_mut().unwrap();
                spec.remove("serviceAccountName");
                spec.insert("serviceAcountName".into(), account);
            },
            // Server-side apply refuses it whatever --validate says.
            ".spec.template.spec.serviceAcountName: field not declared in schema",
        ),
        (
            "no surge and no unavailability: a rollout that cannot move",
            |d| {
                find_mut(d, "DaemonSet", "isthmus-agent")["spec"]["updateStrategy"]
                    ["rollingUpdate"]["maxUnavailable"] = json!(0)
            },
            "maxUnavailable: Required value: cannot be 0 when maxSurge is 0",
        ),
        (
            "hostPath type misspelled",
            |d| {
                let volumes = find_mut(d, "DaemonSet", "isthmus-agent")["spec"]["template"]["spec"]
                    ["volumes"]
                    .as_array_mut()
                    .unwrap();
                let tun = volumes
                    .iter_mut()
                    .find(|v| v["name"] == "dev-net-tun")
                    .unwrap();
                tun["hostPath"]["type"] = json!("CharDev");
            },
            "hostPath.type: Unsupported value: \"CharDev\"",
        ),
        (
            "selector that does not match the template",
            |d| {
                find_mut(d, "Deployment", "isthmus-coordinator")["spec"]["selector"]
                    ["matchLabels"]["app.kubernetes.io/name"] = json!("coordinator")
            },
            "does not match template",
        ),
        (
            "port name longer than 15 characters",
            |d| {
                find_mut(d, "Deployment", "isthmus-coordinator")["spec"]["template"]["spec"]
                    ["containers"][0]["ports"][0]["name"] = json!("coordinator-metrics")
            },
            "ports[0].name: Invalid value: \"coordinator-metrics\"",
        ),
    ];
    for (what, break_it, expected) in cases {
        let mut docs = pristine.clone();
        break_it(&mut docs);
        let (ok, out) = kubectl_on(&rig, "broken.yaml", &to_yaml(&docs), DRY_RUN_APPLY);
        assert!(!clean(ok, &out), "{what}: accepted:\n{out}");
        assert!(
            out.contains(expected),
            "{what}: refused, but not for the expected reason ({expected:?}):\n{out}"
        );
    }

    // And the local check the API server does not make: a probe on an undeclared port.
    let mut docs = pristine.clone();
    find_mut(&mut docs, "DaemonSet", "isthmus-agent")["spec"]["template"]["spec"]["containers"]
        [0]["livenessProbe"]["httpGet"]["port"] = json!("metric");
    let agent = find(&docs, "DaemonSet", "isthmus-agent");
    assert_eq!(
        undeclared_probe_ports(agent),
        vec!["\"agent\": livenessProbe port metric".to_string()]
    );
}
