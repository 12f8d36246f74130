//! `cargo xtask setup`: installs what a fresh machine of this kind lacks, idempotently.
//!
//! Every step says what it checks, skips what is present, and fails with a message that names
//! the step. The route is the one verified in ../shared/TOOLCHAIN.md: Debian's rustc-web (a
//! second Rust toolchain that ships a prebuilt libcore for bpfel-unknown-none), linked into
//! rustup, and bpf-linker built against Debian's LLVM 22.

use std::process::Command;

use anyhow::{Context as _, bail};

use crate::task::{output, status};

/// Debian packages and why skiff needs each.
const DEBIAN_PACKAGES: &[(&str, &str)] = &[
    ("rustc-web", "Rust 1.96 that builds the eBPF programs"),
    ("cargo-web", "its cargo"),
    (
        "libstd-rust-web-dev-bpf",
        "prebuilt libcore for bpfel-unknown-none",
    ),
    ("llvm-22-dev", "LLVM that bpf-linker links against"),
    ("bpftool", "inspecting loaded programs and maps"),
    ("iproute2", "network namespaces for tests and the demo"),
    ("tcpdump", "proving what does and does not cross the wire"),
    ("socat", "test workloads"),
    ("curl", "HTTP client in end-to-end tests"),
    ("python3", "HTTP server in end-to-end tests and the demo"),
    ("redis-server", "a real service in end-to-end tests"),
    ("redis-tools", "redis-cli and redis-benchmark"),
    ("iperf3", "throughput through the service network"),
    (
        "openssl",
        "user-supplied certificates in tests, certificates for the TLS peers",
    ),
    ("sockperf", "round-trip latency in the benchmark"),
    (
        "nghttp2-client",
        "h2load: HTTP/2 through the service network in tests",
    ),
    ("nghttp2-server", "nghttpd: a real HTTP/2 server in tests"),
    (
        "graphviz",
        "dot: `skiff network status --output svg`, checked in tests",
    ),
    (
        "systemd",
        "systemd-analyze, -sysusers and -tmpfiles check deploy/systemd",
    ),
    (
        "util-linux",
        "setpriv: commands as the router's user in tests",
    ),
    (
        "chromium",
        "headless Chromium: the web console's browser test",
    ),
    ("chromium-driver", "chromedriver: WebDriver for that test"),
    ("haproxy", "a peer in the benchmark (plain and TLS relays)"),
    ("stunnel4", "a peer in the benchmark (mTLS tunnel)"),
    ("nginx-light", "a peer in the benchmark (stream proxy)"),
    ("libnginx-mod-stream", "nginx's stream (TCP proxy) module"),
    (
        "python3-venv",
        "a virtual environment for the Kubernetes manifest validators (PyPI)",
    ),
    (
        "linux-libc-dev",
        "the syscall table the seccomp profile's names are checked against",
    ),
];

/// Debian packages the VM matrix (`cargo xtask vm-test`) needs besides the above; the guests
/// run the host's own tools, so nothing else is installed for them.
const VM_PACKAGES: &[(&str, &str)] = &[
    (
        "qemu-system-x86",
        "boots the Debian kernels the matrix tests (TCG)",
    ),
    (
        "busybox-static",
        "the guest's first-stage init, inside its initramfs",
    ),
    (
        "debian-archive-keyring",
        "verifies the kernel packages of other Debian releases",
    ),
    (
        "xz-utils",
        "unpacks the Debian 13 kernel's compressed modules",
    ),
];

/// The rustup name under which Debian's toolchain is linked; router/build.rs uses it
/// (`SKIFF_EBPF_TOOLCHAIN` in .cargo/config.toml).
const TOOLCHAIN: &str = "deb196";
const BPF_LINKER_VERSION: &str = "0.13.0";

/// Runs every step, installing what is missing.
pub fn run() -> anyhow::Result<()> {
    debian_packages("Debian packages", DEBIAN_PACKAGES)
        .context("setup step 'Debian packages' failed")?;
    unpacked(&PROMETHEUS).context("setup step 'prometheus' failed")?;
    unpacked(&KUBERNETES_CLIENT).context("setup step 'kubectl' failed")?;
    validators().context("setup step 'manifest validators' failed")?;
    rustup_toolchain().context("setup step 'rustup toolchain link' failed")?;
    bpf_linker().context("setup step 'bpf-linker' failed")?;
    cgroup2().context("setup step 'cgroup v2' failed")?;
    bpffs().context("setup step 'bpffs' failed")?;
    println!("setup: everything skiff needs is installed");
    Ok(())
}

