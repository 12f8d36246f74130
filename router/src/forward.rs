//! Forwarding: where each new connection and each stream a peer opens goes.
//!
//! A client accepted by a listener is routed to a local backend ([`DataPath::proxy`]) or onto
//! the link towards the chosen connector's router ([`DataPath::relay`]); a stream a peer opens
//! is served by a local backend, or passed on towards its destination ([`DataPath::splice`]).
//!
//! Forwarding reads a [`Table`] the control plane publishes (the live link connections, the
//! backends this router advertises, the revoked sites) and the routing database; it never
//! writes them. The table has its own lock, taken for reading on every new connection and
//! never held across I/O, so state files the control plane writes never delay a connection.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    os::fd::AsFd as _,
    sync::{
        Arc, Mutex, RwLock,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::Duration,
};

use tokio_rustls::TlsAcceptor;
use tracing::{info, warn};

use crate::{
    datapath::{self, Conn, ConnectError, DataPath, Listener, Outcome, Side},
    flows::{self, Flows, Role, Started},
    link::{
        self, Link, Open,
        frame::ResetCode,
        stream::{StreamRx, StreamTx},
    },
    log_limit::LogLimit,
    policy::{Denied, Gate},
    routing::Routing,
    service,
    tls::handshakes::{self, Endpoint, Failure, Handshakes},
    trim,
};

/// How long a backend has to accept a connection (and, for a TLS connector, to finish the
/// handshake).
const BACKEND_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a workload has to finish the TLS handshake with a TLS listener.
const SERVICE_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// A local backend a connector reaches.
#[derive(Debug)]
pub struct Backend {
    /// The connector's name.
    pub name: String,
    pub routing_key: String,
    pub host: String,
    pub port: u16,
    /// How the router reaches it over TLS, for a TLS connector.
    pub tls: Option<BackendTls>,
    /// What the connector served.
    pub stats: Arc<ServiceStats>,
}

/// What one listener or connector served: connections (a connector counts each connection
/// it made to its backend), their outcomes, their bytes, and how long the answer's first byte
/// took.
#[derive(Debug)]
pub struct ServiceStats {
    pub opened: AtomicU64,
    pub active: AtomicU64,
    /// Ended with a failure, by the side that failed ([`Side::index`]).
    pub failed: [AtomicU64; 3],
    /// Bytes from the client (listener) or to the backend (connector).
    pub bytes_towards_backend: AtomicU64,
    /// Bytes to the client (listener) or from the backend (connector).
    pub bytes_towards_client: AtomicU64,
    /// Seconds from a listener's accept to the answer's first byte written to the client, or
    /// from a connector's connect to the first byte its backend sent.
    pub first_byte: prometheus_client::metrics::histogram::Histogram,
}

/// Upper bounds of the first-byte histogram's buckets, in seconds: 100 µs to about 26 s.
fn first_byte_buckets() -> impl Iterator<Item = f64> {
    prometheus_client::metrics::histogram::exponential_buckets(0.0001, 4.0, 10)
}

impl Default for ServiceStats {
    fn default() -> Self {
        Self {
            opened: AtomicU64::default(),
            active: AtomicU64::default(),
            failed: Default::default(),
            bytes_towards_backend: AtomicU64::default(),
            bytes_towards_client: AtomicU64::default(),
            first_byte: prometheus_client::metrics::histogram::Histogram::new(first_byte_buckets()),
        }
    }
}

impl ServiceStats {
    /// Counts a connection as opened and active until the guard goes.
    fn start(self: &Arc<Self>) -> ActiveService {
        self.opened.fetch_add(1, Ordering::Relaxed);
        self.active.fetch_add(1, Ordering::Relaxed);
        ActiveService(Arc::clone(self), std::time::Instant::now())
    }

