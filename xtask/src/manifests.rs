//! The Kubernetes side of deploy/: the CRDs generated from the router's resource types, and
//! the offline validation of the kustomize base and the example resources.
//!
//! No API server can run here, so the checks are the ones that need none: the base is
//! rendered with Debian's kubectl (`kubectl kustomize`), every built-in object it renders is
//! validated with `kubernetes-validate --strict` against Kubernetes' own schemas, and every
//! example resource with `check-jsonschema` against its CRD's openAPIV3Schema, turned into a
//! JSON Schema that refuses unknown fields as the API server's strict field validation does.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail, ensure};
use serde_json::{Value, json};

use crate::{
    setup,
    task::{cargo, status, workspace_root},
};

/// Where the generated CRDs live (router/src/resource/crd.rs checks them against the types).
const CRDS: &str = "deploy/kubernetes/crds";
const BASE: &str = "deploy/kubernetes";
const EXAMPLES: &str = "deploy/kubernetes/examples";
/// The Kubernetes version the manifests are checked against (k8s-openapi's `v1_33` too).
const KUBERNETES: &str = "1.33.0";

/// `cargo xtask crds`: regenerates the CRD files from the resource types. xtask cannot link
/// the router itself (that would need the eBPF toolchain before `setup` could install it),
/// so the router's `crds` example writes them.
pub fn write_crds() -> anyhow::Result<()> {
    let dir = workspace_root().join(CRDS);
    status(
        cargo()
            .args([
                "run",
                "--quiet",
                "--package",
                "router",
                "--example",
                "crds",
                "--",
            ])
            .arg(&dir),
    )
}

/// Renders the base and validates it and the examples; the first failure is the error.
pub fn validate() -> anyhow::Result<()> {
    let root = workspace_root();
    let scratch = Scratch::new()?;
    let rendered = render(&root.join(BASE))?;
    let objects = serde_yaml_ng::Deserializer::from_str(&rendered).count();
    let file = scratch.write("rendered.yaml", &rendered)?;
    validate_builtin(&file).context("kubectl kustomize deploy/kubernetes")?;
    println!(
        "manifests: {objects} objects rendered from {BASE}, valid for Kubernetes {KUBERNETES}"
    );
    let crds = crds(&root.join(CRDS))?;
    let mut examples: Vec<PathBuf> = std::fs::read_dir(root.join(EXAMPLES))?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<_, _>>()?;
    examples.sort();
    for example in &examples {
        validate_resource(&scratch, &crds, example).with_context(|| {
            format!(
                "{}",
                example.strip_prefix(&root).unwrap_or(example).display()
            )
        })?;
    }
    println!(
        "manifests: {} examples valid against their CRDs' schemas",
        examples.len()
    );
    Ok(())
}

