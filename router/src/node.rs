//! The node: this router's eBPF programs (socket acceleration and namespace isolation), the
//! endpoints and protections it registers with them, and what the kernel reports back (deny
//! events, counters).
//!
//! [`Kernel`] is the privileged part of starting: it loads and attaches the programs before
//! the router opens a network socket, so that `--user` can give up root right after. [`Node`]
//! is the running part. Its locks (accel, isolation, denials) are leaves: nothing is called
//! while one is held, and no caller holds another owner's lock when it calls in.

use std::{
    collections::{BTreeMap, VecDeque},
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU32, Ordering},
    },
    time::{Duration, Instant},
};

use ebpf_common::EndpointKind;
use serde::Serialize;
use tracing::{info, warn};

use crate::{
    accel::{self, Accel},
    isolation::{self, Isolation, Protection},
    programs::Programs,
    site::{self, SiteConfig, StateDir},
    token,
};

/// How the router uses the kernel's socket redirection.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum AccelMode {
    /// Never.
    #[default]
    Off,
    /// Always: failing to load or attach the programs fails the start.
    Sockmap,
    /// Where the kernel and privileges allow; otherwise log why not and run without.
    Auto,
}

/// Failure to attach what the site and the options ask for.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Site(#[from] site::Error),
    #[error("--accel sockmap needs --cgroup PATH: the cgroup whose sockets are accelerated")]
    AccelNeedsCgroup,
    /// The reason is one line ([`crate::programs::reason`]): a verifier log cut to its refusal.
    #[error("socket acceleration failed to start: {0}")]
    Accel(String),
    #[error(
        "this site isolates namespaces: start the router with --cgroup PATH (the cgroup that contains the namespaces)"
    )]
    IsolationNeedsCgroup,
    #[error("namespace isolation failed to start: {0}")]
    Isolation(String),
    #[error("the eBPF programs failed to load: {0}")]
    Load(String),
}

/// The router's eBPF programs, attached: the part of starting that needs CAP_BPF and
/// CAP_NET_ADMIN, done before anything else so that the router can give up privilege before
/// it opens a network socket (`--user`).
#[derive(Debug)]
pub struct Kernel {
    /// Taken before anything else: one router per state directory.
    lock: site::Lock,
    accel: Option<Accel>,
    accel_note: String,
    isolation: Option<Isolation>,
}

impl Kernel {
    /// Loads and attaches what `options` ask for, after taking the state directory's lock.
    ///
    /// # Errors
    /// When the site cannot be read or locked, or acceleration (unless `auto`) or isolation
    /// fails.
    pub fn attach(
        state: &StateDir,
        accel: AccelMode,
        cgroup: Option<&Path>,
        owner: Option<u32>,
    ) -> Result<Self, Error> {
        let config = state.config()?;
        site::check_private(state.root(), owner.unwrap_or_else(site::euid))?;
        let lock = site::lock(state.root())?;
        // One load for both: each map exists once in the kernel.
        let wanted = (accel != AccelMode::Off && cgroup.is_some()) || config.isolate_namespaces;
        let mut programs = match wanted.then(Programs::load) {
            None => None,
            Some(Ok(programs)) => Some(programs),
            Some(Err(e)) if accel == AccelMode::Auto && !config.isolate_namespaces => {
                let reason = crate::programs::reason(&e);
                warn!(reason, "socket acceleration off");
                return Ok(Self {
                    lock,
                    accel: None,
                    accel_note: format!("off: {reason}"),
                    isolation: None,
                });
            }
            Some(Err(e)) => return Err(Error::Load(crate::programs::reason(&e))),
        };
        let (accel, accel_note) =
            start_accel(&config.name, state, accel, cgroup, programs.as_mut())?;
        let isolation = start_isolation(&config, cgroup, programs.as_mut())?;
        Ok(Self {
            lock,
            accel,
            accel_note,
            isolation,
        })
    }

    /// Whether the router uses eBPF maps from here on (acceleration or isolation is on).
    #[must_use]
    pub fn uses_maps(&self) -> bool {
        self.accel.is_some() || self.isolation.is_some()
    }

    /// Where the programs are pinned, if they are.
    #[must_use]
    pub fn pin_dir(&self) -> Option<&Path> {
        self.accel.as_ref().and_then(Accel::pin_dir)
    }