    /// Adds a connection's outcome. `client_socket` says whether the outcome's socket end is
    /// the client (`proxy` and a listener's `relay`) or the backend (a connector's `relay`).
    fn record(&self, outcome: &Outcome, client_socket: bool) {
        let (towards_backend, towards_client) = if client_socket {
            (outcome.bytes_out, outcome.bytes_in)
        } else {
            (outcome.bytes_in, outcome.bytes_out)
        };
        self.bytes_towards_backend
            .fetch_add(towards_backend, Ordering::Relaxed);
        self.bytes_towards_client
            .fetch_add(towards_client, Ordering::Relaxed);
        if let Some(failure) = &outcome.failed {
            self.failed[failure.side.index()].fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// An open connection of a listener or connector, and when it started.
struct ActiveService(Arc<ServiceStats>, std::time::Instant);

impl ActiveService {
    /// Ends the connection with its outcome: no longer active, then its bytes, failure and
    /// time to the answer's first byte counted, so that a sample showing its bytes does not
    /// show it active.
    fn end(self, outcome: &Outcome, client_socket: bool) {
        let (stats, started) = (Arc::clone(&self.0), self.1);
        drop(self);
        if let Some(first) = outcome.first_response {
            let waited = first.saturating_duration_since(started);
            stats.first_byte.observe(waited.as_secs_f64());
        }
        stats.record(outcome, client_socket);
    }
}

impl Drop for ActiveService {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// How the router reaches a TLS backend.
#[derive(Debug)]
pub struct BackendTls {
    pub config: Arc<rustls::ClientConfig>,
    pub server_name: rustls::pki_types::ServerName<'static>,
}

impl BackendTls {
    /// A connector asking the backend for `alpn` (the protocol the client agreed with a TLS
    /// listener), or for nothing.
    fn connector(&self, alpn: &str) -> tokio_rustls::TlsConnector {
        if alpn.is_empty() {
            return tokio_rustls::TlsConnector::from(Arc::clone(&self.config));
        }
        let mut config = (*self.config).clone();
        config.alpn_protocols = vec![alpn.as_bytes().to_vec()];
        tokio_rustls::TlsConnector::from(Arc::new(config))
    }
}

/// What forwarding consults; the control plane writes it.
#[derive(Debug, Default)]
struct Table {
    /// Live link connections, by peer site.
    links: HashMap<String, Vec<Arc<Link>>>,
    /// Backends by connector name, and whether the connector is advertised (the site policy
    /// may withhold one; a withheld one serves nothing, whoever asks).
    backends: BTreeMap<String, (Arc<Backend>, bool)>,
    /// Sites revoked here: no stream from or to them.
    revoked: BTreeSet<String>,
}

/// Why a link connection was not added to the table.
#[derive(Debug, thiserror::Error)]
#[error("site {peer} already has {held} link connections here, the most one site may hold")]
pub struct TooManyConnections {
    pub peer: String,
    pub held: usize,
}

/// Why a stream or client could not be given a backend. Each maps to the reset code the
/// stream's opener is told ([`BackendError::reset_code`]).
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("no local connector")]
    NoConnector,
    #[error("{0}")]
    Denied(Denied),
    #[error("connect to {addr} timed out")]
    ConnectTimeout { addr: String },
    #[error("connect to {addr} failed: {source}")]
    Connect {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("TLS handshake with {addr} timed out")]
    HandshakeTimeout { addr: String },
    #[error("TLS handshake with {addr} failed: {source}")]
    Handshake {
        addr: String,
        #[source]
        source: std::io::Error,
    },
}

impl BackendError {
    /// The reset code for the stream's opener: the key has no connector here (`NoRoute`),
    /// the policy refuses the backend (`Policy`), or the backend refused (`Refused`).
    #[must_use]
    pub const fn reset_code(&self) -> ResetCode {
        match self {
            Self::NoConnector => ResetCode::NoRoute,
            Self::Denied(_) => ResetCode::Policy,
            Self::ConnectTimeout { .. }
            | Self::Connect { .. }
            | Self::HandshakeTimeout { .. }
            | Self::Handshake { .. } => ResetCode::Refused,
        }
    }
}

/// The forwarding plane of one router.
#[derive(Debug)]
pub struct Forwarding {
    site: String,
    datapath: DataPath,
    routing: Arc<Mutex<Routing>>,
    gate: Arc<Gate>,
    table: RwLock<Table>,
    /// Turns between connectors of the same key.
    next_backend: AtomicUsize,
    /// Connections and streams in flight (the drain on shutdown waits for them).
    active: AtomicUsize,
    /// Returns the memory of ended connections to the kernel.
    trimmer: trim::Trimmer,
    /// Streams refused at their destination (a peer can open them in a loop).
    refusals: Mutex<LogLimit>,
    /// A record of each connection as it ends.
    flows: Arc<Flows>,
    /// TLS listeners' and connectors' handshakes.
    handshakes: Handshakes,
}

/// Counts a connection or stream in flight.
struct Active<'a>(&'a Forwarding);

impl Drop for Active<'_> {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::AcqRel);
        self.0.trimmer.ended();
    }
}

