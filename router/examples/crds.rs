//! Writes the CRDs generated from the resource kinds into a directory (`cargo xtask crds`
//! runs this with deploy/kubernetes/crds).

use anyhow::Context as _;

fn main() -> anyhow::Result<()> {
    let dir = std::env::args_os().nth(1).context("usage: crds DIR")?;
    let dir = std::path::PathBuf::from(dir);
    std::fs::create_dir_all(&dir).with_context(|| format!("failed to create {}", dir.display()))?;
    // Files no kind generates any more go, so the directory is exactly the kinds.
    for entry in std::fs::read_dir(&dir)? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "yaml") {
            std::fs::remove_file(&path)
                .with_context(|| format!("failed to remove {}", path.display()))?;
        }
    }
    for (name, text) in router::resource::crd::files()? {
        let path = dir.join(name);
        std::fs::write(&path, text)
            .with_context(|| format!("failed to write {}", path.display()))?;
        println!("crds: wrote {}", path.display());
    }
    Ok(())
}
