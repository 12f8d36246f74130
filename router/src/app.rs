//! The running router: the one place that wires sites, links, routing, services and the admin
//! API together.
//!
//! Threads: one tokio multi-threaded runtime. The control work (links' readers and writers,
//! routing, admin) and the data path (relays) share it; relays are plain tasks, one per
//! connection. Forwarding ([`crate::forward`]) owns the table new connections consult; the
//! control state here sits behind `std::sync::Mutex`es never held across an `.await`.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use ebpf_common::EndpointKind;
use serde_json::json;
use tokio::{net::TcpListener, task::AbortHandle};
use tokio_rustls::TlsAcceptor;
use tracing::{info, warn};

use crate::{
    accel::{self, Accel},
    admin::{self, Request, Response},
    datapath::DataPath,
    forward::{Backend, Forwarding},
    isolation::{self, Isolation, Protection},
    link::{
        self, Events, Link, Open,
        access::Access,
        dial::{self, LinkConfig},
        frame::{Frame, LinkState},
        stream::{StreamRx, StreamTx},
    },
    log_limit::LogLimit,
    metrics,
    pki::{self, CertKey},
    policy::{Gate, Policy},
    routing::{self, Received, Routing},
    service::{self, Connector, ConnectorTls, Listener, ListenerTls, Resources},
    site::{self, SiteConfig, StateDir},
    tls,
    token::{self, Grant, Grants, RedeemRequest, RedeemResponse, Token},
};

mod certs;
mod policy;

use certs::renew_certificates;

/// How long shutdown waits for open connections to finish.
const DRAIN_DEADLINE: Duration = Duration::from_secs(10);

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

/// Options of `skiff router run`.
#[derive(Clone, Debug, Default)]
pub struct RunOptions {
    pub accel: AccelMode,
    /// The data-path backend.
    pub datapath: crate::datapath::Mode,
    /// The cgroup (v2 directory) whose sockets the programs see.
    pub cgroup: Option<PathBuf>,
    /// `HOST:PORT` to serve Prometheus metrics on (`/metrics`), if any.
    pub metrics_addr: Option<String>,
    /// The uid the state directory must belong to: `None` for this process's own, or the
    /// `--user` the router is about to become.
    pub owner: Option<u32>,
}