impl Forwarding {
    #[must_use]
    pub fn new(
        site: String,
        datapath: DataPath,
        routing: Arc<Mutex<Routing>>,
        gate: Arc<Gate>,
        flows: Arc<Flows>,
    ) -> Self {
        Self {
            site,
            datapath,
            routing,
            gate,
            flows,
            table: RwLock::default(),
            next_backend: AtomicUsize::new(0),
            active: AtomicUsize::new(0),
            trimmer: trim::Trimmer::default(),
            refusals: Mutex::default(),
            handshakes: Handshakes::default(),
        }
    }

    /// The TLS listeners' and connectors' handshakes counted so far.
    #[must_use]
    pub fn handshakes(&self) -> [handshakes::Sample; 4] {
        self.handshakes.sample()
    }

    /// The records of ended connections.
    #[must_use]
    pub fn flows(&self) -> &Flows {
        &self.flows
    }

    /// The data path connections are moved on.
    #[must_use]
    pub fn datapath(&self) -> &DataPath {
        &self.datapath
    }

    /// Connections and streams in flight.
    #[must_use]
    pub fn active(&self) -> usize {
        self.active.load(Ordering::Acquire)
    }

    /// The heap trimmer (its counters are in `skiff status`).
    #[must_use]
    pub fn trimmer(&self) -> &trim::Trimmer {
        &self.trimmer
    }

    /// Trims the heap once a second when enough connections ended; runs until aborted.
    pub async fn trim(&self) {
        self.trimmer.run(|| self.active()).await;
    }

    /// Waits until no connection is in flight, or `deadline` passes. Returns how many are left.
    pub async fn drain(&self, deadline: Duration) -> usize {
        let deadline = tokio::time::Instant::now() + deadline;
        while self.active() > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.active()
    }