/// `kubectl kustomize DIR`, offline.
fn render(dir: &Path) -> anyhow::Result<String> {
    let out = Command::new(setup::KUBECTL)
        .arg("kustomize")
        .arg(dir)
        .output()
        .with_context(|| format!("failed to run {} (run `cargo xtask setup`)", setup::KUBECTL))?;
    ensure!(
        out.status.success(),
        "kubectl kustomize {} failed: {}",
        dir.display(),
        first_line(&String::from_utf8_lossy(&out.stderr))
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Every object in `file` against Kubernetes' schemas, unknown fields refused.
fn validate_builtin(file: &Path) -> anyhow::Result<()> {
    let tool = setup::venv_bin("kubernetes-validate");
    let out = Command::new(&tool)
        .args(["--strict", "--quiet", "--kubernetes-version", KUBERNETES])
        .arg(file)
        .output()
        .with_context(|| format!("failed to run {} (run `cargo xtask setup`)", tool.display()))?;
    if out.status.success() {
        return Ok(());
    }
    let text = String::from_utf8_lossy(&out.stdout) + String::from_utf8_lossy(&out.stderr);
    let reason = text.lines().find(|l| l.starts_with("ERROR")).map_or_else(
        || first_line(&text),
        |l| l.trim_start_matches("ERROR ").to_owned(),
    );
    bail!("kubernetes-validate: {reason}")
}

/// The CRDs by kind.
fn crds(dir: &Path) -> anyhow::Result<Vec<(String, Value)>> {
    let mut crds = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let text = std::fs::read_to_string(&path)?;
        let crd: Value = serde_yaml_ng::from_str(&text)
            .with_context(|| format!("{} is not YAML", path.display()))?;
        let kind = crd["spec"]["names"]["kind"]
            .as_str()
            .with_context(|| format!("{} names no kind", path.display()))?
            .to_owned();
        crds.push((kind, crd));
    }
    Ok(crds)
}

/// One example resource (one document) against its CRD's schema.
fn validate_resource(
    scratch: &Scratch,
    crds: &[(String, Value)],
    file: &Path,
) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(file)?;
    let resource: Value = serde_yaml_ng::from_str(&text).context("not a single YAML document")?;
    let kind = resource["kind"].as_str().context("no kind")?;
    let (_, crd) = crds
        .iter()
        .find(|(k, _)| k == kind)
        .with_context(|| format!("no CRD for kind {kind}"))?;
    let schema = json_schema(crd)?;
    let schema_file = scratch.write(&format!("{kind}.schema.json"), &schema.to_string())?;
    let tool = setup::venv_bin("check-jsonschema");
    let out = Command::new(&tool)
        .arg("--schemafile")
        .arg(&schema_file)
        .arg(file)
        .output()
        .with_context(|| format!("failed to run {} (run `cargo xtask setup`)", tool.display()))?;
    if out.status.success() {
        return Ok(());
    }
    let text = String::from_utf8_lossy(&out.stdout) + String::from_utf8_lossy(&out.stderr);
    // "  FILE::$.spec: Additional properties are not allowed ('prot' was unexpected)"
    let reason = text
        .lines()
        .find_map(|l| l.split_once("::").map(|(_, r)| r.trim().to_owned()))
        .unwrap_or_else(|| first_line(&text));
    bail!("check-jsonschema: {reason}")
}

/// The JSON Schema of a CRD's (only) version: its openAPIV3Schema with `nullable` spelt as
/// JSON Schema spells it, unknown fields refused where the API server prunes or (with strict
/// field validation, kubectl's default) refuses them, and the object's own header.
fn json_schema(crd: &Value) -> anyhow::Result<Value> {
    let group = crd["spec"]["group"].as_str().context("CRD without group")?;
    let version = &crd["spec"]["versions"][0];
    let name = version["name"].as_str().context("CRD without version")?;
    let kind = crd["spec"]["names"]["kind"]
        .as_str()
        .context("CRD without kind")?;
    let mut schema = version["schema"]["openAPIV3Schema"].clone();
    ensure!(schema.is_object(), "CRD {kind} has no openAPIV3Schema");
    strict(&mut schema);
    let properties = schema["properties"]
        .as_object_mut()
        .context("schema without properties")?;
    properties.insert(
        "apiVersion".into(),
        json!({"const": format!("{group}/{name}")}),
    );
    properties.insert("kind".into(), json!({"const": kind}));
    properties.insert(
        "metadata".into(),
        json!({"type": "object", "required": ["name"], "properties": {"name": {"type": "string"}}}),
    );
    schema["required"] = json!(["apiVersion", "kind", "metadata", "spec"]);
    schema["$schema"] = json!("https://json-schema.org/draft/2020-12/schema");
    Ok(schema)
}

fn strict(schema: &mut Value) {
    let Some(object) = schema.as_object_mut() else {
        return;
    };
    if object.remove("nullable") == Some(Value::Bool(true))
        && let Some(Value::String(t)) = object.get("type").cloned()
    {
        object.insert("type".into(), json!([t, "null"]));
    }
    let open = object.get("x-kubernetes-preserve-unknown-fields") == Some(&Value::Bool(true));
    if object.contains_key("properties") && !open && !object.contains_key("additionalProperties") {
        object.insert("additionalProperties".into(), Value::Bool(false));
    }
    for key in ["properties"] {
        if let Some(Value::Object(children)) = object.get_mut(key) {
            children.values_mut().for_each(strict);
        }
    }
    for key in ["items", "additionalProperties"] {
        if let Some(child) = object.get_mut(key) {
            strict(child);
        }
    }
}

fn first_line(text: &str) -> String {
    text.lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or("no output")
        .to_owned()
}