/// Failure to start the router.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Site(#[from] site::Error),
    #[error(transparent)]
    Tls(#[from] tls::Error),
    #[error("failed to bind {what} on {addr}")]
    Bind {
        what: &'static str,
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("failed to bind the admin socket")]
    Admin(#[source] std::io::Error),
    #[error("failed to install the signal handler")]
    Signal(#[source] std::io::Error),
    #[error("--accel sockmap needs --cgroup PATH: the cgroup whose sockets are accelerated")]
    AccelNeedsCgroup,
    #[error("socket acceleration failed to start")]
    Accel(#[source] accel::Error),
    #[error(
        "this site isolates namespaces: start the router with --cgroup PATH (the cgroup that contains the namespaces)"
    )]
    IsolationNeedsCgroup,
    #[error("namespace isolation failed to start")]
    Isolation(#[source] isolation::Error),
    #[error("--datapath uring: {0}")]
    Datapath(#[source] crate::datapath::uring::Unavailable),
}

struct ListenerRt {
    /// Its protection at connect(), when namespaces are isolated.
    protection: Option<Protection>,
    /// Its certificate, when it serves TLS (replaced on rotation).
    cert: Option<Arc<tls::RotatingCert>>,
    spec: Listener,
    /// The address actually bound (the spec's port may be 0).
    bound: Option<SocketAddr>,
    task: AbortHandle,
    connections: Arc<AtomicU64>,
}

struct OutgoingRt {
    config: LinkConfig,
    tasks: Vec<AbortHandle>,
    /// Why the site policy keeps this link from being dialled (no tasks run then).
    denied: Option<String>,
}

#[derive(Default)]
struct Inner {
    outgoing: BTreeMap<String, OutgoingRt>,
    listeners: BTreeMap<String, ListenerRt>,
    connectors: BTreeMap<String, Connector>,
    grants: Grants,
    /// Link credentials this site signed, and which of them are revoked.
    credentials: token::Credentials,
    /// Sites revoked here (`STATE/revoked.json`): no link to or from them, no stream from or
    /// to them, until they are invited again or a link to them is made anew.
    revoked: BTreeSet<String>,
    /// Ids of protected endpoints (listeners, link access); 0 is never used.
    next_protection_id: u32,
}

/// A running router.
pub struct Router {
    config: SiteConfig,
    state: StateDir,
    ca: CertKey,
    /// Signs TLS listeners' certificates and the bundles for workloads and backends.
    service_ca: CertKey,
    /// The router identity served at link access (replaced on rotation).
    link_cert: Arc<tls::RotatingCert>,
    routing: Arc<Mutex<Routing>>,
    inner: Mutex<Inner>,
    /// Serialises writes of `STATE/resources.json`.
    resources_file: Mutex<()>,
    /// Link connections refused after their TLS handshake (revoked, too many, policy).
    links_refused: AtomicU64,
    /// New connections and streams, and the table they consult.
    forwarding: Arc<Forwarding>,
    /// The site policy in force, and its denial counts.
    gate: Arc<Gate>,
    shutdown: tokio::sync::Notify,
    /// The link-access address actually bound (the configured port may be 0).
    link_access: std::sync::OnceLock<SocketAddr>,
    /// Socket redirection, when on; `accel_note` says why it is off otherwise.
    accel: Mutex<Option<Accel>>,
    accel_note: String,
    /// The connect() hooks, when the site isolates its namespaces.
    isolation: Mutex<Option<Isolation>>,
    denials: Mutex<Denials>,
    metrics_addr: std::sync::OnceLock<SocketAddr>,
    /// Link-state advertisements refused or refuted (a peer can send them in a loop).
    link_state_refusals: Mutex<LogLimit>,
}

/// What the deny events told us, for `skiff status` and rate-limited logs.
#[derive(Default)]
struct Denials {
    recent: std::collections::VecDeque<serde_json::Value>,
    by_namespace: BTreeMap<String, u64>,
    last_log: Option<std::time::Instant>,
    unlogged: u64,
}

/// Deny events kept for `skiff status`.
const RECENT_DENIALS: usize = 16;

impl std::fmt::Debug for Router {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Router")
            .field("site", &self.config.name)
            .finish_non_exhaustive()
    }
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
    /// Loads and attaches what `options` ask for.
    ///
    /// # Errors
    /// When the site cannot be read, or acceleration (unless `auto`) or isolation fails.
    pub fn attach(state: &StateDir, options: &RunOptions) -> Result<Self, Error> {
        let config = state.config()?;
        site::check_private(state.root(), options.owner.unwrap_or_else(site::euid))?;
        let lock = site::lock(state.root())?;
        let (accel, accel_note) = start_accel(&config.name, state, options)?;
        let isolation = start_isolation(&config, options)?;
        Ok(Self {
            lock,
            accel,
            accel_note,
            isolation,
        })
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
}

/// Runs the router of the site in `state` until SIGTERM, SIGINT or an admin shutdown,
/// attaching the eBPF programs `options` ask for first.
///
/// # Errors
/// When the site cannot be loaded, the programs cannot be attached, or a port cannot be bound.
pub async fn run(state: StateDir, options: RunOptions) -> Result<(), Error> {
    let kernel = Kernel::attach(&state, &options)?;
    run_attached(state, options, kernel).await
}

/// [`run`], with the eBPF programs already attached (`skiff router run` attaches them before
/// its runtime starts, so that it can give up privilege first).
///
/// # Errors
/// When the site cannot be loaded or a port cannot be bound.
pub async fn run_attached(
    state: StateDir,
    options: RunOptions,
    kernel: Kernel,
) -> Result<(), Error> {
    let config = state.config()?;
    let ca = state.cert_key("ca")?;
    let identity = state.cert_key("router")?;
    let Kernel {
        lock,
        accel,
        accel_note,
        mut isolation,
    } = kernel;
    let deny_events = isolation.as_mut().and_then(Isolation::take_events);
    let policy: Option<Policy> = state.read_json_or_default("policy.json")?;
    let service_ca = state.service_ca(&config.name)?;
    let link_cert = tls::RotatingCert::new(&identity)?;
    let routing = Arc::new(Mutex::new(Routing::new(&config.name)));
    let gate = Arc::new(Gate::new(policy));
    let datapath = DataPath::new(options.datapath, accel.as_ref()).map_err(Error::Datapath)?;
    if datapath.backend() == "uring" || options.datapath == crate::datapath::Mode::Epoll {
        info!(datapath = datapath.note(), "data path");
    } else {
        warn!(
            datapath = datapath.note(),
            "io_uring unavailable: data path on epoll"
        );
    }
    let forwarding = Arc::new(Forwarding::new(
        config.name.clone(),
        datapath,
        Arc::clone(&routing),
        Arc::clone(&gate),
    ));
    let router = Arc::new(Router {
        routing,
        inner: Mutex::new(Inner {
            grants: Grants::new(state.read_json_or_default("grants.json")?),
            credentials: state.read_json_or_default("credentials.json")?,
            revoked: state.read_json_or_default("revoked.json")?,
            ..Inner::default()
        }),
        resources_file: Mutex::new(()),
        links_refused: AtomicU64::new(0),
        forwarding,
        gate,
        config,
        state,
        ca,
        service_ca,
        link_cert,
        shutdown: tokio::sync::Notify::new(),
        link_access: std::sync::OnceLock::new(),
        link_state_refusals: Mutex::new(LogLimit::default()),
        accel: Mutex::new(accel),
        accel_note,
        isolation: Mutex::new(isolation),
        denials: Mutex::new(Denials::default()),
        metrics_addr: std::sync::OnceLock::new(),
    });

    let mut background = Vec::new();
    if let Some(addr) = router.config.link_access.clone() {
        let listener = router
            .forwarding
            .datapath()
            .listen(&addr)
            .await
            .map(crate::datapath::Listener::into_tokio)
            .map_err(|source| Error::Bind {
                what: "link access",
                addr: addr.clone(),
                source,
            })?;
        let acceptor = TlsAcceptor::from(tls::server_config(
            Arc::clone(&router.link_cert),
            &router.ca.cert_pem,
        )?);
        if let Ok(bound) = listener.local_addr() {
            let _ = router.link_access.set(bound);
            // Workload namespaces may not reach the link-access port; callers in no
            // namespace (other routers, the host) may.
            if let Err(e) = router.protect(bound, None, &[]) {
                warn!(error = %e, "failed to protect the link-access port");
            }
        }
        info!(%addr, "link access listening");
        background.push(
            tokio::spawn(link::access::serve(listener, acceptor, Arc::clone(&router)))
                .abort_handle(),
        );
    }

    if let Some(addr) = &options.metrics_addr {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| Error::Bind {
                what: "metrics",
                addr: addr.clone(),
                source,
            })?;
        if let Ok(bound) = listener.local_addr() {
            let _ = router.metrics_addr.set(bound);
            info!(addr = %bound, "metrics on /metrics");
        }
        let source = Arc::clone(&router);
        background.push(
            tokio::spawn(async move { metrics::serve(listener, &source).await }).abort_handle(),
        );
    }
    if let Some(events) = deny_events {
        background.push(tokio::spawn(read_denials(Arc::clone(&router), events)).abort_handle());
        match isolation::AddressWatch::new() {
            Ok(watch) => background
                .push(tokio::spawn(follow_addresses(Arc::clone(&router), watch)).abort_handle()),
            Err(e) => warn!(
                error = %e,
                "isolation will not see addresses added from now on: wildcard listeners stay protected at today's"
            ),
        }
    }
    background.push(tokio::spawn(renew_certificates(Arc::clone(&router))).abort_handle());
    {
        let forwarding = Arc::clone(&router.forwarding);
        background.push(tokio::spawn(async move { forwarding.trim().await }).abort_handle());
    }
    router.exclude_revoked();
    router.restore().await?;

    let admin = admin::bind(&router.state.admin_socket()).map_err(Error::Admin)?;
    background.push(tokio::spawn(admin::serve(admin, Arc::clone(&router))).abort_handle());
    info!(site = %router.config.name, "router running");

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(Error::Signal)?;
    tokio::select! {
        _ = term.recv() => info!("SIGTERM: shutting down"),
        _ = tokio::signal::ctrl_c() => info!("SIGINT: shutting down"),
        () = router.shutdown.notified() => info!("shutdown requested"),
    }
    router.drain(background).await;
    // Detaches the programs and removes their pins: nothing is left in the kernel.
    drop(router.accel.lock().expect("accel lock").take());
    drop(router.isolation.lock().expect("isolation lock").take());
    let _ = std::fs::remove_file(router.state.admin_socket());
    drop(lock);
    Ok(())
}

/// Loads and attaches the socket-redirection programs as `options` ask. Returns them (or
/// `None`) and a one-line description of the state for `skiff status`.
fn start_accel(
    site: &str,
    state: &StateDir,
    options: &RunOptions,
) -> Result<(Option<Accel>, String), Error> {
    let cgroup = match (options.accel, &options.cgroup) {
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
    match Accel::attach(cgroup, pin_dir.as_deref()) {
        Ok(accel) => {
            info!(cgroup = %cgroup.display(), pins = ?accel.pin_dir(), "socket acceleration on");
            Ok((Some(accel), format!("sockmap on {}", cgroup.display())))
        }
        Err(e) if options.accel == AccelMode::Auto => {
            let reason = error_chain(&e);
            warn!(reason, "socket acceleration off");
            Ok((None, format!("off: {reason}")))
        }
        Err(e) => Err(Error::Accel(e)),
    }
}

/// Attaches the connect() hooks when the site isolates its namespaces.
fn start_isolation(config: &SiteConfig, options: &RunOptions) -> Result<Option<Isolation>, Error> {
    if !config.isolate_namespaces {
        return Ok(None);
    }
    let cgroup = options.cgroup.as_ref().ok_or(Error::IsolationNeedsCgroup)?;
    let namespaces = config
        .namespaces
        .iter()
        .map(|(name, path)| (name.clone(), PathBuf::from(path)))
        .collect();
    let isolation = Isolation::attach(cgroup, &namespaces).map_err(Error::Isolation)?;
    info!(cgroup = %cgroup.display(), namespaces = config.namespaces.len(), "namespace isolation on");
    Ok(Some(isolation))
}

/// Reads deny events from the kernel until the task is aborted.
/// Keeps wildcard listeners protected at every local address as addresses come and go.
async fn follow_addresses(router: Arc<Router>, watch: isolation::AddressWatch) {
    loop {
        if let Err(e) = watch.changed().await {
            warn!(error = %e, "stopped following address changes");
            return;
        }
        let mut isolation = router.isolation.lock().expect("isolation lock");
        if let Some(Err(e)) = isolation.as_mut().map(Isolation::follow_addresses) {
            warn!(error = %e, "failed to protect a new address");
        }
    }
}

async fn read_denials(router: Arc<Router>, events: aya::maps::RingBuf<aya::maps::MapData>) {
    // SAFETY: the ring buffer owns its map's file descriptor, which stays open and the same
    // for as long as the AsyncFd (which owns the ring buffer) lives.
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
                router.record_denial(&event);
            }
        }
        guard.clear_ready();
    }
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

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut parts = vec![e.to_string()];
    let mut source = e.source();
    while let Some(cause) = source {
        parts.push(cause.to_string());
        source = cause.source();
    }
    parts.join(": ")
}