    fn track(&self) -> Active<'_> {
        self.active.fetch_add(1, Ordering::AcqRel);
        Active(self)
    }

    // The table, as the control plane writes it.

    /// Adds a live link connection. Returns whether it is the first to its peer.
    ///
    /// # Errors
    /// When its peer already holds [`link::MAX_CONNECTIONS_PER_PEER`] connections here.
    pub fn add_link(&self, link: &Arc<Link>) -> Result<bool, TooManyConnections> {
        let mut table = self.table.write().expect("table lock");
        let links = table.links.entry(link.peer.clone()).or_default();
        if links.len() >= link::MAX_CONNECTIONS_PER_PEER {
            return Err(TooManyConnections {
                peer: link.peer.clone(),
                held: links.len(),
            });
        }
        links.push(Arc::clone(link));
        Ok(links.len() == 1)
    }

    /// Removes a link connection that went down. Returns whether it was the last to its peer.
    pub fn remove_link(&self, link: &Arc<Link>) -> bool {
        let mut table = self.table.write().expect("table lock");
        let Some(links) = table.links.get_mut(&link.peer) else {
            return false;
        };
        links.retain(|l| !Arc::ptr_eq(l, link));
        let last = links.is_empty();
        if last {
            table.links.remove(&link.peer);
        }
        last
    }

    /// The live connections to `peer`.
    #[must_use]
    pub fn links_to(&self, peer: &str) -> Vec<Arc<Link>> {
        let table = self.table.read().expect("table lock");
        table.links.get(peer).cloned().unwrap_or_default()
    }

    /// Every live link connection, by peer.
    #[must_use]
    pub fn links(&self) -> Vec<(String, Vec<Arc<Link>>)> {
        let table = self.table.read().expect("table lock");
        let mut links: Vec<_> = table
            .links
            .iter()
            .map(|(peer, links)| (peer.clone(), links.clone()))
            .collect();
        links.sort_by(|a, b| a.0.cmp(&b.0));
        links
    }

    /// Each connector's counters, with its name and routing key.
    pub fn connector_stats(&self) -> Vec<(String, String, Arc<ServiceStats>)> {
        let table = self.table.read().expect("table lock");
        table
            .backends
            .iter()
            .map(|(name, (b, _))| (name.clone(), b.routing_key.clone(), Arc::clone(&b.stats)))
            .collect()
    }

    /// Adds connector `name`'s backend; `advertised` says whether it may serve streams.
    pub fn add_backend(&self, name: &str, backend: Backend, advertised: bool) {
        let mut table = self.table.write().expect("table lock");
        table
            .backends
            .insert(name.to_owned(), (Arc::new(backend), advertised));
    }

    /// Removes connector `name`'s backend. Returns whether it was advertised.
    pub fn remove_backend(&self, name: &str) -> bool {
        let mut table = self.table.write().expect("table lock");
        table.backends.remove(name).is_some_and(|(_, a)| a)
    }

    /// Lets connector `name` serve streams, or withholds it. Returns whether it did before.
    pub fn set_advertised(&self, name: &str, advertised: bool) -> bool {
        let mut table = self.table.write().expect("table lock");
        table
            .backends
            .get_mut(name)
            .is_some_and(|(_, a)| std::mem::replace(a, advertised))
    }

    /// Whether connector `name` serves streams.
    #[must_use]
    pub fn is_advertised(&self, name: &str) -> bool {
        let table = self.table.read().expect("table lock");
        table.backends.get(name).is_some_and(|(_, a)| *a)
    }

    /// Replaces the set of revoked sites.
    pub fn set_revoked(&self, revoked: BTreeSet<String>) {
        self.table.write().expect("table lock").revoked = revoked;
    }

    // The forwarding itself.

    /// The least-loaded connection of the link to `peer`.
    fn link_to(&self, peer: &str) -> Option<Arc<Link>> {
        let table = self.table.read().expect("table lock");
        table
            .links
            .get(peer)?
            .iter()
            .filter(|l| !l.is_closed())
            .min_by_key(|l| l.stream_count())
            .cloned()
    }

    /// An advertised backend for `key`, in turn among those there are.
    fn backend_for(&self, key: &str) -> Option<Arc<Backend>> {
        let table = self.table.read().expect("table lock");
        let matching: Vec<&Arc<Backend>> = table
            .backends
            .values()
            .filter(|(b, advertised)| *advertised && b.routing_key == key)
            .map(|(b, _)| b)
            .collect();
        if matching.is_empty() {
            return None;
        }
        let turn = self.next_backend.fetch_add(1, Ordering::Relaxed);
        Some(Arc::clone(matching[turn % matching.len()]))
    }

    /// Accepts clients of a listener for `key` until aborted; each is its own task. A TLS
    /// listener (`tls`) finishes the handshake first.
    pub async fn serve_listener(
        self: Arc<Self>,
        listener: Listener,
        (name, key): (String, String),
        tls: Option<TlsAcceptor>,
        stats: Arc<ServiceStats>,
    ) {
        loop {
            let (client, peer) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(e) => {
                    warn!(routing_key = %key, error = %e, "accept failed");
                    // Out of descriptors, say: give the ones in use time to close.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let active = stats.start();
            let forwarding = Arc::clone(&self);
            let key = key.clone();
            let mut flow = Started::now(Role::Listener, &key, &name);
            flow.client = Some(peer.to_string());
            flow.origin.clone_from(&self.site);
            flow.tcp_rtt_us = flows::tcp_rtt_us(client.tcp().as_fd());
            let Some(tls) = tls.clone() else {
                tokio::spawn(async move {
                    let outcome = forwarding.route_client(client, &key, &mut flow).await;
                    active.end(&outcome, true);
                    forwarding.flows.end(flow, &outcome, true);
                });
                continue;
            };
            tokio::spawn(async move {
                let handshake = datapath::tls_server(client, &tls);
                let handshake = tokio::time::timeout(SERVICE_HANDSHAKE_TIMEOUT, handshake).await;
                forwarding
                    .handshakes
                    .count(Endpoint::Listener, Failure::of_timed(&handshake));
                let outcome = match handshake {
                    Ok(Ok(client)) => forwarding.route_client(client, &key, &mut flow).await,
                    Ok(Err(e)) => {
                        warn!(routing_key = %key, %peer, "TLS client refused: {e}");
                        Outcome::refused(Side::Downstream, ResetCode::Cancelled)
                    }
                    Err(_) => {
                        warn!(routing_key = %key, %peer, "TLS client refused: handshake timed out");
                        Outcome::refused(Side::Downstream, ResetCode::Cancelled)
                    }
                };
                active.end(&outcome, true);
                forwarding.flows.end(flow, &outcome, true);
            });
        }
    }

    /// Routes one client connection accepted by a listener for `key`; returns how it ended,
    /// and notes in `flow` where it went.
    pub async fn route_client(&self, client: Conn, key: &str, flow: &mut Started) -> Outcome {
        let _active = self.track();
        if self.gate.admit(true, |p| p.service(key)).is_err() {
            datapath::reject(client);
            return Outcome::refused(Side::Downstream, ResetCode::Policy);
        }
        // Chosen and counted under one lock: two clients arriving together see each other's
        // stream and spread over the connectors.
        let route = {
            let mut routing = self.routing.lock().expect("routing lock");
            let route = routing.choose(key);
            if let Some(route) = &route {
                routing.stream_started(&route.dest);
            }
            route
        };
        let Some(route) = route else {
            warn!(routing_key = %key, "no reachable connector; client reset");
            datapath::reject(client);
            return Outcome::refused(Side::Link, ResetCode::NoRoute);
        };
        flow.dest.clone_from(&route.dest);
        let outcome = match route.next_hop {
            None => match self.connect_backend(key, &client.alpn()).await {
                Ok((backend, served)) => {
                    let active = served.stats.start();
                    let mut served_flow = Started::now(Role::Connector, key, &served.name);
                    served_flow.origin.clone_from(&self.site);
                    served_flow.dest.clone_from(&self.site);
                    served_flow.tcp_rtt_us = flows::tcp_rtt_us(backend.tcp().as_fd());
                    let outcome = self.datapath.proxy(client, backend).await;
                    active.end(&outcome, true);
                    self.flows.end(served_flow, &outcome, true);
                    outcome
                }
                Err(e) => {
                    warn!(routing_key = %key, reason = %e, "backend unreachable; client reset");
                    datapath::reject(client);
                    Outcome::refused(Side::Upstream, e.reset_code())
                }
            },
            Some(hop) => match self.link_to(&hop) {
                None => {
                    warn!(routing_key = %key, next_hop = %hop, "link to next hop is down; client reset");
                    datapath::reject(client);
                    Outcome::refused(Side::Link, ResetCode::LinkLost)
                }
                Some(link) => {
                    let open = Open {
                        routing_key: key.to_owned(),
                        origin: self.site.clone(),
                        dest: route.dest.clone(),
                        alpn: client.alpn(),
                    };
                    match link.open(&open).await {
                        Ok((tx, rx)) => self.datapath.relay(client, Side::Downstream, tx, rx).await,
                        Err(_) => {
                            datapath::reject(client);
                            Outcome::refused(Side::Link, ResetCode::LinkLost)
                        }
                    }
                }
            },
        };
        self.routing
            .lock()
            .expect("routing lock")
            .stream_ended(&route.dest);
        if let Some(failure) = &outcome.failed {
            info!(routing_key = %key, side = failure.side.as_str(), "connection ended with a failure: {failure}");
        }
        outcome
    }

    /// Connects to a local backend for `key`; a TLS connector asks the backend for `alpn`
    /// (when not empty), so that both ends of the service speak the protocol the client chose.
    async fn connect_backend(
        &self,
        key: &str,
        alpn: &str,
    ) -> Result<(Conn, Arc<Backend>), BackendError> {
        let backend = self.backend_for(key).ok_or(BackendError::NoConnector)?;
        let (host, port) = (&backend.host, backend.port);
        let addr = service::join_host_port(host, port);
        // The site policy names backends by host and by address: the address is checked here,
        // where it is known, for each one the name resolves to.
        let connect = self.datapath.connect(&addr, |resolved| {
            self.gate.admit(true, |p| {
                p.exposed_resource(host, port, Some(resolved.ip()))
            })
        });
        let conn = match tokio::time::timeout(BACKEND_CONNECT_TIMEOUT, connect).await {
            Err(_) => return Err(BackendError::ConnectTimeout { addr }),
            Ok(Err(ConnectError::Refused(denied))) => return Err(BackendError::Denied(denied)),
            Ok(Err(ConnectError::Failed(source))) => {
                return Err(BackendError::Connect { addr, source });
            }
            Ok(Ok(conn)) => conn,
        };
        let Some(tls) = &backend.tls else {
            return Ok((conn, backend));
        };
        let connector = tls.connector(alpn);
        let handshake = datapath::tls_client(conn, &connector, tls.server_name.clone());
        let handshake = tokio::time::timeout(BACKEND_CONNECT_TIMEOUT, handshake).await;
        self.handshakes
            .count(Endpoint::Connector, Failure::of_timed(&handshake));
        handshake
            .map_err(|_| BackendError::HandshakeTimeout { addr: addr.clone() })?
            .map_err(|source| BackendError::Handshake { addr, source })
            .map(|conn| (conn, Arc::clone(&backend)))
    }

    /// Handles a stream a peer opened: serve it here, or pass it on towards its destination.
    pub async fn serve_stream(&self, open: Open, tx: StreamTx, rx: StreamRx) {
        let _active = self.track();
        let revoked = {
            let table = self.table.read().expect("table lock");
            [&open.origin, &open.dest]
                .into_iter()
                .find(|s| table.revoked.contains(*s))
                .cloned()
        };
        if let Some(site) = revoked {
            tx.reset(ResetCode::Policy, &format!("site {site} was revoked"))
                .await;
            return;
        }
        if open.dest == self.site {
            let served = match self.gate.admit(true, |p| p.service(&open.routing_key)) {
                Err(denied) => Err(BackendError::Denied(denied)),
                Ok(()) => self.connect_backend(&open.routing_key, &open.alpn).await,
            };
            match served {
                Ok((backend, served)) => {
                    let active = served.stats.start();
                    let mut flow = Started::now(Role::Connector, &open.routing_key, &served.name);
                    flow.origin.clone_from(&open.origin);
                    flow.dest.clone_from(&self.site);
                    flow.tcp_rtt_us = flows::tcp_rtt_us(backend.tcp().as_fd());
                    let outcome = self.datapath.relay(backend, Side::Upstream, tx, rx).await;
                    active.end(&outcome, false);
                    self.flows.end(flow, &outcome, false);
                }
                Err(e) => {
                    // A peer can open streams for a missing key in a loop: one line a second.
                    let log = self.refusals.lock().expect("refusals lock").hit();
                    if let Some(unlogged) = log {
                        warn!(routing_key = %open.routing_key, origin = %open.origin, reason = %e, unlogged, "stream refused");
                    }
                    tx.reset(e.reset_code(), &e.to_string()).await;
                }
            }
            return;
        }
        let hop = self
            .routing
            .lock()
            .expect("routing lock")
            .next_hop(&open.dest);
        let Some(next) = hop.as_deref().and_then(|h| self.link_to(h)) else {
            tx.reset(ResetCode::NoRoute, "no route to destination")
                .await;
            return;
        };
        match next.open(&open).await {
            Ok(next_stream) => {
                let _ = self.datapath.splice((tx, rx), next_stream).await;
            }
            Err(_) => tx.reset(ResetCode::LinkLost, "next hop link lost").await,
        }
    }
}
