//! Userspace side of per-namespace isolation: the cgroup connect4/connect6 hooks
//! (`ebpf/src/cgroup_sock_addr.rs`) and their maps.
//!
//! A namespace is a set of cgroups: every cgroup under one of its registered directories
//! (the site's own roots, fixed, or a Kubernetes namespace's pod directories, set while the
//! router runs: [`namespaces`]). A protected listener belongs to one namespace (or none) and
//! may allow others; a connect() to it from any other namespace fails with EPERM, in the
//! kernel, before a packet is sent. Changes take effect on the next connect(): listeners are
//! (un)protected as they are created and deleted, directories as they are set.

use std::{
    collections::BTreeMap,
    fs::File,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    os::fd::AsFd as _,
    path::{Path, PathBuf},
};

use aya::{
    maps::{HashMap, MapData, MapError, PerCpuArray, RingBuf},
    programs::{CgroupAttachMode, CgroupSockAddr, cgroup_sock_addr::CgroupSockAddrLink},
};
use ebpf_common::{
    ALLOWED_MAP, AllowKey, CONNECT4_PROGRAM, CONNECT6_PROGRAM, DENY_EVENTS_MAP, DenyEvent,
    EndpointKey, ISOLATION_COUNTERS_MAP, IsolationCounter, NAMESPACES_MAP, NO_NAMESPACE,
    PROTECTED_MAP,
};

use crate::{
    accel::endpoint_key,
    programs::{LoadError, ObjectError, Programs},
};

mod addresses;
mod namespaces;

pub use addresses::AddressWatch;
use addresses::local_ips;
pub use namespaces::CgroupChange;
use namespaces::Registry;

/// Failure to set up or drive the isolation hooks.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error(transparent)]
    Object(#[from] ObjectError),
    #[error("namespace {namespace}: cgroup {} is not usable", path.display())]
    Cgroup {
        namespace: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "unknown namespace {0:?}: register it with `skiff site create --namespace NAME=CGROUP_PATH` (or, on Kubernetes, run the node controller)"
    )]
    UnknownNamespace(String),
    #[error("namespace {0} is the site's own (`site create --namespace`): its cgroup is fixed")]
    Fixed(String),
    #[error("namespace {namespace}: cgroup {} belongs to namespace {other}", path.display())]
    Claimed {
        namespace: String,
        other: String,
        path: PathBuf,
    },
    #[error("more than {0} namespaces")]
    TooManyNamespaces(u32),
}

fn map_err(name: &'static str) -> impl FnOnce(MapError) -> Error {
    move |source| Error::Object(ObjectError::map(name)(source))
}

/// Counters of the connect hooks, summed over CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    pub allowed: u64,
    pub denied: u64,
    pub events_lost: u64,
}

/// Loaded and attached connect hooks.
pub struct Isolation {
    // Dropping them detaches connect4 and connect6.
    _links: Vec<CgroupSockAddrLink>,
    protected: HashMap<MapData, EndpointKey, u32>,
    allowed: HashMap<MapData, AllowKey, u8>,
    counters: PerCpuArray<MapData, u64>,
    events: Option<RingBuf<MapData>>,
    /// Namespace name -> id (1-based; 0 is "no namespace") and directories.
    namespaces: Registry,
    /// Protected endpoint id -> the addresses it is protected at now.
    protected_at: BTreeMap<u32, (SocketAddr, Vec<SocketAddr>)>,
}

impl std::fmt::Debug for Isolation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Isolation")
            .field("namespaces", &self.namespaces)
            .finish_non_exhaustive()
    }
}

/// What one protected endpoint allows.
#[derive(Clone, Debug)]
pub struct Protection {
    pub id: u32,
    pub addr: SocketAddr,
    /// Namespaces that may connect; `None` in the list means "callers in no namespace".
    pub allow: Vec<Option<String>>,
}

impl Isolation {
    /// Loads the hooks, registers `namespaces` (name -> cgroup v2 directory) and attaches
    /// connect4 and connect6 to `cgroup`.
    ///
    /// # Errors
    /// Without CAP_BPF/CAP_NET_ADMIN, or when a cgroup path is not a cgroup v2 directory.
    pub fn attach(cgroup: &Path, namespaces: &BTreeMap<String, PathBuf>) -> Result<Self, Error> {
        Self::attach_to(&mut Programs::load()?, cgroup, namespaces)
    }