    /// Leaves removing the pins to a keeper process (the router is about to give up root).
    pub fn leave_pins_to_keeper(&mut self) {
        if let Some(accel) = &mut self.accel {
            accel.leave_pins_to_keeper();
        }
    }

    /// The running node, and the state directory's lock (held until the router stops).
    #[must_use]
    pub fn into_node(self) -> (Node, site::Lock) {
        let node = Node {
            accel: Mutex::new(self.accel),
            accel_note: self.accel_note,
            isolation: Mutex::new(self.isolation),
            denials: Mutex::new(Denials::default()),
            next_protection_id: AtomicU32::new(0),
        };
        (node, self.lock)
    }
}

/// Loads and attaches the socket-redirection programs as asked. Returns them (or `None`) and
/// a one-line description of the state for `skiff status`.
fn start_accel(
    site: &str,
    state: &StateDir,
    mode: AccelMode,
    cgroup: Option<&Path>,
    programs: Option<&mut Programs>,
) -> Result<(Option<Accel>, String), Error> {
    let cgroup = match (mode, cgroup) {
        (AccelMode::Off, _) => return Ok((None, "off".into())),
        (AccelMode::Sockmap, None) => return Err(Error::AccelNeedsCgroup),
        (AccelMode::Auto, None) => {
            info!("socket acceleration off: no --cgroup given");
            return Ok((None, "off: no --cgroup given".into()));
        }
        (_, Some(cgroup)) => cgroup,
    };
    let pin_dir = accel::bpffs_mount().map(|bpffs| bpffs.join("skiff").join(pin_name(site, state)));
    if pin_dir.is_none() {
        info!(
            "bpffs is not mounted: eBPF objects stay unpinned (they still go away with the router)"
        );
    }
    let programs = programs.expect("loaded when acceleration is asked for with a cgroup");
    match Accel::attach_to(programs, cgroup, pin_dir.as_deref()) {
        Ok(accel) => {
            info!(cgroup = %cgroup.display(), pins = ?accel.pin_dir(), "socket acceleration on");
            Ok((Some(accel), format!("sockmap on {}", cgroup.display())))
        }
        Err(e) if mode == AccelMode::Auto => {
            let reason = crate::programs::reason(&e);
            warn!(reason, "socket acceleration off");
            Ok((None, format!("off: {reason}")))
        }
        Err(e) => Err(Error::Accel(crate::programs::reason(&e))),
    }
}

/// Attaches the connect() hooks when the site isolates its namespaces.
fn start_isolation(
    config: &SiteConfig,
    cgroup: Option<&Path>,
    programs: Option<&mut Programs>,
) -> Result<Option<Isolation>, Error> {
    if !config.isolate_namespaces {
        return Ok(None);
    }
    let cgroup = cgroup.ok_or(Error::IsolationNeedsCgroup)?;
    let namespaces = config
        .namespaces
        .iter()
        .map(|(name, path)| (name.clone(), PathBuf::from(path)))
        .collect();
    let programs = programs.expect("loaded when the site isolates namespaces");
    let isolation = Isolation::attach_to(programs, cgroup, &namespaces)
        .map_err(|e| Error::Isolation(crate::programs::reason(&e)))?;
    info!(cgroup = %cgroup.display(), namespaces = config.namespaces.len(), "namespace isolation on");
    Ok(Some(isolation))
}

/// A per-site, per-state-directory name for the bpffs pin directory, so that several sites on
/// one node (even with the same name, as in tests) never share pins.
fn pin_name(site: &str, state: &StateDir) -> String {
    use std::hash::{Hash as _, Hasher as _};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    std::fs::canonicalize(state.root())
        .unwrap_or_else(|_| state.root().to_owned())
        .hash(&mut hasher);
    format!("{site}-{:08x}", hasher.finish() as u32)
}

/// `e` and its sources on one line.
#[must_use]
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut parts = vec![e.to_string()];
    let mut source = e.source();
    while let Some(cause) = source {
        parts.push(cause.to_string());
        source = cause.source();
    }
    parts.join(": ")
}

