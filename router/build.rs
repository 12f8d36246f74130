//! Builds the eBPF programs (`ebpf/`) for bpfel-unknown-none with the toolchain that ships a
//! prebuilt libcore for that target, so that the router binary embeds them. See
//! ../shared/TOOLCHAIN.md for why this toolchain and not `-Z build-std`.

use std::{env, path::Path, process::Command};

use anyhow::Context as _;

fn main() -> anyhow::Result<()> {
    println!("cargo::rerun-if-env-changed=SKIFF_EBPF_TOOLCHAIN");
    let toolchain = env::var("SKIFF_EBPF_TOOLCHAIN").unwrap_or_else(|_| "deb196".to_owned());

    if let Some(missing) = missing_prerequisite(&toolchain) {
        // One line that says what to do, instead of a linker backtrace from deep inside cargo.
        println!(
            "cargo::error=cannot build the eBPF programs: {missing}; run `cargo xtask setup` (as root)"
        );
        return Ok(());
    }

    let manifest_dir = env::var("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR not set")?;
    let ebpf_dir = Path::new(&manifest_dir).join("../ebpf");
    let ebpf_dir = ebpf_dir.to_str().context("eBPF crate path is not UTF-8")?;
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "ebpf",
            root_dir: ebpf_dir,
            ..Default::default()
        }],
        aya_build::Toolchain::Custom(&toolchain),
    )
}

/// The first missing piece of the eBPF toolchain, if any.
fn missing_prerequisite(toolchain: &str) -> Option<String> {
    let on_path = |tool: &str| {
        Command::new(tool)
            .arg("--version")
            .output()
            .is_ok_and(|out| out.status.success())
    };
    if !on_path("bpf-linker") {
        return Some("bpf-linker is not on PATH".to_owned());
    }
    let listed = Command::new("rustup")
        .args(["toolchain", "list"])
        .output()
        .map(|out| String::from_utf8_lossy(&out.stdout).into_owned());
    match listed {
        Ok(list)
            if !list
                .lines()
                .any(|l| l.split_whitespace().next() == Some(toolchain)) =>
        {
            Some(format!("rustup has no toolchain named {toolchain}"))
        }
        _ => None,
    }
}