impl Router {
    /// Starts what the state directory says should run: listeners, connectors, links.
    async fn restore(self: &Arc<Self>) -> Result<(), Error> {
        let resources: Resources = self.state.read_json_or_default("resources.json")?;
        for connector in resources.connectors {
            if let Err(e) = self.add_connector(connector, false) {
                warn!(error = %e, "failed to restore connector");
            }
        }
        for listener in resources.listeners {
            if let Err(e) = self.add_listener(listener.clone(), false).await {
                warn!(listener = %listener.name, error = %e, "failed to restore listener");
            }
        }
        let links_dir = self.state.links_dir();
        if let Ok(entries) = std::fs::read_dir(&links_dir) {
            for entry in entries.flatten() {
                let file = entry.file_name().to_string_lossy().into_owned();
                let Some(name) = file.strip_suffix(".json") else {
                    continue;
                };
                match self.load_link(name) {
                    Ok((config, key)) => self.start_link(config, key),
                    Err(e) => warn!(link = name, error = %e, "failed to restore link"),
                }
            }
        }
        Ok(())
    }

    fn load_link(&self, name: &str) -> Result<(LinkConfig, String), site::Error> {
        let config: LinkConfig = self.state.read_json(&format!("links/{name}.json"))?;
        let key = std::fs::read_to_string(self.state.links_dir().join(format!("{name}.key")))
            .map_err(|source| site::Error::Io {
                path: self.state.links_dir().join(format!("{name}.key")),
                source,
            })?;
        Ok((config, key))
    }

    /// Stops accepting, then waits for open connections to finish, up to a deadline.
    async fn drain(&self, background: Vec<AbortHandle>) {
        for task in background {
            task.abort();
        }
        {
            let mut inner = self.inner.lock().expect("router lock");
            for (_, listener) in std::mem::take(&mut inner.listeners) {
                listener.task.abort();
            }
        }
        let left = self.forwarding.drain(DRAIN_DEADLINE).await;
        if left > 0 {
            warn!(
                connections = left,
                "drain deadline passed; closing the rest"
            );
        }
    }

    /// Writes `STATE/resources.json` from the listeners and connectors that exist now. Writes
    /// take turns on their own lock; the router lock is held only for the snapshot, never
    /// across the write, so a slow disk holds up no other request.
    fn save_resources(&self) -> Result<(), site::Error> {
        let _turn = self.resources_file.lock().expect("resources file lock");
        let resources = {
            let inner = self.inner.lock().expect("router lock");
            Resources {
                listeners: inner.listeners.values().map(|l| l.spec.clone()).collect(),
                connectors: inner.connectors.values().cloned().collect(),
            }
        };
        self.state.write_json("resources.json", &resources)
    }

    /// Sends `frames` to every link (except those to `skip`), in the background.
    fn flood(&self, states: Vec<LinkState>, skip: Option<&str>) {
        let links: Vec<Arc<Link>> = self
            .forwarding
            .links()
            .into_iter()
            .filter(|(peer, _)| Some(peer.as_str()) != skip)
            .filter_map(|(_, links)| links.first().cloned())
            .collect();
        for link in links {
            let states = states.clone();
            tokio::spawn(async move {
                for state in states {
                    if link.send(Frame::LinkState(state)).await.is_err() {
                        return;
                    }
                }
            });
        }
    }

    fn start_link(self: &Arc<Self>, config: LinkConfig, key: String) {
        let events: Arc<dyn Events> = Arc::clone(self) as Arc<dyn Events>;
        let host = site::host_of(&config.url).unwrap_or(&config.url).to_owned();
        let denied = self.gate.check(|p| p.outgoing_link(&host)).err();
        if let Some(denied) = &denied {
            self.gate.denied(denied, false);
        }
        let denied = denied.map(|d| d.to_string()).or_else(|| {
            self.is_revoked(&config.peer_site)
                .then(|| format!("site {} was revoked here", config.peer_site))
        });
        let tasks = (0..if denied.is_some() {
            0
        } else {
            config.connections.max(1)
        })
            .map(|_| {
                tokio::spawn(dial::maintain(
                    config.clone(),
                    key.clone(),
                    self.config.name.clone(),
                    Arc::clone(&events),
                ))
                .abort_handle()
            })
            .collect();
        let name = config.name.clone();
        let old = self.inner.lock().expect("router lock").outgoing.insert(
            name,
            OutgoingRt {
                config,
                tasks,
                denied,
            },
        );
        if let Some(old) = old {
            old.tasks.iter().for_each(AbortHandle::abort);
        }
    }

