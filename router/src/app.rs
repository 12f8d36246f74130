//! The running router: builds the owners, wires them together, serves the admin API and
//! waits for the signal to stop.
//!
//! Owners: [`Node`] (eBPF programs), [`Forwarding`] (new connections and streams, and the
//! table they consult), [`Network`] (routing and floods), [`Services`] (listeners and
//! connectors), [`Links`] (links, tokens, credentials), [`Certs`] (certificates),
//! [`Namespaces`] (namespaces set at run time) and the policy [`Gate`]. This file holds no state of its own beyond the shutdown signal.
//!
//! Threads: one tokio multi-threaded runtime for the control plane and the epoll data path;
//! io_uring workers of their own when that backend runs (see [`crate::datapath`]).

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, Mutex, OnceLock, atomic::Ordering},
    time::Duration,
};

use serde::Serialize;
use serde_json::json;
use tokio::{net::TcpListener, task::AbortHandle};
use tracing::{info, warn};

use crate::{
    admin::{self, Request, Response},
    console,
    control::{
        certs::Certs, links::Links, namespaces::Namespaces, network::Network, services::Services,
    },
    datapath::{self, DataPath},
    flows::Flows,
    forward::{Forwarding, ServiceStats},
    isolation,
    link::{self, dial::LinkConfig},
    metrics,
    node::{AccelView, IsolationView, Node, error_chain},
    policy::{Gate, Policy},
    routing::Routing,
    site::{self, SiteConfig, StateDir},
    tls::{self, handshakes::Handshakes},
};

pub use crate::node::{AccelMode, Kernel};

/// How long shutdown waits for open connections to finish, unless told otherwise.
pub const DRAIN_DEADLINE: Duration = Duration::from_secs(10);

/// Options of `skiff router run`.
#[derive(Clone, Debug, Default)]
pub struct RunOptions {
    pub accel: AccelMode,
    /// The data-path backend; the site's `datapath`, else auto, when `None`.
    pub datapath: Option<datapath::Mode>,
    /// The cgroup (v2 directory) whose sockets the programs see.
    pub cgroup: Option<PathBuf>,
    /// `HOST:PORT` to serve Prometheus metrics on (`/metrics`), if any.
    pub metrics_addr: Option<String>,
    /// A file to append a JSON line to for each ended connection (`-`: standard output).
    pub flow_log: Option<String>,
    /// The uid the state directory must belong to: `None` for this process's own, or the
    /// `--user` the router is about to become.
    pub owner: Option<u32>,
    /// How long shutdown waits for open connections to finish (`None`: [`DRAIN_DEADLINE`]).
    pub drain: Option<Duration>,
    /// `[HOST:]PORT` to serve the read-only web console on, if any (a bare port: loopback).
    pub console_addr: Option<String>,
}

