//! Where the kubelet puts a pod's cgroup v2 directory, under each of its layouts, and finding
//! it by looking.
//!
//! The kubelet makes one directory per pod under a `kubepods` root, in a QoS-class directory
//! for burstable and best-effort pods and directly under the root for guaranteed ones; the
//! container runtime makes one per container inside it:
//!
//! | driver | pod directory |
//! |---|---|
//! | cgroupfs | `kubepods/burstable/pod<uid>/<container-id>` (CRI-O: `crio-<id>`) |
//! | systemd | `kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid_with_underscores>.slice/cri-containerd-<id>.scope` (CRI-O: `crio-<id>.scope`) |
//!
//! The root may sit anywhere: under the cgroup2 mount on a plain node, under
//! `kubelet.slice/kubelet-kubepods.slice` with `--cgroup-root=/kubelet` (kind), and under a
//! node container's own cgroup when nodes are containers (kind again, seen from the host). So
//! the roots are found by walking the cgroup trees of every cgroup2 mount in /proc/mounts,
//! never assumed. A systemd root's stem prefixes every slice below it
//! (`kubelet-kubepods-besteffort-pod<uid>.slice`), since systemd spells a slice's ancestry in
//! its name.
//!
//! The pod's own directory is what a namespace registers: every container the pod runs, now
//! or after a restart, is in its subtree, and the connect hooks look for the nearest
//! registered ancestor.

use std::{
    collections::BTreeSet,
    fs,
    path::{Path, PathBuf},
};

/// A pod's quality-of-service class, as `status.qosClass` spells it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Qos {
    Guaranteed,
    Burstable,
    BestEffort,
}

impl Qos {
    /// Every class, in the order a pod without a known class is looked for.
    pub const ALL: [Self; 3] = [Self::Burstable, Self::BestEffort, Self::Guaranteed];

    /// From `status.qosClass`.
    #[must_use]
    pub fn parse(class: &str) -> Option<Self> {
        match class {
            "Guaranteed" => Some(Self::Guaranteed),
            "Burstable" => Some(Self::Burstable),
            "BestEffort" => Some(Self::BestEffort),
            _ => None,
        }
    }

    /// The class's directory word (guaranteed pods have none: they sit under the root).
    fn word(self) -> Option<&'static str> {
        match self {
            Self::Guaranteed => None,
            Self::Burstable => Some("burstable"),
            Self::BestEffort => Some("besteffort"),
        }
    }
}

/// How the kubelet names its directories.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Driver {
    /// Plain directories: `kubepods/burstable/pod<uid>`.
    Cgroupfs,
    /// systemd slices: `kubepods.slice/kubepods-burstable.slice/...-pod<uid_>.slice`.
    Systemd,
}

/// A `kubepods` directory: where a kubelet keeps its pods.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Root {
    pub path: PathBuf,
    pub driver: Driver,
}

/// The suffix of a systemd slice's directory.
const SLICE: &str = ".slice";

impl Root {
    /// `path` as a kubepods root, if its name is one: `kubepods` (cgroupfs) or
    /// `kubepods.slice`, `<prefix>-kubepods.slice` (systemd).
    #[must_use]
    pub fn from_dir(path: &Path) -> Option<Self> {
        let name = path.file_name()?.to_str()?;
        let driver = if name == "kubepods" {
            Driver::Cgroupfs
        } else if name == "kubepods.slice" || name.ends_with("-kubepods.slice") {
            Driver::Systemd
        } else {
            return None;
        };
        Some(Self {
            path: path.to_owned(),
            driver,
        })
    }

    /// The systemd stem every slice below this root starts with (`kubepods`,
    /// `kubelet-kubepods`).
    fn stem(&self) -> &str {
        self.path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(SLICE))
            .unwrap_or("kubepods")
    }

    /// The directory that holds pods of class `qos`.
    #[must_use]
    pub fn qos_dir(&self, qos: Qos) -> PathBuf {
        match (qos.word(), self.driver) {
            (None, _) => self.path.clone(),
            (Some(word), Driver::Cgroupfs) => self.path.join(word),
            (Some(word), Driver::Systemd) => {
                self.path.join(format!("{}-{word}{SLICE}", self.stem()))
            }
        }
    }

    /// Where the pod `uid` of class `qos` has its directory.
    #[must_use]
    pub fn pod_dir(&self, uid: &str, qos: Qos) -> PathBuf {
        let parent = self.qos_dir(qos);
        match self.driver {
            Driver::Cgroupfs => parent.join(format!("pod{uid}")),
            Driver::Systemd => {
                let class = qos.word().map(|w| format!("-{w}")).unwrap_or_default();
                // systemd spells '-' as the hierarchy separator, so the uid's become '_'.
                let uid = uid.replace('-', "_");
                parent.join(format!("{}{class}-pod{uid}{SLICE}", self.stem()))
            }
        }
    }

    /// The pod uid a directory named `name` in `parent` (the root or a QoS directory)
    /// belongs to, if it is a pod directory.
    #[must_use]
    pub fn pod_uid(&self, name: &str) -> Option<String> {
        let uid = match self.driver {
            Driver::Cgroupfs => name.strip_prefix("pod")?.to_owned(),
            Driver::Systemd => {
                let stem = name.strip_suffix(SLICE)?;
                let (_, uid) = stem.rsplit_once("-pod")?;
                uid.replace('_', "-")
            }
        };
        looks_like_uid(&uid).then_some(uid)
    }

    /// Whether a directory named `name` directly under the root holds pods of a QoS class.
    #[must_use]
    pub fn is_qos_dir(&self, name: &str) -> bool {
        [Qos::Burstable, Qos::BestEffort].into_iter().any(|qos| {
            self.qos_dir(qos)
                .file_name()
                .is_some_and(|n| n.to_str() == Some(name))
        })
    }
}