/// A directory of its own under the system's temporary directory, removed on drop.
#[derive(Debug)]
struct Scratch(PathBuf);

impl Scratch {
    fn new() -> anyhow::Result<Self> {
        use std::sync::atomic::{AtomicU32, Ordering};
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "skiff-manifests-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir(&dir).with_context(|| format!("failed to create {}", dir.display()))?;
        Ok(Self(dir))
    }

    fn write(&self, name: &str, text: &str) -> anyhow::Result<PathBuf> {
        let path = self.0.join(name);
        std::fs::write(&path, text)
            .with_context(|| format!("failed to write {}", path.display()))?;
        Ok(path)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[cfg(test)]
mod tests {
    //! These run the real tools `cargo xtask setup` installs: a check that cannot fail is no
    //! check, so each kind of mistake is shown to be refused.

    use super::*;

    fn rendered() -> String {
        render(&workspace_root().join(BASE)).expect("the base renders")
    }

    #[test]
    fn the_base_and_the_examples_validate() {
        validate().expect("valid");
    }

    #[test]
    fn a_typo_in_a_rendered_object_is_refused() {
        let scratch = Scratch::new().expect("scratch");
        let typo = rendered().replace("hostNetwork: true", "hostNetwrok: true");
        let file = scratch.write("typo.yaml", &typo).expect("written");
        let err = validate_builtin(&file).expect_err("an unknown field");
        assert!(
            err.to_string().contains("'hostNetwrok' was unexpected"),
            "{err}"
        );
    }

    #[test]
    fn a_typo_or_a_wrong_type_in_a_resource_is_refused() {
        let root = workspace_root();
        let crds = crds(&root.join(CRDS)).expect("crds");
        let scratch = Scratch::new().expect("scratch");
        let listener = std::fs::read_to_string(root.join(EXAMPLES).join("listener.yaml"))
            .expect("the listener example");
        for (bad, reason) in [
            (
                listener.replace("port: 8080", "prot: 8080"),
                "'prot' was unexpected",
            ),
            (
                listener.replace("port: 8080", "port: http"),
                "is not of type 'integer'",
            ),
            (
                listener.replace("port: 8080", "port: 70000"),
                "70000 is greater than the maximum",
            ),
            (
                listener.replace("skiff.io/v1alpha1", "skiff.io/v2"),
                "'skiff.io/v1alpha1' was expected",
            ),
        ] {
            let file = scratch.write("bad.yaml", &bad).expect("written");
            let err = validate_resource(&scratch, &crds, &file).expect_err(reason);
            assert!(err.to_string().contains(reason), "{err}");
        }
    }

    #[test]
    fn the_seccomp_profile_allows_io_uring_and_bpf_and_names_only_real_syscalls() {
        let text = std::fs::read_to_string(workspace_root().join(BASE).join("seccomp/skiff.json"))
            .expect("the profile");
        let profile: Value = serde_json::from_str(&text).expect("JSON");
        assert_eq!(profile["defaultAction"], "SCMP_ACT_ERRNO");
        let allowed: Vec<&str> = profile["syscalls"]
            .as_array()
            .expect("syscalls")
            .iter()
            .filter(|rule| rule["action"] == "SCMP_ACT_ALLOW" && rule.get("args").is_none())
            .flat_map(|rule| rule["names"].as_array().expect("names"))
            .map(|name| name.as_str().expect("a name"))
            .collect();
        for needed in [
            "io_uring_setup",
            "io_uring_enter",
            "io_uring_register",
            "bpf",
            "setresuid",
            "capset",
        ] {
            assert!(allowed.contains(&needed), "{needed} not allowed");
        }
        for refused in [
            "ptrace",
            "mount",
            "unshare",
            "setns",
            "kexec_load",
            "init_module",
        ] {
            assert!(!allowed.contains(&refused), "{refused} allowed");
        }
        // A misspelt name would be skipped by the runtime, silently refusing the call.
        let table = std::fs::read_to_string("/usr/include/x86_64-linux-gnu/asm/unistd_64.h")
            .expect("the kernel's syscall table (linux-libc-dev)");
        for name in &allowed {
            assert!(
                table.contains(&format!("#define __NR_{name} ")),
                "{name} is no syscall"
            );
        }
    }
}