    /// Adds a connector. A new one (`persist`) must be allowed by the site policy; a restored
    /// one is kept either way, and its key is advertised only while the policy allows it.
    fn add_connector(&self, connector: Connector, persist: bool) -> Result<(), String> {
        connector.validate().map_err(|e| e.to_string())?;
        let key = connector.routing_key.clone();
        let allowed = self.gate.check(|p| {
            p.service(&key)?;
            p.exposed_resource(&connector.host, connector.port, None)
        });
        if let Err(denied) = &allowed {
            self.gate.denied(denied, false);
            if persist {
                return Err(format!("connector {}: {denied}", connector.name));
            }
        }
        let name = connector.name.clone();
        let tls = match &connector.tls {
            Some(tls) => Some(self.connector_tls(&connector, tls)?),
            None => None,
        };
        {
            let mut inner = self.inner.lock().expect("router lock");
            if inner.connectors.contains_key(&connector.name) {
                return Err(format!("connector {} already exists", connector.name));
            }
            if inner.connectors.len() >= link::frame::MAX_LIST {
                return Err(format!(
                    "connector {}: this site has {} connectors, as many as its link-state advertisement can carry",
                    connector.name,
                    link::frame::MAX_LIST
                ));
            }
            if let Ok(addr) = connector.backend_addr().parse::<SocketAddr>() {
                self.accel_endpoint(addr, Some(EndpointKind::Backend));
            }
            inner
                .connectors
                .insert(connector.name.clone(), connector.clone());
        }
        if persist && let Err(e) = self.save_resources() {
            // Not stored, so not kept: the connector would vanish at the next restart.
            let mut inner = self.inner.lock().expect("router lock");
            inner.connectors.remove(&name);
            self.forget_backend_endpoint(&inner, &connector);
            return Err(format!("connector {name}: failed to store it: {e}"));
        }
        let backend = Backend {
            routing_key: connector.routing_key,
            host: connector.host,
            port: connector.port,
            tls,
        };
        self.forwarding.add_backend(&name, backend, allowed.is_ok());
        if allowed.is_err() {
            return Ok(());
        }
        let own = self
            .routing
            .lock()
            .expect("routing lock")
            .add_local_key(&key);
        self.flood(vec![own], None);
        Ok(())
    }

    async fn add_listener(self: &Arc<Self>, spec: Listener, persist: bool) -> Result<(), String> {
        spec.validate().map_err(|e| e.to_string())?;
        if self
            .inner
            .lock()
            .expect("router lock")
            .listeners
            .contains_key(&spec.name)
        {
            return Err(format!("listener {} already exists", spec.name));
        }
        // A restored listener is kept either way: each connection is checked as it arrives.
        if let Err(denied) = self.gate.check(|p| p.service(&spec.routing_key)) {
            self.gate.denied(&denied, false);
            if persist {
                return Err(format!("listener {}: {denied}", spec.name));
            }
        }
        let (tls, cert) = match &spec.tls {
            Some(tls) => {
                let (acceptor, cert) = self.listener_tls(&spec, tls)?;
                (Some(acceptor), cert)
            }
            None => (None, None),
        };
        let socket = self
            .forwarding
            .datapath()
            .listen(&spec.bind_addr())
            .await
            .map_err(|e| {
                format!(
                    "failed to bind listener {} on {}: {e}",
                    spec.name,
                    spec.bind_addr()
                )
            })?;
        let bound = socket.local_addr().ok();
        if let Some(addr) = bound {
            self.accel_endpoint(addr, Some(EndpointKind::Listener));
        }
        let protection = match bound {
            Some(addr) => self.protect(addr, spec.namespace.clone(), &spec.allow_namespaces)?,
            None => None,
        };
        let connections = Arc::new(AtomicU64::new(0));
        let task = tokio::spawn(Arc::clone(&self.forwarding).serve_listener(
            socket,
            spec.routing_key.clone(),
            tls,
            Arc::clone(&connections),
        ))
        .abort_handle();
        info!(listener = %spec.name, addr = %spec.bind_addr(), routing_key = %spec.routing_key, "listener up");
        let name = spec.name.clone();
        self.inner.lock().expect("router lock").listeners.insert(
            name.clone(),
            ListenerRt {
                protection,
                cert,
                spec,
                bound,
                task,
                connections,
            },
        );
        if persist && let Err(e) = self.save_resources() {
            // Not stored, so not kept: the listener would vanish at the next restart.
            let listener = self
                .inner
                .lock()
                .expect("router lock")
                .listeners
                .remove(&name);
            if let Some(listener) = listener {
                self.retire_listener(&listener);
            }
            return Err(format!("listener {name}: failed to store it: {e}"));
        }
        Ok(())
    }

    /// Brings listeners and connectors to `resources`: creates missing ones, replaces changed
    /// ones, leaves identical ones alone. Returns one row per resource.
    async fn apply(self: &Arc<Self>, resources: Resources) -> serde_json::Value {
        let mut rows = Vec::new();
        for connector in resources.connectors {
            let existing = self
                .inner
                .lock()
                .expect("router lock")
                .connectors
                .get(&connector.name)
                .cloned();
            let name = connector.name.clone();
            let result = match existing {
                Some(old) if old == connector => Ok("unchanged"),
                Some(_) => self
                    .delete_connector(&name)
                    .and_then(|()| self.add_connector(connector, true))
                    .map(|()| "configured"),
                None => self.add_connector(connector, true).map(|()| "created"),
            };
            rows.push(apply_row("Connector", &name, result));
        }
        for listener in resources.listeners {
            let existing = self
                .inner
                .lock()
                .expect("router lock")
                .listeners
                .get(&listener.name)
                .map(|l| l.spec.clone());
            let name = listener.name.clone();
            let result = match existing {
                Some(old) if old == listener => Ok("unchanged"),
                Some(_) => match self.delete_listener(&name) {
                    Ok(()) => self
                        .add_listener(listener, true)
                        .await
                        .map(|()| "configured"),
                    Err(e) => Err(e),
                },
                None => self.add_listener(listener, true).await.map(|()| "created"),
            };
            rows.push(apply_row("Listener", &name, result));
        }
        json!(rows)
    }

    fn delete_listener(&self, name: &str) -> Result<(), String> {
        let listener = self
            .inner
            .lock()
            .expect("router lock")
            .listeners
            .remove(name)
            .ok_or_else(|| format!("no listener named {name}"))?;
        self.retire_listener(&listener);
        self.save_resources().map_err(|e| {
            format!("listener {name} deleted, but the change was not stored (it returns at the next restart): {e}")
        })
    }

    /// Stops a listener taken out of the table: no more accepts, no acceleration endpoint,
    /// no protection.
    fn retire_listener(&self, listener: &ListenerRt) {
        listener.task.abort();
        if let Some(addr) = listener.bound {
            self.accel_endpoint(addr, None);
        }
        if let Some(protection) = &listener.protection
            && let Some(isolation) = self.isolation.lock().expect("isolation lock").as_mut()
        {
            isolation.unprotect(protection);
        }
    }

