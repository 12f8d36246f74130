//! Debian kernels for the VM matrix: fetched with a private apt configuration (the host's own
//! /etc/apt is never changed), unpacked, and given an initramfs of their own.
//!
//! Cache layout under the cache directory:
//! ```text
//! apt/<suite>/        apt.conf, sources.list, lists and state of one Debian suite
//! debs/               the downloaded linux-image packages
//! kernels/<suite>/    vmlinuz, config, initramfs.cpio and `package` (the .deb they came from)
//! ```

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, SystemTime},
};

use anyhow::{Context as _, bail, ensure};

use super::initramfs::Cpio;
use crate::task::{output, status};

/// A Debian release whose kernel the matrix boots.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Release {
    /// The kernel series users know it by (`--kernel 6.1`).
    pub label: &'static str,
    /// The Debian suite that ships it.
    pub suite: &'static str,
    /// Why socket acceleration cannot work on it, if it cannot: the VM matrix then runs only
    /// the accel test that checks the router says so.
    pub no_accel: Option<&'static str>,
}

/// Debian 11, 12 and 13: the gateway kernels skiff supports.
pub const RELEASES: &[Release] = &[
    Release {
        label: "5.10",
        suite: "bullseye",
        no_accel: Some("no SO_NETNS_COOKIE before Linux 5.14"),
    },
    Release {
        label: "6.1",
        suite: "bookworm",
        no_accel: None,
    },
    Release {
        label: "6.12",
        suite: "trixie",
        no_accel: None,
    },
];

/// Modules the guest loads at boot, before anything could ask for them: the kernel has no
/// modprobe to call in the guest, so whatever the tests reach must be in already.
const MODULES: &[&str] = &[
    // The host's root file system over virtio-9p, and entropy for early getrandom.
    "virtio_pci",
    "9pnet_virtio",
    "9p",
    "virtio_rng",
    // What the tests build: veth pairs, bridges, and `ss` / sock_diag queries.
    "veth",
    "bridge",
    "inet_diag",
    "tcp_diag",
    "udp_diag",
    "unix_diag",
];

/// How long a fetched kernel is used before apt is asked whether a newer one exists.
const REFRESH_AFTER: Duration = Duration::from_secs(7 * 24 * 3600);

/// One kernel, ready to boot.
#[derive(Debug, Clone)]
pub struct Kernel {
    pub release: Release,
    /// `uname -r` in the guest.
    pub version: String,
    pub vmlinuz: PathBuf,
    pub initramfs: PathBuf,
    /// The Debian package it came from (`linux-image-6.1.0-50-amd64_6.1.176-1_amd64.deb`).
    pub package: String,
}

/// Makes `release`'s kernel ready under `cache`, fetching it when it is missing or stale.
///
/// `init` is the guest's first-stage init script, put into the initramfs.
pub fn prepare(cache: &Path, release: Release, init: &str) -> anyhow::Result<Kernel> {
    let dir = cache.join("kernels").join(release.suite);
    let fresh = fs::metadata(dir.join("package"))
        .and_then(|m| m.modified())
        .is_ok_and(|t| SystemTime::now().duration_since(t).unwrap_or_default() < REFRESH_AFTER);
    if fresh && let Ok(kernel) = cached(&dir, release, init) {
        println!(
            "vm-test: kernel {:<5} {} (cached)",
            release.label, kernel.version
        );
        return Ok(kernel);
    }
    let apt = Apt::new(cache, release.suite)?;
    apt.update()?;
    let package = apt.kernel_package()?;
    let debs = cache.join("debs");
    fs::create_dir_all(&debs)?;
    let deb = apt.download(&package, &debs)?;
    let deb_name = file_name(&deb)?;
    if fs::read_to_string(dir.join("package")).is_ok_and(|p| p.trim() == deb_name)
        && let Ok(kernel) = cached(&dir, release, init)
    {
        // Still the newest: look again in a week.
        fs::write(dir.join("package"), format!("{deb_name}\n"))?;
        println!(
            "vm-test: kernel {:<5} {} (cached, still the newest)",
            release.label, kernel.version
        );
        return Ok(kernel);
    }
    println!("vm-test: kernel {:<5} unpacking {deb_name}", release.label);
    unpack(&deb, &dir, init)?;
    cached(&dir, release, init)
}