    /// Takes the isolation maps and hooks from `programs` (loaded once for acceleration and
    /// isolation), registers `namespaces` and attaches connect4 and connect6 to `cgroup`.
    /// Loopback reaches a listener only from the router's own network namespace; without the
    /// namespace's cookie (kernels before 5.14) the hooks treat loopback alike in every
    /// namespace.
    ///
    /// # Errors
    /// As [`Isolation::attach`].
    pub fn attach_to(
        programs: &mut Programs,
        cgroup: &Path,
        namespaces: &BTreeMap<String, PathBuf>,
    ) -> Result<Self, Error> {
        let protected: HashMap<MapData, EndpointKey, u32> = programs.take_map(PROTECTED_MAP)?;
        let roots: HashMap<MapData, u64, u32> = programs.take_map(NAMESPACES_MAP)?;
        let allowed: HashMap<MapData, AllowKey, u8> = programs.take_map(ALLOWED_MAP)?;
        let counters: PerCpuArray<MapData, u64> = programs.take_map(ISOLATION_COUNTERS_MAP)?;
        let events: RingBuf<MapData> = programs.take_map(DENY_EVENTS_MAP)?;
        let registry = Registry::new(roots, namespaces)?;

        let dir = File::open(cgroup).map_err(|source| Error::Cgroup {
            namespace: "(--cgroup)".into(),
            path: cgroup.to_owned(),
            source,
        })?;
        let mut links = Vec::with_capacity(2);
        for name in [CONNECT4_PROGRAM, CONNECT6_PROGRAM] {
            let program: &mut CgroupSockAddr = programs.program(name)?;
            program.load().map_err(ObjectError::program(name))?;
            let link = program
                .attach(dir.as_fd(), CgroupAttachMode::Single)
                .and_then(|id| program.take_link(id))
                .map_err(ObjectError::program(name))?;
            links.push(link);
        }
        Ok(Self {
            _links: links,
            protected,
            allowed,
            counters,
            events: Some(events),
            namespaces: registry,
            protected_at: BTreeMap::new(),
        })
    }

    /// The id of namespace `name`.
    ///
    /// # Errors
    /// When it is not registered.
    pub fn namespace_id(&self, name: &str) -> Result<u32, Error> {
        self.namespaces
            .id(name)
            .ok_or_else(|| Error::UnknownNamespace(name.to_owned()))
    }

    /// The name of namespace `id`.
    #[must_use]
    pub fn namespace_name(&self, id: u32) -> Option<&str> {
        self.namespaces.name(id)
    }

    /// Makes `dirs` (cgroup v2 directories) the directories of namespace `name`, registering
    /// the name if it is new; see [`CgroupChange`] for what it reports.
    ///
    /// # Errors
    /// When `name` is one of the site's own namespaces, a directory belongs to another
    /// namespace or cannot be read, or the map is full.
    pub fn set_namespace(&mut self, name: &str, dirs: &[PathBuf]) -> Result<CgroupChange, Error> {
        self.namespaces.set(name, dirs)
    }

    /// Each namespace and its registered directories.
    #[must_use]
    pub fn namespace_directories(&self) -> BTreeMap<String, Vec<PathBuf>> {
        self.namespaces.directories()
    }

    /// Protects `p.addr` (every local address for a wildcard bind) for the namespaces it allows.
    ///
    /// # Errors
    /// When a namespace is unknown or a map is full.
    pub fn protect(&mut self, p: &Protection) -> Result<(), Error> {
        let allow = p
            .allow
            .iter()
            .map(|ns| {
                ns.as_deref()
                    .map_or(Ok(NO_NAMESPACE), |n| self.namespace_id(n))
            })
            .collect::<Result<Vec<_>, _>>()?;
        for namespace in allow {
            self.allowed
                .insert(
                    AllowKey {
                        listener: p.id,
                        namespace,
                    },
                    1,
                    0,
                )
                .map_err(map_err(ALLOWED_MAP))?;
        }
        let addrs = reachable_addrs(p.addr);
        for addr in &addrs {
            self.protected
                .insert(endpoint_key(*addr), p.id, 0)
                .map_err(map_err(PROTECTED_MAP))?;
        }
        self.protected_at.insert(p.id, (p.addr, addrs));
        Ok(())
    }

    /// Removes the protection `protect` added; connect() then behaves as without skiff.
    pub fn unprotect(&mut self, p: &Protection) {
        if let Some((_, addrs)) = self.protected_at.remove(&p.id) {
            for addr in addrs {
                let _ = self.protected.remove(&endpoint_key(addr));
            }
        }
        let keys: Vec<AllowKey> = self
            .allowed
            .keys()
            .filter_map(Result::ok)
            .filter(|k| k.listener == p.id)
            .collect();
        for key in keys {
            let _ = self.allowed.remove(&key);
        }
    }