/// The running node's programs and what they reported.
pub struct Node {
    /// Socket redirection, when on; `accel_note` says why it is off otherwise.
    accel: Mutex<Option<Accel>>,
    accel_note: String,
    /// The connect() hooks, when the site isolates its namespaces.
    isolation: Mutex<Option<Isolation>>,
    denials: Mutex<Denials>,
    /// Ids of protected endpoints (listeners, link access); 0 is never used.
    next_protection_id: AtomicU32,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("accel", &self.accel_note)
            .finish_non_exhaustive()
    }
}

/// What the deny events told us, for `skiff status` and rate-limited logs.
#[derive(Default)]
struct Denials {
    recent: VecDeque<Denial>,
    by_namespace: BTreeMap<String, u64>,
    last_log: Option<Instant>,
    unlogged: u64,
}

/// Deny events kept for `skiff status`.
const RECENT_DENIALS: usize = 16;

/// One connect() the isolation hooks refused.
#[derive(Clone, Debug, Serialize)]
pub struct Denial {
    pub time: u64,
    pub namespace: String,
    pub cgroup: u64,
    pub target: String,
}

/// `skiff status`'s view of acceleration.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AccelView {
    pub mode: String,
    #[serde(flatten)]
    pub on: Option<AccelCounters>,
}

/// Acceleration's counters, when it is on.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AccelCounters {
    pub pin_dir: Option<PathBuf>,
    pub sockets: Option<usize>,
    pub counted_sockets: Option<usize>,
    pub sockets_inserted: u64,
    pub insert_failures: u64,
    pub sockets_not_the_routers: u64,
    pub messages_redirected: u64,
    pub bytes_redirected: u64,
    pub messages_missed: u64,
    pub messages_diverted: u64,
    pub messages_shortcut: u64,
    pub bytes_shortcut: u64,
    pub messages_over_budget: u64,
    pub messages_behind_router: u64,
    pub shortcuts_offered: u64,
    pub shortcuts_given_up: u64,
    pub senders_diverted: u64,
    pub senders_returned: u64,
    pub senders_under_pressure: u64,
    pub divert_failures: u64,
    pub writes_paused: u64,
    pub reads_unstuck: u64,
    pub queue_limit: usize,
}

/// `skiff status`'s view of isolation.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct IsolationView {
    pub mode: &'static str,
    #[serde(flatten)]
    pub on: Option<IsolationCounters>,
}

/// Isolation's counters and recent denials, when it is on.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct IsolationCounters {
    /// Each namespace and the cgroup directories registered for it.
    pub namespaces: BTreeMap<String, Vec<PathBuf>>,
    pub allowed: u64,
    pub denied: u64,
    pub events_lost: u64,
    pub denied_by_namespace: BTreeMap<String, u64>,
    pub recent_denials: Vec<Denial>,
}

/// The node's part of a metrics snapshot.
#[derive(Debug, Default)]
pub struct NodeMetrics {
    pub accel: Option<accel::Counters>,
    pub accel_sockets: Option<u64>,
    pub isolation: Option<isolation::Counters>,
    pub denied_by_namespace: Vec<(String, u64)>,
}

impl Node {
    /// Runs `f` with acceleration, when it is on (the data path registers its sockets).
    pub fn with_accel<T>(&self, f: impl FnOnce(Option<&Accel>) -> T) -> T {
        f(self.accel.lock().expect("accel lock").as_ref())
    }

    /// Takes the deny-event ring buffer (once), when isolation is on.
    pub fn take_deny_events(&self) -> Option<aya::maps::RingBuf<aya::maps::MapData>> {
        self.isolation
            .lock()
            .expect("isolation lock")
            .as_mut()
            .and_then(Isolation::take_events)
    }

    /// Protects `addr` at connect() for `namespace` and `allow` (`Ok(None)` without
    /// isolation).
    ///
    /// # Errors
    /// When the kernel's map refuses the entry, or a namespace is unknown.
    pub fn protect(
        &self,
        addr: SocketAddr,
        namespace: Option<String>,
        allow: &[String],
    ) -> Result<Option<Protection>, isolation::Error> {
        let mut isolation = self.isolation.lock().expect("isolation lock");
        let Some(isolation) = isolation.as_mut() else {
            return Ok(None);
        };
        let mut namespaces = vec![namespace];
        namespaces.extend(allow.iter().cloned().map(Some));
        let protection = Protection {
            id: self.next_protection_id.fetch_add(1, Ordering::Relaxed) + 1,
            addr,
            allow: namespaces,
        };
        isolation.protect(&protection)?;
        Ok(Some(protection))
    }