    /// Removes `connector`'s backend from the accelerated endpoints, unless another connector
    /// in `inner` reaches the same address.
    fn forget_backend_endpoint(&self, inner: &Inner, connector: &Connector) {
        let shared = inner
            .connectors
            .values()
            .any(|c| c.backend_addr() == connector.backend_addr());
        if !shared && let Ok(addr) = connector.backend_addr().parse::<SocketAddr>() {
            self.accel_endpoint(addr, None);
        }
    }

    /// Protects `addr` at connect() for `namespace` and `allow` (no-op without isolation).
    fn protect(
        &self,
        addr: SocketAddr,
        namespace: Option<String>,
        allow: &[String],
    ) -> Result<Option<Protection>, String> {
        // Lock order is inner, then isolation: take the id first and let go of inner.
        let id = {
            let mut inner = self.inner.lock().expect("router lock");
            inner.next_protection_id += 1;
            inner.next_protection_id
        };
        let mut isolation = self.isolation.lock().expect("isolation lock");
        let Some(isolation) = isolation.as_mut() else {
            return Ok(None);
        };
        let mut namespaces = vec![namespace];
        namespaces.extend(allow.iter().cloned().map(Some));
        let protection = Protection {
            id,
            addr,
            allow: namespaces,
        };
        isolation.protect(&protection).map_err(|e| e.to_string())?;
        Ok(Some(protection))
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
        let target = match ip.to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(v4.into(), u16::try_from(event.port).unwrap_or(0)),
            None => SocketAddr::new(ip.into(), u16::try_from(event.port).unwrap_or(0)),
        };
        let mut denials = self.denials.lock().expect("denials lock");
        *denials.by_namespace.entry(namespace.clone()).or_default() += 1;
        if denials.recent.len() == RECENT_DENIALS {
            denials.recent.pop_front();
        }
        denials.recent.push_back(json!({
            "time": token::now_secs(),
            "namespace": namespace,
            "cgroup": event.cgroup,
            "target": target.to_string(),
        }));
        // At most one log line a second, however many connects are refused.
        denials.unlogged += 1;
        let now = std::time::Instant::now();
        if denials
            .last_log
            .is_none_or(|t| now.duration_since(t) >= Duration::from_secs(1))
        {
            warn!(namespace, %target, cgroup = event.cgroup, refused = denials.unlogged, "connect refused by namespace isolation");
            denials.last_log = Some(now);
            denials.unlogged = 0;
        }
    }

    fn isolation_summary(&self) -> String {
        let isolation = self.isolation.lock().expect("isolation lock");
        match isolation.as_ref().map(Isolation::counters) {
            None => "off".to_owned(),
            Some(Ok(c)) => format!("on: {} denied", c.denied),
            Some(Err(_)) => "on".to_owned(),
        }
    }

    fn isolation_status(&self) -> serde_json::Value {
        let isolation = self.isolation.lock().expect("isolation lock");
        let Some(isolation) = isolation.as_ref() else {
            return json!({ "mode": "off" });
        };
        let counters = isolation.counters().unwrap_or_default();
        let denials = self.denials.lock().expect("denials lock");
        json!({
            "mode": "on",
            "namespaces": self.config.namespaces,
            "allowed": counters.allowed,
            "denied": counters.denied,
            "eventsLost": counters.events_lost,
            "deniedByNamespace": denials.by_namespace,
            "recentDenials": denials.recent,
        })
    }

    /// Adds (with its kind) or removes (`None`) an accelerated endpoint; a failure costs
    /// speed, never correctness.
    fn accel_endpoint(&self, addr: SocketAddr, kind: Option<EndpointKind>) {
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

    fn delete_connector(&self, name: &str) -> Result<(), String> {
        let removed = {
            let mut inner = self.inner.lock().expect("router lock");
            let removed = inner
                .connectors
                .remove(name)
                .ok_or_else(|| format!("no connector named {name}"))?;
            self.forget_backend_endpoint(&inner, &removed);
            removed
        };
        let stored = self.save_resources().map_err(|e| {
            format!("connector {name} deleted, but the change was not stored (it returns at the next restart): {e}")
        });
        if !self.forwarding.remove_backend(name) {
            return stored; // withheld by the policy: nothing to withdraw
        }
        let own = self
            .routing
            .lock()
            .expect("routing lock")
            .remove_local_key(&removed.routing_key);
        self.flood(vec![own], None);
        stored
    }

    fn issue_token(&self, redemptions: u32, expiry_secs: u64) -> Result<Token, String> {
        let configured = self
            .config
            .link_access
            .as_deref()
            .ok_or("this site accepts no links: create it with --link-access HOST:PORT")?;
        // The configured host (the name peers reach us by), with the port actually bound.
        let host = site::host_of(configured).unwrap_or(configured);
        let port = self.link_access.get().map_or(0, SocketAddr::port);
        let url = if host.contains(':') {
            format!("[{host}]:{port}")
        } else {
            format!("{host}:{port}")
        };
        let mut id = [0u8; 8];
        let mut code = [0u8; 24];
        tls::random(&mut id).map_err(|e| e.to_string())?;
        tls::random(&mut code).map_err(|e| e.to_string())?;
        let (id, code) = (token::hex(&id), token::hex(&code));
        let grant =
            Grant::new(code.clone(), redemptions, expiry_secs).map_err(|e| e.to_string())?;
        let mut inner = self.inner.lock().expect("router lock");
        inner.grants.insert(id.clone(), grant);
        self.state
            .write_json("grants.json", &inner.grants.to_store())
            .map_err(|e| e.to_string())?;
        Ok(Token {
            url,
            grant: id,
            code,
            site: self.config.name.clone(),
            ca: self.ca.cert_pem.clone(),
        })
    }

    async fn redeem_token(
        self: &Arc<Self>,
        token: Token,
        name: Option<String>,
        cost: Option<u32>,
        connections: Option<u32>,
    ) -> Result<String, String> {
        let name = name.unwrap_or_else(|| token.site.clone());
        if token.site == self.config.name {
            return Err("this token was issued by this site; redeem it at another site".into());
        }
        let host = site::host_of(&token.url).unwrap_or(&token.url).to_owned();
        if let Err(denied) = self.gate.check(|p| p.outgoing_link(&host)) {
            self.gate.denied(&denied, false);
            return Err(denied.to_string());
        }
        let (mut config, key) = dial::redeem(&token, &self.config.name, &name)
            .await
            .map_err(|e| e.to_string())?;
        config.cost = cost.unwrap_or(config.cost);
        config.connections = connections.unwrap_or(config.connections);
        self.store_and_start_link(config, key)?;
        Ok(name)
    }

    /// Keeps an outgoing link in the state directory (its key 0600) and starts its dialers.
    fn store_and_start_link(
        self: &Arc<Self>,
        mut config: LinkConfig,
        key: String,
    ) -> Result<(), String> {
        config.cost = config.cost.max(1);
        config.connections = config
            .connections
            .clamp(1, link::MAX_CONNECTIONS_PER_PEER as u32);
        let name = &config.name;
        site::write_atomic(
            &self.state.links_dir().join(format!("{name}.key")),
            key.as_bytes(),
            0o600,
        )
        .map_err(|e| e.to_string())?;
        self.state
            .write_json(&format!("links/{name}.json"), &config)
            .map_err(|e| e.to_string())?;
        // The operator linked to this site anew: it is no longer revoked here.
        self.unrevoke(&config.peer_site)?;
        self.start_link(config, key);
        Ok(())
    }

    /// Stores and starts an outgoing link whose credential came with the request (checked
    /// first), as a redeemed token's would be.
    fn create_link(self: &Arc<Self>, config: LinkConfig, key: String) -> Result<(), String> {
        let name = config.name.clone();
        if config.peer_site == self.config.name {
            return Err("a site cannot link to itself".into());
        }
        if site::host_of(&config.url).is_none() {
            return Err(format!(
                "invalid address {:?}: expected HOST:PORT",
                config.url
            ));
        }
        if self
            .inner
            .lock()
            .expect("router lock")
            .outgoing
            .contains_key(&name)
        {
            return Err(format!("link {name} already exists"));
        }
        let pair = CertKey {
            cert_pem: config.cert.clone(),
            key_pem: key,
        };
        pki::validate_link_credential(&pair, &config.ca, &self.config.name)
            .map_err(|e| format!("link {name}: {e}"))?;
        let host = site::host_of(&config.url).unwrap_or(&config.url).to_owned();
        if let Err(denied) = self.gate.check(|p| p.outgoing_link(&host)) {
            self.gate.denied(&denied, false);
            return Err(denied.to_string());
        }
        self.store_and_start_link(config, pair.key_pem)
    }

    fn delete_link(&self, name: &str) -> Result<(), String> {
        let removed = self
            .inner
            .lock()
            .expect("router lock")
            .outgoing
            .remove(name);
        let Some(link) = removed else {
            return Err(format!("no link named {name}"));
        };
        link.tasks.iter().for_each(AbortHandle::abort);
        let _ = std::fs::remove_file(self.state.links_dir().join(format!("{name}.json")));
        let _ = std::fs::remove_file(self.state.links_dir().join(format!("{name}.key")));
        Ok(())
    }

    fn status(&self) -> serde_json::Value {
        let inner = self.inner.lock().expect("router lock");
        json!({
            "site": self.config.name,
            "linkAccess": self.config.link_access,
            "links": self.forwarding.links().len(),
            "linksRefused": self.links_refused.load(Ordering::Relaxed),
            "listeners": inner.listeners.len(),
            "connectors": inner.connectors.len(),
            "activeConnections": self.forwarding.active(),
            "memory": {
                "trims": self.forwarding.trimmer().trims(),
                "connectionsEnded": self.forwarding.trimmer().ended_count(),
                "trimmedAfter": self.forwarding.trimmer().trimmed_after(),
            },
            "datapath": self.forwarding.datapath().backend(),
            "datapathSummary": self.forwarding.datapath().note(),
            "uringConnections": self.forwarding.datapath().uring_connections(),
            "accel": self.accel_status(),
            "accelSummary": self.accel_note,
            "isolation": self.isolation_status(),
            "isolationSummary": self.isolation_summary(),
            "metricsAddr": self.metrics_addr.get(),
        })
    }

    fn accel_status(&self) -> serde_json::Value {
        let accel = self.accel.lock().expect("accel lock");
        let Some(accel) = accel.as_ref() else {
            return json!({ "mode": self.accel_note });
        };
        let counters = accel.counters().unwrap_or_default();
        json!({
            "mode": self.accel_note,
            "pinDir": accel.pin_dir(),
            "sockets": accel.socks_len().ok(),
            "countedSockets": accel.backpressure().counted_len().ok(),
            "socketsInserted": counters.socks_inserted,
            "insertFailures": counters.socks_insert_failed,
            "socketsNotTheRouters": counters.socks_foreign,
            "messagesRedirected": counters.msg_redirected,
            "bytesRedirected": counters.bytes_redirected,
            "messagesMissed": counters.msg_missed,
            "messagesDiverted": counters.msg_diverted,
            "messagesShortcut": counters.msg_shortcut,
            "bytesShortcut": counters.bytes_shortcut,
            "messagesOverBudget": counters.shortcut_over_budget,
            "messagesBehindRouter": counters.shortcut_behind,
            "shortcutsOffered": counters.backpressure.shortcuts_offered,
            "shortcutsGivenUp": counters.backpressure.shortcuts_given_up,
            "sendersDiverted": counters.backpressure.senders_diverted,
            "divertFailures": counters.backpressure.divert_failures,
            "writesPaused": counters.backpressure.writes_paused,
            "queueLimit": accel.backpressure().limit(),
        })
    }

    fn link_status(&self) -> serde_json::Value {
        let links: HashMap<String, Vec<Arc<Link>>> = self.forwarding.links().into_iter().collect();
        let inner = self.inner.lock().expect("router lock");
        let mut rows = Vec::new();
        // Each row counts only its own connections: those an outgoing link dialled, or those
        // a peer dialled in, never another link's to the same peer.
        for (name, out) in &inner.outgoing {
            let peer = &out.config.peer_site;
            let own: Vec<&Arc<Link>> = links
                .get(peer)
                .into_iter()
                .flatten()
                .filter(|l| matches!(&l.direction, link::Direction::Outgoing(n) if n == name))
                .collect();
            let mut row = link_row(name, "outgoing", peer, &own);
            if let Some(reason) = &out.denied {
                row["status"] = json!("denied");
                row["reason"] = json!(reason);
            }
            rows.push(row);
        }
        let mut peers: Vec<_> = links.iter().collect();
        peers.sort_by_key(|(peer, _)| peer.as_str());
        for (peer, links) in peers {
            let incoming: Vec<&Arc<Link>> = links
                .iter()
                .filter(|l| l.direction == link::Direction::Incoming)
                .collect();
            if !incoming.is_empty() {
                rows.push(link_row(peer, "incoming", peer, &incoming));
            }
        }
        json!(rows)
    }

    fn network_status(&self) -> serde_json::Value {
        let routing = self.routing.lock().expect("routing lock");
        let rows: Vec<_> = routing
            .network()
            .into_iter()
            .map(|r| {
                json!({
                    "site": r.name,
                    "cost": r.cost,
                    "reachable": r.cost.is_some(),
                    "routingKeys": r.keys,
                    "links": r.links.iter().map(|(n, c)| json!({"peer": n, "cost": c})).collect::<Vec<_>>(),
                    "linkSummary": r.links.iter().map(|(n, c)| format!("{n}(cost {c})")).collect::<Vec<_>>(),
                })
            })
            .collect();
        json!(rows)
    }
}