/// Whether `uid` has the shape of a Kubernetes uid (a UUID: hex digits and dashes).
fn looks_like_uid(uid: &str) -> bool {
    uid.len() == 36
        && uid.bytes().enumerate().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => c == b'-',
            _ => c.is_ascii_hexdigit(),
        })
}

/// A container's id as `status.containerStatuses[].containerID` gives it
/// (`containerd://<id>`, `cri-o://<id>`, `docker://<id>`), without the runtime.
#[must_use]
pub fn container_id(reported: &str) -> Option<&str> {
    let id = reported.rsplit_once("://").map_or(reported, |(_, id)| id);
    (!id.is_empty() && id.bytes().all(|c| c.is_ascii_alphanumeric())).then_some(id)
}

/// The names a container's directory has inside its pod's, by runtime and driver.
#[must_use]
pub fn container_dir_names(id: &str) -> [String; 6] {
    [
        format!("cri-containerd-{id}.scope"),
        format!("crio-{id}.scope"),
        format!("docker-{id}.scope"),
        id.to_owned(),
        format!("crio-{id}"),
        format!("cri-containerd-{id}"),
    ]
}

/// What is known of a pod that says where its directory is.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PodCgroup {
    pub uid: String,
    /// `None` while the kubelet has not reported it.
    pub qos: Option<Qos>,
    /// Container ids (without the runtime), for pods whose directory is not where the
    /// layout says.
    pub containers: Vec<String>,
}

/// The cgroup2 mount points in /proc/mounts (a container may see several: its own cgroup
/// namespace's and the node's, mounted in).
#[must_use]
pub fn cgroup2_mounts() -> Vec<PathBuf> {
    let Ok(mounts) = fs::read_to_string("/proc/mounts") else {
        return Vec::new();
    };
    let mut out: Vec<PathBuf> = mounts
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let (_, dir, fstype) = (fields.next()?, fields.next()?, fields.next()?);
            (fstype == "cgroup2").then(|| PathBuf::from(unescape_mount(dir)))
        })
        .collect();
    out.sort();
    out.dedup();
    out
}

/// /proc/mounts spells space, tab, newline and backslash as octal escapes.
fn unescape_mount(field: &str) -> String {
    let mut out = String::with_capacity(field.len());
    let mut rest = field;
    while let Some(at) = rest.find('\\') {
        out.push_str(&rest[..at]);
        let code = rest.get(at + 1..at + 4);
        match code.and_then(|c| u8::from_str_radix(c, 8).ok()) {
            Some(byte) => {
                out.push(char::from(byte));
                rest = &rest[at + 4..];
            }
            None => {
                out.push('\\');
                rest = &rest[at + 1..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// How deep below a base directory roots are looked for: kind's, seen from the host, are at
/// `system.slice/docker-<id>.scope/kubelet.slice/kubelet-kubepods.slice` (4).
pub const ROOT_DEPTH: usize = 6;

/// Every kubepods root at most [`ROOT_DEPTH`] levels below each of `bases` (a base may be a
/// root itself). Nothing below a root is walked: pods and containers are not roots.
#[must_use]
pub fn find_roots(bases: &[PathBuf]) -> Vec<Root> {
    let mut roots = BTreeSet::new();
    for base in bases {
        walk(base, ROOT_DEPTH, &mut |dir| match Root::from_dir(dir) {
            Some(root) => {
                roots.insert(root);
                false
            }
            None => true,
        });
    }
    roots.into_iter().collect()
}

/// Visits `dir` and its subdirectories to `depth` levels, descending where `visit` says so.
/// Symbolic links are not followed; unreadable directories are skipped (a cgroup can go
/// between listing and reading).
fn walk(dir: &Path, depth: usize, visit: &mut dyn FnMut(&Path) -> bool) {
    if !visit(dir) || depth == 0 {
        return;
    }
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            walk(&entry.path(), depth - 1, visit);
        }
    }
}

/// The directories of `pod` that exist under `roots`: its pod directory (for its class, or
/// any class while it is not known), or failing that the directories of its containers
/// found anywhere below a root (a layout whose pod directory is not where the rules say).
#[must_use]
pub fn locate(roots: &[Root], pod: &PodCgroup) -> Vec<PathBuf> {
    let classes: &[Qos] = match &pod.qos {
        Some(qos) => std::slice::from_ref(qos),
        None => &Qos::ALL,
    };
    let pod_dirs: Vec<PathBuf> = roots
        .iter()
        .flat_map(|root| classes.iter().map(|qos| root.pod_dir(&pod.uid, *qos)))
        .filter(|dir| dir.is_dir())
        .collect();
    if !pod_dirs.is_empty() || pod.containers.is_empty() {
        return pod_dirs;
    }
    let names: BTreeSet<String> = pod
        .containers
        .iter()
        .flat_map(|id| container_dir_names(id))
        .collect();
    let mut found = Vec::new();
    for root in roots {
        // root / qos / pod / container: three levels below the root at most.
        walk(&root.path, 3, &mut |dir| {
            let hit = dir
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| names.contains(n));
            if hit {
                found.push(dir.to_owned());
            }
            !hit
        });
    }
    found
}

#[cfg(test)]
mod tests;