    /// Makes `dirs` the cgroup directories of namespace `name` (see
    /// [`Isolation::set_namespace`]); `Ok(None)` without isolation, where namespaces mean
    /// nothing.
    ///
    /// # Errors
    /// As [`Isolation::set_namespace`].
    pub fn set_namespace(
        &self,
        name: &str,
        dirs: &[PathBuf],
    ) -> Result<Option<isolation::CgroupChange>, isolation::Error> {
        let mut isolation = self.isolation.lock().expect("isolation lock");
        isolation
            .as_mut()
            .map(|i| i.set_namespace(name, dirs))
            .transpose()
    }

    /// Lifts a protection [`Node::protect`] made.
    pub fn unprotect(&self, protection: &Protection) {
        if let Some(isolation) = self.isolation.lock().expect("isolation lock").as_mut() {
            isolation.unprotect(protection);
        }
    }

    /// Adds (with its kind) or removes (`None`) an accelerated endpoint; a failure costs
    /// speed, never correctness.
    pub fn set_endpoint(&self, addr: SocketAddr, kind: Option<EndpointKind>) {
        let mut accel = self.accel.lock().expect("accel lock");
        let Some(accel) = accel.as_mut() else { return };
        let result = match kind {
            Some(kind) => accel.add_endpoint(addr, kind),
            None => accel.remove_endpoint(addr),
        };
        if let Err(e) = result {
            warn!(%addr, ?kind, error = %e, "failed to update accelerated endpoints");
        }
    }

    /// Detaches every program and removes its pins: nothing is left in the kernel.
    pub fn detach(&self) {
        drop(self.accel.lock().expect("accel lock").take());
        drop(self.isolation.lock().expect("isolation lock").take());
    }

    /// Keeps wildcard listeners protected at every local address as addresses come and go,
    /// until the task is aborted.
    pub async fn follow_addresses(self: Arc<Self>, watch: isolation::AddressWatch) {
        loop {
            if let Err(e) = watch.changed().await {
                warn!(error = %e, "stopped following address changes");
                return;
            }
            let mut isolation = self.isolation.lock().expect("isolation lock");
            if let Some(Err(e)) = isolation.as_mut().map(Isolation::follow_addresses) {
                warn!(error = %e, "failed to protect a new address");
            }
        }
    }

    /// Reads deny events from the kernel until the task is aborted.
    pub async fn read_denials(self: Arc<Self>, events: aya::maps::RingBuf<aya::maps::MapData>) {
        // SAFETY: the ring buffer owns its map's file descriptor, which stays open and the
        // same for as long as the AsyncFd (which owns the ring buffer) lives.
        let Ok(mut fd) = (unsafe { tokio::io::unix::AsyncFd::register(events) }) else {
            warn!("cannot poll the deny-event ring buffer; denials are counted but not listed");
            return;
        };
        loop {
            let Ok(mut guard) = fd.readable_mut().await else {
                return;
            };
            let ring = guard.get_inner_mut();
            while let Some(item) = ring.next() {
                if let Some(event) = isolation::decode_event(&item) {
                    self.record_denial(&event);
                }
            }
            guard.clear_ready();
        }
    }