fn apply_row(kind: &str, name: &str, result: Result<&str, String>) -> serde_json::Value {
    match result {
        Ok(outcome) => json!({"kind": kind, "name": name, "result": outcome}),
        Err(error) => json!({"kind": kind, "name": name, "result": "failed", "error": error}),
    }
}

fn link_row(name: &str, direction: &str, peer: &str, links: &[&Arc<Link>]) -> serde_json::Value {
    let up = links.iter().filter(|l| !l.is_closed()).count();
    let sum = |f: fn(&Link) -> u64| links.iter().map(|l| f(l)).sum::<u64>();
    json!({
        "name": name,
        "direction": direction,
        "peer": peer,
        "status": if up > 0 { "up" } else { "down" },
        "connections": up,
        // The lowest version any connection agreed on: what the link as a whole can carry.
        "protocolVersion": links.iter().filter(|l| !l.is_closed()).map(|l| l.version).min(),
        "rttMicros": links.iter().map(|l| l.stats.rtt_us.load(Ordering::Relaxed)).min(),
        "streams": links.iter().map(|l| l.stream_count()).sum::<usize>(),
        "bytesIn": sum(|l| l.stats.bytes_in.load(Ordering::Relaxed)),
        "bytesOut": sum(|l| l.stats.bytes_out.load(Ordering::Relaxed)),
    })
}