/// Failure to start the router.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Site(#[from] site::Error),
    #[error(transparent)]
    Tls(#[from] tls::Error),
    #[error(transparent)]
    Node(#[from] crate::node::Error),
    #[error("failed to bind {what} on {addr}")]
    Bind {
        what: &'static str,
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("failed to bind the admin socket")]
    Admin(#[source] std::io::Error),
    #[error("failed to open the flow log {path}")]
    FlowLog {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("failed to install the signal handler")]
    Signal(#[source] std::io::Error),
    #[error("datapath uring: {0}")]
    Datapath(#[source] datapath::uring::Unavailable),
    #[error(transparent)]
    Console(#[from] console::Error),
}

/// A running router.
pub struct Router {
    config: SiteConfig,
    state: StateDir,
    node: Arc<Node>,
    forwarding: Arc<Forwarding>,
    network: Arc<Network>,
    gate: Arc<Gate>,
    certs: Arc<Certs>,
    services: Arc<Services>,
    links: Arc<Links>,
    namespaces: Arc<Namespaces>,
    shutdown: tokio::sync::Notify,
    metrics_addr: OnceLock<SocketAddr>,
    console_addr: OnceLock<SocketAddr>,
}

impl std::fmt::Debug for Router {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Router")
            .field("site", &self.config.name)
            .finish_non_exhaustive()
    }
}

impl Kernel {
    /// [`Kernel::attach`] with `skiff router run`'s options.
    ///
    /// # Errors
    /// As [`Kernel::attach`].
    pub fn attach_for(state: &StateDir, options: &RunOptions) -> Result<Self, Error> {
        Ok(Self::attach(
            state,
            options.accel,
            options.cgroup.as_deref(),
            options.owner,
        )?)
    }
}

/// Runs the router of the site in `state` until SIGTERM, SIGINT or an admin shutdown,
/// attaching the eBPF programs `options` ask for first.
///
/// # Errors
/// When the site cannot be loaded, the programs cannot be attached, or a port cannot be bound.
pub async fn run(state: StateDir, options: RunOptions) -> Result<(), Error> {
    let kernel = Kernel::attach_for(&state, &options)?;
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
    let (node, lock) = kernel.into_node();
    let node = Arc::new(node);
    // Before the listeners that name them are restored.
    let namespaces = Arc::new(Namespaces::new(&state, Arc::clone(&node)));
    namespaces.restore(state.read_json_or_default("namespaces.json")?);
    let certs = Arc::new(Certs::load(&config, &state)?);
    let policy: Option<Policy> = state.read_json_or_default("policy.json")?;
    let gate = Arc::new(Gate::new(policy));
    let mode = options.datapath.or(config.datapath).unwrap_or_default();
    let datapath = node.with_accel(|accel| DataPath::new(mode, accel).map_err(Error::Datapath))?;
    if datapath.backend() == "uring" || mode == datapath::Mode::Epoll {
        info!(datapath = datapath.note(), "data path");
    } else {
        warn!(
            datapath = datapath.note(),
            "io_uring unavailable: data path on epoll"
        );
    }
    let routing = Arc::new(Mutex::new(Routing::new(&config.name)));
    let flows = match &options.flow_log {
        None => Flows::new(),
        Some(path) => Flows::with_log(path).map_err(|source| Error::FlowLog {
            path: path.clone(),
            source,
        })?,
    };
    let forwarding = Arc::new(Forwarding::new(
        config.name.clone(),
        datapath,
        Arc::clone(&routing),
        Arc::clone(&gate),
        Arc::new(flows),
    ));
    let network = Arc::new(Network::new(routing, Arc::clone(&forwarding)));
    let services = Arc::new(Services::new(
        &state,
        Arc::clone(&forwarding),
        Arc::clone(&network),
        Arc::clone(&gate),
        Arc::clone(&node),
        Arc::clone(&certs),
    ));
    let links = Arc::new(Links::load(
        &config,
        &state,
        Arc::clone(&forwarding),
        Arc::clone(&network),
        Arc::clone(&gate),
        Arc::clone(&certs),
    )?);
    let router = Arc::new(Router {
        config,
        state,
        node,
        forwarding,
        network,
        gate,
        certs,
        services,
        links,
        namespaces,
        shutdown: tokio::sync::Notify::new(),
        metrics_addr: OnceLock::new(),
        console_addr: OnceLock::new(),
    });

    let mut background = Vec::new();
    if let Some(addr) = router.config.link_access.clone() {
        background.push(router.serve_link_access(&addr).await?);
    }
    if let Some(addr) = &options.metrics_addr {
        background.push(router.serve_metrics(addr).await?);
    }
    if let Some(addr) = &options.console_addr {
        background.push(router.serve_console(addr).await?);
    }
    if let Some(events) = router.node.take_deny_events() {
        background.push(tokio::spawn(Arc::clone(&router.node).read_denials(events)).abort_handle());
        match isolation::AddressWatch::new() {
            Ok(watch) => background.push(
                tokio::spawn(Arc::clone(&router.node).follow_addresses(watch)).abort_handle(),
            ),
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
    router.links.exclude_revoked();
    router
        .services
        .restore(router.state.read_json_or_default("resources.json")?)
        .await;
    router.links.restore();

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
    router
        .drain(background, options.drain.unwrap_or(DRAIN_DEADLINE))
        .await;
    router.node.detach();
    let _ = std::fs::remove_file(router.state.admin_socket());
    drop(lock);
    Ok(())
}

impl Router {
    /// Binds link access (protected from workload namespaces) and serves it.
    async fn serve_link_access(self: &Arc<Self>, addr: &str) -> Result<AbortHandle, Error> {
        let listener = self
            .forwarding
            .datapath()
            .listen(addr)
            .await
            .map(datapath::Listener::into_tokio)
            .map_err(|source| Error::Bind {
                what: "link access",
                addr: addr.to_owned(),
                source,
            })?;
        let config = self.certs.link_access_config()?;
        if let Ok(bound) = listener.local_addr() {
            self.links.set_bound(bound);
            // Workload namespaces may not reach the link-access port; callers in no
            // namespace (other routers, the host) may.
            if let Err(e) = self.node.protect(bound, None, &[]) {
                warn!(error = %error_chain(&e), "failed to protect the link-access port");
            }
        }
        info!(%addr, "link access listening");
        Ok(tokio::spawn(link::access::serve(
            listener,
            config,
            Arc::clone(&self.links),
        ))
        .abort_handle())
    }

    /// Serves the console on `addr`, with a new token in `STATE/console.token` (0600): only
    /// who may read the state directory may read the console.
    async fn serve_console(self: &Arc<Self>, addr: &str) -> Result<AbortHandle, Error> {
        let addr = console::address(addr)?;
        let listener = TcpListener::bind(&addr)
            .await
            .map_err(|source| Error::Bind {
                what: "console",
                addr: addr.clone(),
                source,
            })?;
        let token = console::token()?;
        let file = self.state.file("console.token");
        site::write_atomic(&file, token.as_bytes(), 0o600)?;
        if let Ok(bound) = listener.local_addr() {
            let _ = self.console_addr.set(bound);
            info!(addr = %bound, token_file = %file.display(), "console on http://ADDR/?token=TOKEN");
        }
        let source = Arc::downgrade(self);
        Ok(tokio::spawn(console::serve(listener, token, source)).abort_handle())
    }

    async fn serve_metrics(self: &Arc<Self>, addr: &str) -> Result<AbortHandle, Error> {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| Error::Bind {
                what: "metrics",
                addr: addr.to_owned(),
                source,
            })?;
        if let Ok(bound) = listener.local_addr() {
            let _ = self.metrics_addr.set(bound);
            info!(addr = %bound, "metrics on /metrics");
        }
        let source = Arc::clone(self);
        Ok(tokio::spawn(async move { metrics::serve(listener, &source).await }).abort_handle())
    }

    /// Stops accepting, then waits for open connections to finish, up to a deadline.
    async fn drain(&self, background: Vec<AbortHandle>, deadline: Duration) {
        for task in background {
            task.abort();
        }
        self.services.stop_listeners();
        let left = self.forwarding.drain(deadline).await;
        if left > 0 {
            warn!(
                connections = left,
                "drain deadline passed; closing the rest"
            );
        }
    }

    /// Replaces the router identity and every TLS listener's certificate this site issued
    /// with new ones from the same CAs. Established links and streams keep going on the
    /// certificates they were made with; new handshakes get the new ones.
    async fn rotate_certs(&self) -> Result<Rotated, RotateError> {
        let identity = self.certs.rotate_identity().await?;
        let listeners = self.services.rotate()?;
        info!(listeners, "certificates rotated");
        Ok(Rotated {
            router_identity: identity,
            listeners,
        })
    }

    /// Replaces the site policy (`None` removes it), stored first, and applies it to what
    /// exists (see [`Links::apply_policy`] and [`Services::apply_policy`]).
    async fn set_policy(&self, policy: Option<Policy>) -> Result<PolicyChange, PolicyError> {
        let state = self.state.clone();
        let path = state.file("policy.json");
        let stored = tokio::task::spawn_blocking({
            let policy = policy.clone();
            move || match &policy {
                Some(p) => state.write_json("policy.json", p),
                None => match std::fs::remove_file(state.file("policy.json")) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(site::Error::Io {
                        path: state.file("policy.json"),
                        source: e,
                    }),
                    _ => Ok(()),
                },
            }
        })
        .await
        .unwrap_or_else(|e| {
            Err(site::Error::Io {
                path,
                source: std::io::Error::other(e),
            })
        });
        stored.map_err(PolicyError)?;
        self.gate.set(policy);
        let links = self.links.apply_policy();
        let services = self.services.apply_policy();
        info!(
            closed = links.closed.len(),
            stopped = links.stopped.len(),
            resumed = links.resumed.len(),
            withdrawn = services.withdrawn.len(),
            "site policy applied"
        );
        Ok(PolicyChange {
            closed_incoming_links: links.closed,
            stopped_links: links.stopped,
            resumed_links: links.resumed,
            withdrawn_connectors: services.withdrawn,
            advertised_connectors: services.advertised,
            refusing_listeners: services.refusing,
        })
    }

    fn status(&self) -> Status {
        let (listeners, connectors) = self.services.counts();
        let datapath = self.forwarding.datapath();
        let trimmer = self.forwarding.trimmer();
        // One read, so that the two counts come from the same moment.
        let (uring_links, uring_streams) = datapath.uring_carried();
        Status {
            site: self.config.name.clone(),
            link_access: self.config.link_access.clone(),
            links: self.forwarding.links().len(),
            links_refused: self.links.refused(),
            listeners,
            connectors,
            active_connections: self.forwarding.active(),
            memory: Memory {
                trims: trimmer.trims(),
                connections_ended: trimmer.ended_count(),
                trimmed_after: trimmer.trimmed_after(),
            },
            datapath: datapath.backend(),
            datapath_summary: datapath.note().to_owned(),
            uring_connections: datapath.uring_connections(),
            uring_links,
            uring_streams,
            uring_starved_receives: datapath.uring_starved(),
            receive_budget: {
                let (bytes, allotted) = datapath.receive_budget();
                ReceiveBudget { bytes, allotted }
            },
            accel: self.node.accel_view(),
            accel_summary: self.node.accel_summary().to_owned(),
            isolation: self.node.isolation_view(),
            isolation_summary: self.node.isolation_summary(),
            metrics_addr: self.metrics_addr.get().copied(),
            console_addr: self.console_addr.get().copied(),
        }
    }

    fn policy_status(&self) -> PolicyStatus {
        PolicyStatus {
            policy: self.gate.policy(),
            denials: self
                .gate
                .denials()
                .into_iter()
                .filter(|(_, n)| *n > 0)
                .map(|(c, n)| (c.as_str(), n))
                .collect(),
        }
    }
}

/// `skiff policy status`: the policy in force and its denials by control.
#[derive(Debug, Serialize)]
struct PolicyStatus {
    policy: Option<Policy>,
    denials: BTreeMap<&'static str, u64>,
}

/// A rotation that failed: the router identity, or a listener's certificate (those before it
/// are renewed).
#[derive(Debug, thiserror::Error)]
enum RotateError {
    #[error(transparent)]
    Identity(#[from] crate::control::certs::Error),
    #[error(transparent)]
    Listener(#[from] crate::control::services::Error),
}

/// A site policy that could not be stored (and so was not applied).
#[derive(Debug, thiserror::Error)]
#[error("failed to store the policy")]
struct PolicyError(#[source] site::Error);

/// `skiff status`.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct Status {
    site: String,
    link_access: Option<String>,
    links: usize,
    links_refused: u64,
    listeners: usize,
    connectors: usize,
    active_connections: usize,
    memory: Memory,
    datapath: &'static str,
    datapath_summary: String,
    uring_connections: u64,
    /// Link connections the io_uring workers carried, and link streams they served.
    uring_links: u64,
    uring_streams: u64,
    /// Receives that found a worker's buffer ring empty and waited for a buffer.
    uring_starved_receives: u64,
    /// What relayed streams' sockets may pin of TCP's memory, and what they hold.
    receive_budget: ReceiveBudget,
    accel: AccelView,
    accel_summary: String,
    isolation: IsolationView,
    isolation_summary: String,
    metrics_addr: Option<SocketAddr>,
    console_addr: Option<SocketAddr>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct ReceiveBudget {
    bytes: usize,
    allotted: usize,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct Memory {
    trims: u64,
    connections_ended: u64,
    trimmed_after: u64,
}

/// What a certificate rotation replaced.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct Rotated {
    router_identity: String,
    listeners: usize,
}

/// What a new site policy changed.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct PolicyChange {
    closed_incoming_links: Vec<String>,
    stopped_links: Vec<String>,
    resumed_links: Vec<String>,
    withdrawn_connectors: Vec<String>,
    advertised_connectors: Vec<String>,
    refusing_listeners: Vec<String>,
}

/// Renews the router identity and TLS listeners' certificates whenever the identity has less
/// than a third of the site's certificate lifetime left, including at start when it is
/// already that old (or expired: a router down for a long time comes back valid).
async fn renew_certificates(router: Arc<Router>) {
    let lifetime = router.config.cert_lifetime().whole_seconds().max(3);
    // Look ten times per lifetime, but never more than once a second or less than hourly.
    let every = Duration::from_secs(u64::try_from(lifetime / 10).unwrap_or(1).clamp(1, 3_600));
    loop {
        let left = router.certs.identity_left_secs();
        if left < lifetime / 3 {
            match router.rotate_certs().await {
                Ok(_) => info!(left_secs = left, "certificates renewed before expiry"),
                Err(e) => warn!(error = %error_chain(&e), "certificate renewal failed; retrying"),
            }
        }
        tokio::time::sleep(every).await;
    }
}

/// An owner's answer as the admin API sends it: the view as JSON, or the error on one line.
fn reply<T: Serialize, E: std::error::Error>(
    result: Result<T, E>,
) -> Result<serde_json::Value, String> {
    match result {
        Ok(value) => serde_json::to_value(value).map_err(|e| e.to_string()),
        Err(e) => Err(error_chain(&e)),
    }
}

/// A view that cannot fail, as the admin API sends it.
fn view<T: Serialize>(value: T) -> Result<serde_json::Value, String> {
    serde_json::to_value(value).map_err(|e| e.to_string())
}

fn done<E: std::error::Error>(result: Result<(), E>) -> Result<serde_json::Value, String> {
    reply(result.map(|()| json!({})))
}

impl console::Source for Router {
    /// The views the CLI's status commands show, together, for the console's page.
    fn view(&self) -> serde_json::Value {
        json!({
            "site": self.config.name,
            "status": self.status(),
            "network": self.network.view(),
            "links": self.links.views(),
            "listeners": self.services.listener_views(),
            "connectors": self.services.connectors(),
            "flows": self.forwarding.flows().since(0),
            "policy": self.policy_status(),
            "certificates": [
                {"certificate": "router", "expiresAt": self.certs.identity_expires_at()},
            ],
        })
    }
}

impl admin::Handler for Router {
    async fn handle(self: Arc<Self>, request: Request) -> Response {
        let result: Result<serde_json::Value, String> = match request {
            Request::Status => view(self.status()),
            Request::NetworkStatus => view(self.network.view()),
            Request::LinkStatus => view(self.links.views()),
            Request::TokenIssue {
                redemptions,
                expiry_secs,
            } => reply(self.links.issue_token(redemptions, expiry_secs).await),
            Request::TokenRedeem {
                token,
                name,
                cost,
                connections,
            } => reply(
                self.links
                    .redeem_token(token, name, cost, connections)
                    .await
                    .map(|n| json!({ "link": n })),
            ),
            Request::GrantDelete { grant } => done(self.links.delete_grant(&grant).await),
            Request::LinkDelete { name } => done(self.links.delete_link(&name)),
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
                reply(
                    self.links
                        .create_link(config, key)
                        .await
                        .map(|()| json!({ "link": name })),
                )
            }
            Request::LinkRevoke { site } => reply(self.links.revoke(&site).await),
            Request::RotateCerts => reply(self.rotate_certs().await),
            Request::ListenerCreate { listener } => {
                done(self.services.add_listener(listener, true).await)
            }
            Request::ListenerDelete { name } => done(self.services.delete_listener(&name).await),
            Request::ListenerStatus => view(self.services.listener_views()),
            Request::ConnectorCreate { connector } => {
                done(self.services.add_connector(connector, true).await)
            }
            Request::ConnectorDelete { name } => done(self.services.delete_connector(&name).await),
            Request::ConnectorStatus => view(self.services.connectors()),
            Request::Apply { resources } => view(self.services.apply(resources).await),
            Request::PolicySet { policy } => reply(self.set_policy(policy).await),
            Request::PolicyStatus => view(self.policy_status()),
            Request::Flows { since } => view(self.forwarding.flows().since(since.unwrap_or(0))),
            Request::NamespaceSet { name, cgroups } => {
                reply(self.namespaces.set(name, cgroups).await)
            }
            Request::ServiceBundle { kind, name } => reply(self.services.bundle(kind, &name)),
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

impl metrics::Source for Router {
    fn snapshot(&self) -> metrics::Snapshot {
        let mut links: BTreeMap<(String, &'static str), metrics::LinkSample> = BTreeMap::new();
        for (peer, connections) in self.forwarding.links() {
            for link in connections {
                let direction = link.direction.label();
                let row =
                    links
                        .entry((peer.clone(), direction))
                        .or_insert_with(|| metrics::LinkSample {
                            peer: peer.clone(),
                            direction,
                            ..metrics::LinkSample::default()
                        });
                let stats = &link.stats;
                row.connections += 1;
                row.streams += link.stream_count() as u64;
                row.streams_opened += stats.streams_opened.load(Ordering::Relaxed);
                row.received_bytes += stats.bytes_in.load(Ordering::Relaxed);
                row.sent_bytes += stats.bytes_out.load(Ordering::Relaxed);
                let rtt = stats.rtt_us.load(Ordering::Relaxed);
                if rtt > 0 {
                    let rtt = rtt as f64 / 1e6;
                    row.rtt_seconds = Some(row.rtt_seconds.map_or(rtt, |r| r.min(rtt)));
                }
            }
        }
        let sample = |(name, routing_key, stats): (String, String, Arc<ServiceStats>)| {
            metrics::ServiceSample {
                name,
                routing_key,
                opened: stats.opened.load(Ordering::Relaxed),
                active: stats.active.load(Ordering::Relaxed),
                failed: std::array::from_fn(|i| stats.failed[i].load(Ordering::Relaxed)),
                towards_backend: stats.bytes_towards_backend.load(Ordering::Relaxed),
                towards_client: stats.bytes_towards_client.load(Ordering::Relaxed),
                first_byte: Some(stats.first_byte.clone()),
            }
        };
        let node = self.node.metrics();
        let policy_denials = self
            .gate
            .denials()
            .into_iter()
            .map(|(c, n)| (c.as_str(), n))
            .collect();
        let datapath = self.forwarding.datapath();
        metrics::Snapshot {
            policy_denials,
            active_connections: self.forwarding.active() as u64,
            datapath: datapath.backend(),
            uring_connections: datapath.uring_connections(),
            uring_carried: datapath.uring_carried(),
            uring_starved: datapath.uring_starved(),
            receive_budget: datapath.receive_budget(),
            links_refused: self.links.refused(),
            link_churn: self.links.churn(),
            handshakes: Handshakes::merged(self.links.handshakes(), self.forwarding.handshakes())
                .to_vec(),
            links: links.into_values().collect(),
            listeners: self
                .services
                .listener_stats()
                .into_iter()
                .map(sample)
                .collect(),
            connectors: self
                .forwarding
                .connector_stats()
                .into_iter()
                .map(sample)
                .collect(),
            identity_expires_at: Some(self.certs.identity_expires_at()),
            accel: node.accel,
            accel_sockets: node.accel_sockets,
            isolation: node.isolation,
            denied_by_namespace: node.denied_by_namespace,
        }
    }
}