/// Makes sure setup has happened; the checks are quick, so this just runs it.
pub fn ensure() -> anyhow::Result<()> {
    run()
}

/// Installs what the VM matrix needs beyond [`run`].
pub fn ensure_vm() -> anyhow::Result<()> {
    debian_packages("VM matrix packages", VM_PACKAGES)
        .context("setup step 'VM matrix packages' failed")
}

fn step(name: &str, state: &str) {
    println!("setup: {name:<28} {state}");
}

fn debian_packages(what: &str, packages: &[(&str, &str)]) -> anyhow::Result<()> {
    let missing: Vec<&str> = packages
        .iter()
        .filter(|(pkg, _)| !dpkg_installed(pkg))
        .map(|(pkg, _)| *pkg)
        .collect();
    if missing.is_empty() {
        step(what, "present");
        return Ok(());
    }
    for (pkg, why) in packages.iter().filter(|(p, _)| missing.contains(p)) {
        step(&format!("installing {pkg}"), why);
    }
    require_root("installing Debian packages")?;
    status(Command::new("apt-get").args(["update", "-q"]))?;
    status(
        Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )?;
    Ok(())
}

/// Where setup unpacks Debian packages it needs only a binary of, without installing them.
const TOOLS_DIR: &str = "/var/cache/skiff/tools";

/// A Debian package unpacked under [`TOOLS_DIR`] instead of installed, for one binary of it.
#[derive(Debug)]
struct Unpacked {
    package: &'static str,
    binary: &'static str,
    why: &'static str,
}

/// Prometheus for the end-to-end metrics test, unpacked so that its postinst starts no
/// service on this machine (kernel-tests' `PROMETHEUS` names the binary).
const PROMETHEUS: Unpacked = Unpacked {
    package: "prometheus",
    binary: "usr/bin/prometheus",
    why: "Debian's package, unpacked without installing it (no service starts)",
};

/// Debian's kubectl 1.20, which renders the kustomize base offline. Unpacked, because this
/// machine kind may already have another package's /usr/bin/kubectl, which dpkg would refuse
/// to overwrite; and so that every machine renders with the same version.
const KUBERNETES_CLIENT: Unpacked = Unpacked {
    package: "kubernetes-client",
    binary: "usr/bin/kubectl",
    why: "Debian's kubectl 1.20, unpacked: `kubectl kustomize deploy/kubernetes` offline",
};

/// The kubectl the manifest checks run.
pub const KUBECTL: &str = "/var/cache/skiff/tools/kubernetes-client/usr/bin/kubectl";

fn unpacked(tool: &Unpacked) -> anyhow::Result<()> {
    let dir = std::path::Path::new(TOOLS_DIR).join(tool.package);
    let binary = dir.join(tool.binary);
    let name = tool.binary.rsplit('/').next().unwrap_or(tool.binary);
    if binary.exists() {
        step(name, "present (unpacked from Debian's package)");
        return Ok(());
    }
    step(&format!("fetching {}", tool.package), tool.why);
    require_root(&format!("fetching {}", tool.package))?;
    std::fs::create_dir_all(TOOLS_DIR).with_context(|| format!("failed to create {TOOLS_DIR}"))?;
    status(
        Command::new("apt-get")
            .args(["download", "-q", tool.package])
            .current_dir(TOOLS_DIR),
    )?;
    let prefix = format!("{}_", tool.package);
    let deb = std::fs::read_dir(TOOLS_DIR)?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&prefix) && n.ends_with(".deb"))
        })
        .with_context(|| format!("apt-get download left no {} package", tool.package))?;
    status(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&dir))?;
    std::fs::remove_file(&deb).with_context(|| format!("failed to remove {}", deb.display()))?;
    anyhow::ensure!(
        binary.exists(),
        "{} missing after unpacking",
        binary.display()
    );
    Ok(())
}

/// The Python tools that validate the Kubernetes manifests, pinned, in a virtual environment
/// of Debian's python3 so that neither another Python on the machine nor its packages matter.
const VALIDATORS: &[(&str, &str)] = &[
    ("kubernetes-validate", "1.37.0"),
    ("check-jsonschema", "0.39.0"),
];
const VENV: &str = "/var/cache/skiff/tools/venv";

/// A program of the validators' virtual environment.
pub fn venv_bin(name: &str) -> std::path::PathBuf {
    std::path::Path::new(VENV).join("bin").join(name)
}