    /// Protects every wildcard listener at the local addresses there are now, and no longer at
    /// those that went away: called when the namespace's addresses change.
    ///
    /// # Errors
    /// When the map is full; the other endpoints are brought up to date first.
    pub fn follow_addresses(&mut self) -> Result<(), Error> {
        let mut failed = None;
        for (id, (bound, now)) in &mut self.protected_at {
            if !bound.ip().is_unspecified() {
                continue;
            }
            let wanted = reachable_addrs(*bound);
            for gone in now.iter().filter(|a| !wanted.contains(a)) {
                let _ = self.protected.remove(&endpoint_key(*gone));
            }
            for new in wanted.iter().filter(|a| !now.contains(a)) {
                if let Err(e) = self.protected.insert(endpoint_key(*new), *id, 0) {
                    failed = Some(e);
                }
            }
            *now = wanted;
        }
        failed.map_or(Ok(()), |e| Err(map_err(PROTECTED_MAP)(e)))
    }

    /// The hooks' counters, summed over CPUs.
    ///
    /// # Errors
    /// When the counter map cannot be read.
    pub fn counters(&self) -> Result<Counters, Error> {
        let read = |c: IsolationCounter| -> Result<u64, Error> {
            Ok(self
                .counters
                .get(&(c as u32), 0)
                .map_err(map_err(ISOLATION_COUNTERS_MAP))?
                .iter()
                .sum())
        };
        Ok(Counters {
            allowed: read(IsolationCounter::Allowed)?,
            denied: read(IsolationCounter::Denied)?,
            events_lost: read(IsolationCounter::EventsLost)?,
        })
    }

    /// Hands out the deny-event ring buffer (once) for a reader task.
    pub fn take_events(&mut self) -> Option<RingBuf<MapData>> {
        self.events.take()
    }
}

/// Decodes one ring buffer record.
#[must_use]
pub fn decode_event(bytes: &[u8]) -> Option<DenyEvent> {
    if bytes.len() < size_of::<DenyEvent>() {
        return None;
    }
    // SAFETY: DenyEvent is repr(C), made of integers, any bit pattern is valid, and the record
    // holds at least size_of::<DenyEvent>() bytes; read_unaligned needs no alignment.
    Some(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<DenyEvent>()) })
}

/// Every address at which a listener bound to `addr` can be reached from this node: itself,
/// or for a wildcard bind every local address (loopback is one entry: the hooks fold
/// 127.0.0.0/8 into 127.0.0.1).
fn reachable_addrs(addr: SocketAddr) -> Vec<SocketAddr> {
    let ip = match addr.ip() {
        IpAddr::V4(v4) if v4.is_loopback() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        other => other,
    };
    if !ip.is_unspecified() {
        return vec![SocketAddr::new(ip, addr.port())];
    }
    let mut out = vec![
        SocketAddr::new(Ipv4Addr::LOCALHOST.into(), addr.port()),
        SocketAddr::new(std::net::Ipv6Addr::LOCALHOST.into(), addr.port()),
    ];
    out.extend(
        local_ips()
            .into_iter()
            .map(|ip| SocketAddr::new(ip, addr.port())),
    );
    out.sort();
    out.dedup();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_aliases_fold_and_wildcards_expand() {
        let alias: SocketAddr = "127.0.0.9:80".parse().expect("addr");
        assert_eq!(
            reachable_addrs(alias),
            vec!["127.0.0.1:80".parse().expect("addr")]
        );
        let any: SocketAddr = "0.0.0.0:80".parse().expect("addr");
        let all = reachable_addrs(any);
        assert!(all.contains(&"127.0.0.1:80".parse().expect("addr")));
        assert!(all.contains(&"[::1]:80".parse().expect("addr")));
    }

    #[test]
    fn deny_events_decode_from_their_bytes() {
        let event = DenyEvent {
            cgroup: 42,
            namespace: 2,
            listener: 7,
            ip: [0, 0, 0, 1],
            port: 8080,
            _pad: 0,
        };
        // SAFETY: viewing a repr(C) value as bytes.
        let bytes = unsafe {
            std::slice::from_raw_parts((&raw const event).cast::<u8>(), size_of::<DenyEvent>())
        };
        assert_eq!(decode_event(bytes), Some(event));
        assert_eq!(decode_event(&bytes[..4]), None);
    }
}
