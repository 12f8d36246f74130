//! The Kubernetes side of deploy/: the CRDs generated from the router's resource types, and
//! the offline validation of the kustomize base and the example resources.

use crate::task::{cargo, status, workspace_root};

/// Where the generated CRDs live (router/src/resource/crd.rs checks them against the types).
const CRDS: &str = "deploy/kubernetes/crds";

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