impl Events for Router {
    fn link_up(&self, link: &Arc<Link>) {
        if self.is_revoked(&link.peer) {
            link.shut(format!("the site {} was revoked here", link.peer));
            return;
        }
        // admit_link counts before the handshake ends; connections racing past it stop here.
        let first = match self.forwarding.add_link(link) {
            Ok(first) => first,
            Err(e) => {
                link.shut(e.to_string());
                return;
            }
        };
        let cost = match &link.direction {
            link::Direction::Outgoing(name) => self
                .inner
                .lock()
                .expect("router lock")
                .outgoing
                .get(name)
                .map_or(1, |o| o.config.cost),
            link::Direction::Incoming => 1,
        };
        let (own, all) = {
            let mut routing = self.routing.lock().expect("routing lock");
            let own = first.then(|| routing.link_up(&link.peer, cost));
            (own, routing.all_states())
        };
        if let Some(own) = own {
            self.flood(vec![own], Some(&link.peer));
        }
        // The new neighbour learns everything we know.
        let link = Arc::clone(link);
        tokio::spawn(async move {
            for state in all {
                if link.send(Frame::LinkState(state)).await.is_err() {
                    return;
                }
            }
        });
    }

    fn link_down(&self, link: &Arc<Link>) {
        if self.forwarding.remove_link(link) {
            let own = self
                .routing
                .lock()
                .expect("routing lock")
                .link_down(&link.peer);
            self.flood(vec![own], None);
        }
    }

    fn link_state(self: Arc<Self>, from: &Arc<Link>, state: LinkState) {
        let received = self
            .routing
            .lock()
            .expect("routing lock")
            .receive(state.clone());
        let refusal = match received {
            Received::New => {
                self.flood(vec![state], Some(&from.peer));
                return;
            }
            Received::Old => return,
            Received::Refuted(own) => {
                self.flood(vec![own], None);
                format!(
                    "a copy of this router's own link state numbered {}: re-originated above it",
                    state.seq
                )
            }
            Received::RefuteLater => {
                let router = Arc::clone(&self);
                tokio::spawn(async move {
                    tokio::time::sleep(routing::REFUTE_EVERY).await;
                    let own = router.routing.lock().expect("routing lock").refute_now();
                    router.flood(vec![own], None);
                });
                format!(
                    "another copy of this router's own link state numbered {} within {:?}: another site may use this site's name",
                    state.seq,
                    routing::REFUTE_EVERY
                )
            }
            Received::Refused(why) => why.to_string(),
        };
        let log = self
            .link_state_refusals
            .lock()
            .expect("refusals lock")
            .hit();
        if let Some(unlogged) = log {
            warn!(peer = %from.peer, unlogged, "link state refused: {refusal}");
        }
    }

    fn open(self: Arc<Self>, _link: &Arc<Link>, open: Open, tx: StreamTx, rx: StreamRx) {
        let forwarding = Arc::clone(&self.forwarding);
        tokio::spawn(async move { forwarding.serve_stream(open, tx, rx).await });
    }
}

impl metrics::Source for Router {
    fn snapshot(&self) -> metrics::Snapshot {
        let link_connections = self
            .forwarding
            .links()
            .iter()
            .map(|(_, l)| l.len() as u64)
            .sum();
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
        let policy_denials = self
            .gate
            .denials()
            .into_iter()
            .map(|(c, n)| (c.as_str(), n))
            .collect();
        metrics::Snapshot {
            policy_denials,
            active_connections: self.forwarding.active() as u64,
            datapath: self.forwarding.datapath().backend(),
            uring_connections: self.forwarding.datapath().uring_connections(),
            links_refused: self.links_refused.load(Ordering::Relaxed),
            link_connections,
            accel,
            accel_sockets,
            isolation,
            denied_by_namespace,
        }
    }
}

impl Access for Router {
    fn site_name(&self) -> &str {
        &self.config.name
    }

    fn admit_link(&self, peer_site: &str, fingerprint: &str) -> Result<(), String> {
        let admitted = (|| {
            {
                let inner = self.inner.lock().expect("router lock");
                if inner.credentials.is_revoked(fingerprint) || inner.revoked.contains(peer_site) {
                    return Err(format!(
                        "the link credential of site {peer_site} was revoked"
                    ));
                }
                let open = self.forwarding.links_to(peer_site).len();
                if open >= link::MAX_CONNECTIONS_PER_PEER {
                    return Err(format!(
                        "site {peer_site} already has {open} link connections here, the most one site may hold"
                    ));
                }
            }
            self.gate
                .check(|p| p.incoming_link(peer_site))
                .map_err(|denied| {
                    self.gate.denied(&denied, false);
                    denied.to_string()
                })
        })();
        if admitted.is_err() {
            self.links_refused.fetch_add(1, Ordering::Relaxed);
        }
        admitted
    }