/// The kernel in `dir`, with its initramfs rebuilt when the init script changed.
fn cached(dir: &Path, release: Release, init: &str) -> anyhow::Result<Kernel> {
    let package = fs::read_to_string(dir.join("package"))?.trim().to_owned();
    let version = fs::read_to_string(dir.join("version"))?.trim().to_owned();
    let initramfs = dir.join("initramfs.cpio");
    let stored_init = fs::read_to_string(dir.join("init")).unwrap_or_default();
    ensure!(
        stored_init == init && initramfs.exists(),
        "initramfs is out of date"
    );
    Ok(Kernel {
        release,
        version,
        vmlinuz: dir.join("vmlinuz"),
        initramfs,
        package,
    })
}

/// Unpacks `deb` into `dir`: the kernel image, its config and an initramfs with the modules
/// the guest needs. The rest of the package (hundreds of MB of modules) is not kept.
fn unpack(deb: &Path, dir: &Path, init: &str) -> anyhow::Result<()> {
    let staging = dir.with_extension("unpack");
    let _ = fs::remove_dir_all(&staging);
    fs::create_dir_all(&staging)?;
    let result = (|| {
        status(Command::new("dpkg-deb").arg("-x").arg(deb).arg(&staging))?;
        let boot = staging.join("boot");
        let vmlinuz = fs::read_dir(&boot)
            .with_context(|| format!("no boot/ in {}", deb.display()))?
            .filter_map(Result::ok)
            .map(|e| e.path())
            .find(|p| file_name(p).is_ok_and(|n| n.starts_with("vmlinuz-")))
            .with_context(|| format!("no vmlinuz in {}", deb.display()))?;
        let version = file_name(&vmlinuz)?
            .strip_prefix("vmlinuz-")
            .context("vmlinuz name")?
            .to_owned();
        // Debian 13 keeps modules under /usr (merged /usr), earlier releases under /lib.
        let modules = ["lib/modules", "usr/lib/modules"]
            .iter()
            .map(|m| staging.join(m).join(&version))
            .find(|p| p.is_dir())
            .with_context(|| format!("no modules for {version} in {}", deb.display()))?;
        let initramfs = initramfs(&modules, init)?;

        let _ = fs::remove_dir_all(dir);
        fs::create_dir_all(dir)?;
        fs::copy(&vmlinuz, dir.join("vmlinuz"))?;
        fs::copy(boot.join(format!("config-{version}")), dir.join("config"))?;
        fs::write(dir.join("initramfs.cpio"), initramfs)?;
        fs::write(dir.join("init"), init)?;
        fs::write(dir.join("version"), format!("{version}\n"))?;
        // Written last: its presence says the rest is complete.
        fs::write(dir.join("package"), format!("{}\n", file_name(deb)?))?;
        anyhow::Ok(())
    })();
    let _ = fs::remove_dir_all(&staging);
    result.with_context(|| format!("failed to unpack {}", deb.display()))
}

/// An initramfs: busybox, the modules in load order, and `init`.
fn initramfs(modules: &Path, init: &str) -> anyhow::Result<Vec<u8>> {
    let busybox = fs::read("/bin/busybox").context("busybox-static is not installed")?;
    let index = ModuleIndex::scan(modules)?;
    let order = index.load_order(MODULES)?;
    let mut cpio = Cpio::default();
    for dir in ["bin", "dev", "proc", "sys", "newroot", "lib", "lib/modules"] {
        cpio.dir(dir);
    }
    cpio.char_device("dev/console", 5, 1);
    cpio.file("bin/busybox", 0o755, &busybox);
    cpio.file("init", 0o755, init.as_bytes());
    let mut list = String::new();
    for name in &order {
        let path = &index.paths[name];
        cpio.file(
            &format!("lib/modules/{name}.ko"),
            0o644,
            &ModuleIndex::read(path)?,
        );
        list.push_str(name);
        list.push('\n');
    }
    cpio.file("lib/modules/order", 0o644, list.as_bytes());
    Ok(cpio.finish())
}