fn validators() -> anyhow::Result<()> {
    let installed = |tool: &str, version: &str| {
        output(Command::new(venv_bin(tool)).arg("--version")).is_ok_and(|v| v.contains(version))
    };
    if VALIDATORS
        .iter()
        .all(|(tool, version)| installed(tool, version))
    {
        step(
            "manifest validators",
            "kubernetes-validate, check-jsonschema present",
        );
        return Ok(());
    }
    step(
        "manifest validators",
        &format!("installing kubernetes-validate and check-jsonschema from PyPI into {VENV}"),
    );
    require_root("installing the manifest validators")?;
    if !std::path::Path::new(VENV).join("bin/pip").exists() {
        status(Command::new("/usr/bin/python3").args(["-m", "venv", VENV]))?;
    }
    status(
        Command::new(venv_bin("pip"))
            .args(["install", "--quiet", "--disable-pip-version-check"])
            .args(
                VALIDATORS
                    .iter()
                    .map(|(tool, version)| format!("{tool}=={version}")),
            ),
    )?;
    for (tool, version) in VALIDATORS {
        anyhow::ensure!(
            installed(tool, version),
            "{tool} {version} missing after pip install"
        );
    }
    Ok(())
}

fn dpkg_installed(pkg: &str) -> bool {
    output(Command::new("dpkg-query").args(["-W", "-f=${Status}", pkg]))
        .is_ok_and(|s| s.contains("install ok installed"))
}

fn rustup_toolchain() -> anyhow::Result<()> {
    let list = output(Command::new("rustup").args(["toolchain", "list"]))
        .context("rustup is needed to address the eBPF toolchain")?;
    if list
        .lines()
        .any(|l| l.split_whitespace().next() == Some(TOOLCHAIN))
    {
        step("rustup toolchain", &format!("{TOOLCHAIN} linked"));
        return Ok(());
    }
    step(
        "rustup toolchain",
        &format!("linking {TOOLCHAIN} -> /usr (Debian rustc-web)"),
    );
    status(Command::new("rustup").args(["toolchain", "link", TOOLCHAIN, "/usr"]))
}

fn bpf_linker() -> anyhow::Result<()> {
    if let Ok(version) = output(Command::new("bpf-linker").arg("--version"))
        && version.contains(BPF_LINKER_VERSION)
    {
        step("bpf-linker", &format!("{BPF_LINKER_VERSION} present"));
        return Ok(());
    }
    step(
        "bpf-linker",
        &format!("building {BPF_LINKER_VERSION} against LLVM 22 (about 3 minutes on 2 cores)"),
    );
    require_root("installing bpf-linker into /usr/local")?;
    // Debian's cargo and rustc, outside this workspace so that none of its config applies.
    status(
        Command::new("/usr/bin/cargo")
            .args(["install", "bpf-linker", "--version", BPF_LINKER_VERSION])
            .args(["--locked", "--no-default-features", "--features", "llvm-22"])
            .args(["--root", "/usr/local"])
            .env("LLVM_PREFIX", "/usr/lib/llvm-22")
            .env("RUSTC", "/usr/bin/rustc")
            .env_remove("RUSTC_BOOTSTRAP")
            .current_dir("/"),
    )
}

fn cgroup2() -> anyhow::Result<()> {
    let mounts = std::fs::read_to_string("/proc/mounts").context("failed to read /proc/mounts")?;
    match mounts
        .lines()
        .find(|l| l.split_whitespace().nth(2) == Some("cgroup2"))
    {
        Some(line) => {
            let dir = line.split_whitespace().nth(1).unwrap_or("?");
            step("cgroup v2", &format!("mounted at {dir}"));
            Ok(())
        }
        None => {
            bail!("no cgroup2 file system is mounted; skiff's kernel hooks attach to cgroup v2")
        }
    }
}

/// The router pins its maps and links under bpffs; mount it where BPF tooling expects it.
fn bpffs() -> anyhow::Result<()> {
    let mounts = std::fs::read_to_string("/proc/mounts").context("failed to read /proc/mounts")?;
    if let Some(line) = mounts
        .lines()
        .find(|l| l.split_whitespace().nth(2) == Some("bpf"))
    {
        let dir = line.split_whitespace().nth(1).unwrap_or("?");
        step("bpffs", &format!("mounted at {dir}"));
        return Ok(());
    }
    step("bpffs", "mounting at /sys/fs/bpf (eBPF pins)");
    require_root("mounting bpffs")?;
    status(Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"]))
}

fn require_root(what: &str) -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("{what} needs root: run `cargo xtask setup` as root");
    }
    Ok(())
}