    fn redeem(&self, source: SocketAddr, request: RedeemRequest) -> RedeemResponse {
        // Before the grant is spent: a name that cannot be had, or a site the policy refuses,
        // keeps nothing from trying.
        if let Err(reason) = self.name_available(&request.site) {
            return RedeemResponse::error(reason);
        }
        if let Err(denied) = self.gate.check(|p| p.incoming_link(&request.site)) {
            self.gate.denied(&denied, false);
            return RedeemResponse::error(denied.to_string());
        }
        // The code is checked before anything is signed, and the redemption is spent only
        // once the credential can be kept: a refused request costs the grant nothing.
        let authorized = self.inner.lock().expect("router lock").grants.authorize(
            source.ip(),
            &request.grant,
            &request.code,
        );
        if let Err(e) = authorized {
            return RedeemResponse::error(e.to_string());
        }
        let certificate = match pki::sign_csr(&self.ca, &request.csr, &request.site) {
            Ok(certificate) => certificate,
            Err(e) => {
                return RedeemResponse::error(format!("certificate signing request refused: {e}"));
            }
        };
        let Some(der) = pki::certs_from_pem(&certificate)
            .ok()
            .and_then(|certs| certs.into_iter().next())
        else {
            return RedeemResponse::error("the signed certificate could not be read back");
        };
        {
            // One lock for the second name check, the spend and the record: of two
            // redemptions racing for one name or one grant's last use, the second is refused.
            let linked = !self.forwarding.links_to(&request.site).is_empty();
            let mut inner = self.inner.lock().expect("router lock");
            if let Some(why) = name_taken(&inner, linked, &request.site) {
                return RedeemResponse::error(self.name_refused(&request.site, why));
            }
            if let Err(e) = inner.grants.spend(&request.grant) {
                return RedeemResponse::error(e.to_string());
            }
            let fingerprint = pki::fingerprint(&der);
            inner.credentials.issued(fingerprint.clone(), &request.site);
            // The credential is recorded before the grant's use is: a failure leaves neither.
            if let Err(e) = self
                .state
                .write_json("credentials.json", &inner.credentials)
            {
                inner.credentials.forget(&fingerprint);
                inner.grants.refund(&request.grant);
                return RedeemResponse::error(format!("failed to record the credential: {e}"));
            }
            if let Err(e) = self
                .state
                .write_json("grants.json", &inner.grants.to_store())
            {
                warn!(error = %e, "failed to persist grants");
            }
        }
        // Invited again: no longer revoked here.
        if let Err(e) = self.unrevoke(&request.site) {
            return RedeemResponse::error(e);
        }
        RedeemResponse::Ok {
            certificate,
            ca: self.ca.cert_pem.clone(),
            site: self.config.name.clone(),
        }
    }
}

impl Router {
    /// Whether a redeemer may be given a link credential for site `name`. A site's name is its
    /// identity: it must be a DNS label, not this site's own, not held by a credential this
    /// site signed and has not revoked, and not linked here now. A name known elsewhere in the
    /// network is not refused: that is how a site adds a second path (docs/security.md says
    /// what a token holder can claim).
    fn name_available(&self, name: &str) -> Result<(), String> {
        if !service::is_dns_label(name) {
            return Err(format!(
                "site name {:?} is not valid: use 1 to {} lowercase letters, digits and '-'",
                name.chars().take(40).collect::<String>(),
                service::MAX_NAME
            ));
        }
        if name == self.config.name {
            return Err(self.name_refused(name, "the issuing site's own"));
        }
        let linked = !self.forwarding.links_to(name).is_empty();
        match name_taken(&self.inner.lock().expect("router lock"), linked, name) {
            Some(why) => Err(self.name_refused(name, why)),
            None => Ok(()),
        }
    }

    fn name_refused(&self, name: &str, why: &str) -> String {
        format!(
            "site name {name} is {why}: a site's name is its identity and cannot be taken over; redeem as another site, or revoke {name} at {} first",
            self.config.name
        )
    }
}

/// Why `name` is held by a site this one knows, if it is.
fn name_taken(inner: &Inner, linked: bool, name: &str) -> Option<&'static str> {
    if inner.credentials.holds(name) {
        Some("held by a credential this site signed")
    } else if linked {
        Some("linked to this site")
    } else {
        None
    }
}

impl admin::Handler for Router {
    async fn handle(self: Arc<Self>, request: Request) -> Response {
        let result: Result<serde_json::Value, String> = match request {
            Request::Status => Ok(self.status()),
            Request::NetworkStatus => Ok(self.network_status()),
            Request::LinkStatus => Ok(self.link_status()),
            Request::TokenIssue {
                redemptions,
                expiry_secs,
            } => self.issue_token(redemptions, expiry_secs).map(|t| json!(t)),
            Request::TokenRedeem {
                token,
                name,
                cost,
                connections,
            } => self
                .redeem_token(token, name, cost, connections)
                .await
                .map(|n| json!({ "link": n })),
            Request::LinkDelete { name } => self.delete_link(&name).map(|()| json!({})),
            Request::LinkCreate {
                name,
                url,
                peer_site,
                ca,
                cert,
                key,
                cost,
                connections,
            } => {
                let config = LinkConfig {
                    name: name.clone(),
                    url,
                    peer_site,
                    ca,
                    cert,
                    cost: cost.unwrap_or(1),
                    connections: connections.unwrap_or(1),
                };
                self.create_link(config, key)
                    .map(|()| json!({ "link": name }))
            }
            Request::LinkRevoke { site } => self.revoke(&site),
            Request::RotateCerts => self.rotate_certs(),
            Request::ListenerCreate { listener } => {
                self.add_listener(listener, true).await.map(|()| json!({}))
            }
            Request::ListenerDelete { name } => self.delete_listener(&name).map(|()| json!({})),
            Request::ListenerStatus => {
                let inner = self.inner.lock().expect("router lock");
                let routing = self.routing.lock().expect("routing lock");
                Ok(json!(
                    inner
                        .listeners
                        .values()
                        .map(|l| json!({
                            "name": l.spec.name,
                            "host": l.spec.host,
                            "port": l.bound.map_or(l.spec.port, |b| b.port()),
                            "routingKey": l.spec.routing_key,
                            "reachable": routing.choose(&l.spec.routing_key).is_some(),
                            "connections": l.connections.load(Ordering::Relaxed),
                        }))
                        .collect::<Vec<_>>()
                ))
            }
            Request::ConnectorCreate { connector } => {
                self.add_connector(connector, true).map(|()| json!({}))
            }
            Request::ConnectorDelete { name } => self.delete_connector(&name).map(|()| json!({})),
            Request::ConnectorStatus => {
                let inner = self.inner.lock().expect("router lock");
                Ok(json!(inner.connectors.values().collect::<Vec<_>>()))
            }
            Request::Apply { resources } => Ok(self.apply(resources).await),
            Request::PolicySet { policy } => self.set_policy(policy),
            Request::PolicyStatus => Ok(self.policy_status()),
            Request::ServiceBundle { kind, name } => self.service_bundle(kind, &name),
            Request::Shutdown => {
                self.shutdown.notify_one();
                Ok(json!({}))
            }
        };
        match result {
            Ok(value) => Response::Ok(value),
            Err(message) => Response::Error(message),
        }
    }
}