/// The modules of one kernel, by name, and what each depends on (read from the modules
/// themselves: the package has no modules.dep, depmod makes it on install).
#[derive(Debug)]
struct ModuleIndex {
    paths: BTreeMap<String, PathBuf>,
    builtin: BTreeSet<String>,
}

impl ModuleIndex {
    fn scan(dir: &Path) -> anyhow::Result<Self> {
        let mut paths = BTreeMap::new();
        let mut stack = vec![dir.to_owned()];
        while let Some(d) = stack.pop() {
            for entry in fs::read_dir(&d)? {
                let path = entry?.path();
                if path.is_dir() {
                    stack.push(path);
                } else if let Some(stem) = file_name(&path)?.split(".ko").next()
                    && file_name(&path)?.contains(".ko")
                {
                    paths.insert(stem.replace('-', "_"), path);
                }
            }
        }
        let builtin = fs::read_to_string(dir.join("modules.builtin"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| Some(l.rsplit('/').next()?.strip_suffix(".ko")?.replace('-', "_")))
            .collect();
        Ok(Self { paths, builtin })
    }

    /// A module's bytes, decompressed.
    fn read(path: &Path) -> anyhow::Result<Vec<u8>> {
        let name = file_name(path)?;
        let tool = if name.ends_with(".xz") {
            "xz"
        } else if name.ends_with(".zst") {
            "zstd"
        } else {
            return Ok(fs::read(path)?);
        };
        let out = Command::new(tool)
            .arg("-dc")
            .arg(path)
            .output()
            .with_context(|| format!("failed to start {tool}"))?;
        ensure!(out.status.success(), "{tool} -dc {} failed", path.display());
        Ok(out.stdout)
    }

    /// The `depends=` field of a module's .modinfo.
    fn depends(&self, name: &str) -> anyhow::Result<Vec<String>> {
        let bytes = Self::read(&self.paths[name])?;
        let needle = b"\0depends=";
        let Some(at) = bytes.windows(needle.len()).position(|w| w == needle) else {
            return Ok(Vec::new());
        };
        let rest = &bytes[at + needle.len()..];
        let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
        Ok(String::from_utf8_lossy(&rest[..end])
            .split(',')
            .filter(|d| !d.is_empty())
            .map(|d| d.replace('-', "_"))
            .collect())
    }

    /// `wanted` and everything they depend on, each after its dependencies; built-in ones
    /// are left out.
    fn load_order(&self, wanted: &[&str]) -> anyhow::Result<Vec<String>> {
        let mut order = Vec::new();
        for name in wanted {
            self.visit(name, &mut order, &mut Vec::new())?;
        }
        Ok(order)
    }

    fn visit(
        &self,
        name: &str,
        order: &mut Vec<String>,
        path: &mut Vec<String>,
    ) -> anyhow::Result<()> {
        if order.iter().any(|m| m == name) || self.builtin.contains(name) {
            return Ok(());
        }
        if !self.paths.contains_key(name) {
            bail!("the kernel has no module {name} and does not build it in");
        }
        ensure!(
            !path.iter().any(|m| m == name),
            "module dependency cycle at {name}"
        );
        path.push(name.to_owned());
        for dep in self.depends(name)? {
            self.visit(&dep, order, path)?;
        }
        path.pop();
        order.push(name.to_owned());
        Ok(())
    }
}

/// apt with a configuration of its own for one suite: its lists and state live in the cache,
/// and only the host's Debian mirror and keyring are shared.
#[derive(Debug)]
struct Apt {
    conf: PathBuf,
}

impl Apt {
    fn new(cache: &Path, suite: &str) -> anyhow::Result<Self> {
        let dir = cache.join("apt").join(suite);
        for sub in [
            "etc/apt.conf.d",
            "etc/preferences.d",
            "lists/partial",
            "cache",
        ] {
            fs::create_dir_all(dir.join(sub))?;
        }
        let status_file = dir.join("status");
        if !status_file.exists() {
            fs::write(&status_file, "")?;
        }
        let mirror = debian_mirror()?;
        fs::write(
            dir.join("etc/sources.list"),
            format!(
                "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] {mirror} {suite} main\n"
            ),
        )?;
        let d = dir.display();
        // Read through APT_CONFIG before anything else, so that none of /etc/apt applies.
        fs::write(
            dir.join("apt.conf"),
            format!(
                "Dir::Etc \"{d}/etc\";\n\
                 Dir::State \"{d}\";\n\
                 Dir::State::Lists \"{d}/lists\";\n\
                 Dir::State::status \"{d}/status\";\n\
                 Dir::Cache \"{d}/cache\";\n\
                 APT::Architecture \"amd64\";\n\
                 APT::Sandbox::User \"root\";\n\
                 Acquire::Languages \"none\";\n\
                 Debug::NoLocking \"true\";\n"
            ),
        )?;
        Ok(Self {
            conf: dir.join("apt.conf"),
        })
    }

    fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new(program);
        cmd.env("APT_CONFIG", &self.conf);
        cmd
    }

    fn update(&self) -> anyhow::Result<()> {
        status(self.command("apt-get").args(["update", "-qq"]))
    }

    /// The versioned package `linux-image-amd64` points at in this suite.
    fn kernel_package(&self) -> anyhow::Result<String> {
        let deps = output(
            self.command("apt-cache")
                .args(["depends", "linux-image-amd64"]),
        )?;
        deps.lines()
            .filter_map(|l| l.trim().strip_prefix("Depends: "))
            .find(|p| p.starts_with("linux-image-"))
            .map(str::to_owned)
            .context("linux-image-amd64 depends on no linux-image package")
    }

    /// Downloads `package` into `dir` unless it is there already; returns the file.
    fn download(&self, package: &str, dir: &Path) -> anyhow::Result<PathBuf> {
        let uri = output(
            self.command("apt-get")
                .args(["download", "--print-uris", package]),
        )?;
        // 'URL' linux-image-..._amd64.deb SIZE SHA256:...
        let name = uri
            .split_whitespace()
            .nth(1)
            .context("apt printed no file name")?
            .to_owned();
        let file = dir.join(&name);
        if file.exists() {
            return Ok(file);
        }
        println!("vm-test: downloading {name}");
        status(
            self.command("apt-get")
                .args(["download", "-q", package])
                .current_dir(dir),
        )?;
        // apt names the file with the version's epoch escaped; find what it wrote.
        ensure!(
            file.exists(),
            "apt-get download wrote no {}",
            file.display()
        );
        Ok(file)
    }
}

/// The Debian mirror the host's own apt sources use (`$SKIFF_VM_MIRROR` overrides it).
fn debian_mirror() -> anyhow::Result<String> {
    if let Ok(mirror) = std::env::var("SKIFF_VM_MIRROR") {
        return Ok(mirror);
    }
    let mut texts = Vec::new();
    if let Ok(text) = fs::read_to_string("/etc/apt/sources.list") {
        texts.push(text);
    }
    if let Ok(dir) = fs::read_dir("/etc/apt/sources.list.d") {
        for entry in dir.filter_map(Result::ok) {
            let path = entry.path();
            let ext = path.extension().and_then(|e| e.to_str());
            if matches!(ext, Some("list" | "sources")) {
                texts.push(fs::read_to_string(&path).unwrap_or_default());
            }
        }
    }
    texts
        .iter()
        .flat_map(|t| t.lines())
        .filter_map(|line| {
            let line = line.trim();
            // deb822 (`URIs: ...`) and one-line (`deb [opts] URI suite ...`) forms.
            let uri = if let Some(uris) = line.strip_prefix("URIs:") {
                uris.split_whitespace().next()?
            } else if let Some(rest) = line.strip_prefix("deb ") {
                rest.split_whitespace().find(|w| w.contains("://"))?
            } else {
                return None;
            };
            Some(uri.trim_end_matches('/').to_owned())
        })
        .find(|uri| uri.ends_with("/debian"))
        .context("no Debian mirror in /etc/apt's sources; set SKIFF_VM_MIRROR")
}

fn file_name(path: &Path) -> anyhow::Result<&str> {
    path.file_name()
        .and_then(|n| n.to_str())
        .with_context(|| format!("{} has no UTF-8 file name", path.display()))
}