    fn record_denial(&self, event: &ebpf_common::DenyEvent) {
        let namespace = self
            .isolation
            .lock()
            .expect("isolation lock")
            .as_ref()
            .and_then(|i| i.namespace_name(event.namespace).map(str::to_owned))
            .unwrap_or_else(|| "(none)".to_owned());
        let mut words = [0u8; 16];
        for (chunk, word) in words.chunks_exact_mut(4).zip(event.ip) {
            chunk.copy_from_slice(&word.to_ne_bytes());
        }
        let ip = std::net::Ipv6Addr::from(words);
        let port = u16::try_from(event.port).unwrap_or(0);
        let target = match ip.to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(v4.into(), port),
            None => SocketAddr::new(ip.into(), port),
        };
        let mut denials = self.denials.lock().expect("denials lock");
        *denials.by_namespace.entry(namespace.clone()).or_default() += 1;
        if denials.recent.len() == RECENT_DENIALS {
            denials.recent.pop_front();
        }
        denials.recent.push_back(Denial {
            time: token::now_secs(),
            namespace: namespace.clone(),
            cgroup: event.cgroup,
            target: target.to_string(),
        });
        // At most one log line a second, however many connects are refused.
        denials.unlogged += 1;
        let now = Instant::now();
        if denials
            .last_log
            .is_none_or(|t| now.duration_since(t) >= Duration::from_secs(1))
        {
            warn!(namespace, %target, cgroup = event.cgroup, refused = denials.unlogged, "connect refused by namespace isolation");
            denials.last_log = Some(now);
            denials.unlogged = 0;
        }
    }

    /// One line on acceleration, for `skiff status`.
    #[must_use]
    pub fn accel_summary(&self) -> &str {
        &self.accel_note
    }

    /// One line on isolation, for `skiff status`.
    #[must_use]
    pub fn isolation_summary(&self) -> String {
        let isolation = self.isolation.lock().expect("isolation lock");
        match isolation.as_ref().map(Isolation::counters) {
            None => "off".to_owned(),
            Some(Ok(c)) => format!("on: {} denied", c.denied),
            Some(Err(_)) => "on".to_owned(),
        }
    }

    #[must_use]
    pub fn accel_view(&self) -> AccelView {
        let accel = self.accel.lock().expect("accel lock");
        let on = accel.as_ref().map(|accel| {
            let c = accel.counters().unwrap_or_default();
            AccelCounters {
                pin_dir: accel.pin_dir().map(Path::to_owned),
                sockets: accel.socks_len().ok(),
                counted_sockets: accel.backpressure().counted_len().ok(),
                sockets_inserted: c.socks_inserted,
                insert_failures: c.socks_insert_failed,
                sockets_not_the_routers: c.socks_foreign,
                messages_redirected: c.msg_redirected,
                bytes_redirected: c.bytes_redirected,
                messages_missed: c.msg_missed,
                messages_diverted: c.msg_diverted,
                messages_shortcut: c.msg_shortcut,
                bytes_shortcut: c.bytes_shortcut,
                messages_over_budget: c.shortcut_over_budget,
                messages_behind_router: c.shortcut_behind,
                shortcuts_offered: c.backpressure.shortcuts_offered,
                shortcuts_given_up: c.backpressure.shortcuts_given_up,
                senders_diverted: c.senders_diverted + c.backpressure.senders_diverted,
                senders_returned: c.senders_returned,
                senders_under_pressure: c.senders_under_pressure,
                divert_failures: c.backpressure.divert_failures,
                writes_paused: c.backpressure.writes_paused,
                reads_unstuck: c.backpressure.reads_unstuck,
                queue_limit: accel.backpressure().limit(),
            }
        });
        AccelView {
            mode: self.accel_note.clone(),
            on,
        }
    }

    #[must_use]
    pub fn isolation_view(&self) -> IsolationView {
        let isolation = self.isolation.lock().expect("isolation lock");
        let Some(isolation) = isolation.as_ref() else {
            return IsolationView {
                mode: "off",
                on: None,
            };
        };
        let counters = isolation.counters().unwrap_or_default();
        let denials = self.denials.lock().expect("denials lock");
        IsolationView {
            mode: "on",
            on: Some(IsolationCounters {
                namespaces: isolation.namespace_directories(),
                allowed: counters.allowed,
                denied: counters.denied,
                events_lost: counters.events_lost,
                denied_by_namespace: denials.by_namespace.clone(),
                recent_denials: denials.recent.iter().cloned().collect(),
            }),
        }
    }

    #[must_use]
    pub fn metrics(&self) -> NodeMetrics {
        let (accel, accel_sockets) = {
            let accel = self.accel.lock().expect("accel lock");
            match accel.as_ref() {
                Some(a) => (a.counters().ok(), a.socks_len().ok().map(|n| n as u64)),
                None => (None, None),
            }
        };
        let isolation = self
            .isolation
            .lock()
            .expect("isolation lock")
            .as_ref()
            .and_then(|i| i.counters().ok());
        let denied_by_namespace = self
            .denials
            .lock()
            .expect("denials lock")
            .by_namespace
            .iter()
            .map(|(k, v)| (k.clone(), *v))
            .collect();
        NodeMetrics {
            accel,
            accel_sockets,
            isolation,
            denied_by_namespace,
        }
    }
}
