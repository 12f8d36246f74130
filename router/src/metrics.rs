//! Prometheus metrics: one collector, read at scrape time from the router's own counters and
//! the kernel maps, served as text exposition on `router run --metrics-addr HOST:PORT`.
//!
//! Names start with `skiff_` and end in their unit; labels never carry addresses or ports.

use std::{
    fmt,
    sync::{Arc, Weak},
    time::Duration,
};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric, text},
    metrics::{counter::ConstCounter, gauge::ConstGauge},
    registry::Registry,
};
use tokio::net::TcpListener;

use crate::http;

/// Values read at scrape time.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub active_connections: u64,
    pub accel: Option<crate::accel::Counters>,
    pub accel_sockets: Option<u64>,
    pub isolation: Option<crate::isolation::Counters>,
    pub denied_by_namespace: Vec<(String, u64)>,
    /// Site-policy denials by control (`allowIncomingLinks`, ...), every control present.
    pub policy_denials: Vec<(&'static str, u64)>,
    /// The data-path backend that runs (`epoll` or `uring`).
    pub datapath: &'static str,
    /// Connections the io_uring workers have moved.
    pub uring_connections: u64,
    /// Link connections the io_uring workers carried, and link streams they served.
    pub uring_carried: (u64, u64),
    /// Receives that found an io_uring worker's buffer ring empty.
    pub uring_starved: u64,
    /// The receive budget of relayed streams' sockets and what the live ones hold, bytes.
    pub receive_budget: (usize, usize),
    /// Link connections refused after their TLS handshake.
    pub links_refused: u64,
    /// TLS handshakes by endpoint, and their failures by reason.
    pub handshakes: Vec<crate::tls::handshakes::Sample>,
    /// Links, one row per peer and direction.
    pub links: Vec<LinkSample>,
    /// Link connections lost and re-established, one row per peer and direction ever linked.
    pub link_churn: Vec<LinkChurn>,
    pub listeners: Vec<ServiceSample>,
    pub connectors: Vec<ServiceSample>,
    /// When the router identity expires (Unix seconds).
    pub identity_expires_at: Option<i64>,
}

/// The connections to one peer site in one direction.
#[derive(Debug, Default)]
pub struct LinkSample {
    pub peer: String,
    /// `outgoing` (this site dialled) or `incoming`.
    pub direction: &'static str,
    pub connections: u64,
    pub streams: u64,
    pub streams_opened: u64,
    /// The lowest round-trip time any of its connections measured.
    pub rtt_seconds: Option<f64>,
    pub received_bytes: u64,
    pub sent_bytes: u64,
}

/// The link connections to one peer site in one direction that ended, and those that came
/// up again after one had.
#[derive(Debug, Default)]
pub struct LinkChurn {
    pub peer: String,
    pub direction: &'static str,
    pub lost: u64,
    pub reconnects: u64,
}

/// One listener or connector.
#[derive(Debug, Default)]
pub struct ServiceSample {
    pub name: String,
    pub routing_key: String,
    pub opened: u64,
    pub active: u64,
    /// Ended with a failure, by side: downstream, upstream, link.
    pub failed: [u64; 3],
    /// From the client (listener) or to the backend (connector).
    pub towards_backend: u64,
    /// To the client (listener) or from the backend (connector).
    pub towards_client: u64,
    /// Seconds to the answer's first byte (see `forward::ServiceStats::first_byte`).
    pub first_byte: Option<prometheus_client::metrics::histogram::Histogram>,
}

/// Something that can be measured: the router implements it.
pub trait Source: Send + Sync + 'static {
    /// The current values.
    fn snapshot(&self) -> Snapshot;
}

struct RouterCollector<S>(Weak<S>);

impl<S> fmt::Debug for RouterCollector<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("RouterCollector")
    }
}

fn counter(encoder: &mut DescriptorEncoder, name: &str, help: &str, value: u64) -> fmt::Result {
    let c = ConstCounter::new(value);
    c.encode(encoder.encode_descriptor(name, help, None, c.metric_type())?)
}

fn gauge(encoder: &mut DescriptorEncoder, name: &str, help: &str, value: u64) -> fmt::Result {
    let g = ConstGauge::new(i64::try_from(value).unwrap_or(i64::MAX));
    g.encode(encoder.encode_descriptor(name, help, None, g.metric_type())?)
}

/// One metric family with a row per label set; nothing when there are no rows.
fn family<'a, M: EncodeMetric>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    rows: impl IntoIterator<Item = (Vec<(&'a str, &'a str)>, M)>,
) -> fmt::Result {
    let mut rows = rows.into_iter().peekable();
    let Some((_, first)) = rows.peek() else {
        return Ok(());
    };
    let mut family = encoder.encode_descriptor(name, help, None, first.metric_type())?;
    for (labels, metric) in rows {
        metric.encode(family.encode_family(&labels)?)?;
    }
    Ok(())
}

fn count(value: u64) -> ConstCounter<u64> {
    ConstCounter::new(value)
}

fn level(value: u64) -> ConstGauge<i64> {
    ConstGauge::new(i64::try_from(value).unwrap_or(i64::MAX))
}

/// The TLS handshake families: every endpoint, and every reason, even at zero (a rate over a
/// series that appears only at its first failure starts late).
fn encode_handshakes(
    encoder: &mut DescriptorEncoder,
    samples: &[crate::tls::handshakes::Sample],
) -> fmt::Result {
    use crate::tls::handshakes::Failure;
    family(
        encoder,
        "skiff_tls_handshakes",
        "TLS handshakes completed, by endpoint (link_access, link_dial, listener, connector).",
        samples
            .iter()
            .map(|s| (vec![("endpoint", s.endpoint.label())], count(s.succeeded))),
    )?;
    family(
        encoder,
        "skiff_tls_handshake_failures",
        "TLS handshakes that failed, by endpoint and reason (certificate, incompatible, alert, \
         protocol, timeout, connection).",
        samples.iter().flat_map(|s| {
            Failure::ALL.iter().zip(s.failed).map(|(why, n)| {
                (
                    vec![("endpoint", s.endpoint.label()), ("reason", why.label())],
                    count(n),
                )
            })
        }),
    )
}

/// Link connections lost and re-established.
fn encode_churn(encoder: &mut DescriptorEncoder, churn: &[LinkChurn]) -> fmt::Result {
    fn labels(c: &LinkChurn) -> Vec<(&str, &str)> {
        vec![("peer", c.peer.as_str()), ("direction", c.direction)]
    }
    family(
        encoder,
        "skiff_link_lost_connections",
        "Link connections that ended (the peer went away, the connection broke or was shut).",
        churn.iter().map(|c| (labels(c), count(c.lost))),
    )?;
    family(
        encoder,
        "skiff_link_reconnects",
        "Outgoing link connections established to replace one that was lost (the dialing side \
         counts them; incoming rows stay 0).",
        churn.iter().map(|c| (labels(c), count(c.reconnects))),
    )
}

/// The link families.
fn encode_links(encoder: &mut DescriptorEncoder, links: &[LinkSample]) -> fmt::Result {
    fn labels(l: &LinkSample) -> Vec<(&str, &str)> {
        vec![("peer", l.peer.as_str()), ("direction", l.direction)]
    }
    family(
        encoder,
        "skiff_link_connections",
        "Established link connections, by peer site and direction.",
        links.iter().map(|l| (labels(l), level(l.connections))),
    )?;
    family(
        encoder,
        "skiff_link_streams",
        "Streams open on a link now.",
        links.iter().map(|l| (labels(l), level(l.streams))),
    )?;
    family(
        encoder,
        "skiff_link_streams_opened",
        "Streams opened on a link's live connections.",
        links.iter().map(|l| (labels(l), count(l.streams_opened))),
    )?;
    family(
        encoder,
        "skiff_link_received_bytes",
        "Bytes received on a link's live connections (TLS records included).",
        links.iter().map(|l| (labels(l), count(l.received_bytes))),
    )?;
    family(
        encoder,
        "skiff_link_sent_bytes",
        "Bytes sent on a link's live connections (TLS records included).",
        links.iter().map(|l| (labels(l), count(l.sent_bytes))),
    )?;
    family(
        encoder,
        "skiff_link_rtt_seconds",
        "The lowest heartbeat round-trip time of a link's connections.",
        links
            .iter()
            .filter_map(|l| Some((labels(l), ConstGauge::new(l.rtt_seconds?)))),
    )
}

/// The families of listeners (`what` = "listener") or connectors.
fn encode_services<'a>(
    encoder: &mut DescriptorEncoder,
    what: &'static str,
    services: &'a [ServiceSample],
) -> fmt::Result {
    let labels = |s: &'a ServiceSample| {
        vec![
            (what, s.name.as_str()),
            ("routing_key", s.routing_key.as_str()),
        ]
    };
    let (received, sent) = if what == "listener" {
        ("from clients", "to clients")
    } else {
        ("from the backend", "to the backend")
    };
    family(
        encoder,
        &format!("skiff_{what}_connections"),
        &format!("Connections a {what} opened."),
        services.iter().map(|s| (labels(s), count(s.opened))),
    )?;
    family(
        encoder,
        &format!("skiff_{what}_active_connections"),
        &format!("Connections of a {what} open now."),
        services.iter().map(|s| (labels(s), level(s.active))),
    )?;
    family(
        encoder,
        &format!("skiff_{what}_failed_connections"),
        &format!("Connections of a {what} that ended with a failure, by the side that failed."),
        services.iter().flat_map(|s| {
            crate::datapath::Side::ALL.into_iter().map(move |side| {
                let mut labels = labels(s);
                labels.push(("side", side.as_str()));
                (labels, count(s.failed[side.index()]))
            })
        }),
    )?;
    let listener = what == "listener";
    let received_bytes = |s: &ServiceSample| {
        if listener {
            s.towards_backend
        } else {
            s.towards_client
        }
    };
    let sent_bytes = |s: &ServiceSample| {
        if listener {
            s.towards_client
        } else {
            s.towards_backend
        }
    };
    family(
        encoder,
        &format!("skiff_{what}_received_bytes"),
        &format!("Bytes a {what} received {received}."),
        services
            .iter()
            .map(|s| (labels(s), count(received_bytes(s)))),
    )?;
    family(
        encoder,
        &format!("skiff_{what}_sent_bytes"),
        &format!("Bytes a {what} sent {sent}."),
        services.iter().map(|s| (labels(s), count(sent_bytes(s)))),
    )?;
    let (from, to) = if listener {
        (
            "accepting a client",
            "writing the answer's first byte to it",
        )
    } else {
        ("connecting to the backend", "reading its first byte")
    };
    family(
        encoder,
        &format!("skiff_{what}_first_byte_seconds"),
        &format!("Time from {from} to {to}."),
        services
            .iter()
            .filter_map(|s| Some((labels(s), s.first_byte.clone()?))),
    )
}

impl<S: Source> Collector for RouterCollector<S> {
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        let Some(source) = self.0.upgrade() else {
            return Ok(());
        };
        let s = source.snapshot();
        gauge(
            &mut encoder,
            "skiff_active_connections",
            "Client connections and transit streams in flight.",
            s.active_connections,
        )?;
        encode_links(&mut encoder, &s.links)?;
        encode_churn(&mut encoder, &s.link_churn)?;
        encode_services(&mut encoder, "listener", &s.listeners)?;
        encode_services(&mut encoder, "connector", &s.connectors)?;
        if let Some(at) = s.identity_expires_at {
            family(
                &mut encoder,
                "skiff_certificate_expiry_timestamp_seconds",
                "When a certificate this router presents expires (Unix time).",
                [(vec![("certificate", "router")], ConstGauge::new(at))],
            )?;
        }
        let info = ConstGauge::new(1i64);
        info.encode(
            encoder
                .encode_descriptor(
                    "skiff_datapath",
                    "The data-path backend that runs (label backend: epoll or uring); always 1.",
                    None,
                    info.metric_type(),
                )?
                .encode_family(&[("backend", s.datapath)])?,
        )?;
        counter(
            &mut encoder,
            "skiff_uring_connections",
            "Connections the io_uring workers have moved.",
            s.uring_connections,
        )?;
        counter(
            &mut encoder,
            "skiff_uring_links",
            "Link connections the io_uring workers carried.",
            s.uring_carried.0,
        )?;
        counter(
            &mut encoder,
            "skiff_uring_streams",
            "Link streams the io_uring workers served, socket and link on one worker.",
            s.uring_carried.1,
        )?;
        counter(
            &mut encoder,
            "skiff_uring_receives_starved",
            "Receives that found an io_uring worker's buffer ring empty and waited for a buffer.",
            s.uring_starved,
        )?;
        gauge(
            &mut encoder,
            "skiff_receive_budget_bytes",
            "Receive buffer relayed streams' sockets may hold in all (a quarter of tcp_mem's low mark).",
            s.receive_budget.0 as u64,
        )?;
        gauge(
            &mut encoder,
            "skiff_receive_budget_allotted_bytes",
            "Receive buffer the live relayed streams' sockets were given.",
            s.receive_budget.1 as u64,
        )?;
        encode_handshakes(&mut encoder, &s.handshakes)?;
        counter(
            &mut encoder,
            "skiff_links_refused",
            "Link connections refused after their TLS handshake (revoked, too many, policy).",
            s.links_refused,
        )?;
        let denied = ConstCounter::new(0u64);
        let mut family = encoder.encode_descriptor(
            "skiff_policy_denials",
            "Links, resources and streams the site policy refused, by control.",
            None,
            denied.metric_type(),
        )?;
        for (control, n) in &s.policy_denials {
            ConstCounter::new(*n).encode(family.encode_family(&[("control", *control)])?)?;
        }
        if let Some(a) = s.accel {
            counter(
                &mut encoder,
                "skiff_accel_redirected_bytes",
                "Bytes sk_msg moved socket to socket.",
                a.bytes_redirected,
            )?;
            counter(
                &mut encoder,
                "skiff_accel_redirected_messages",
                "Messages sk_msg moved socket to socket.",
                a.msg_redirected,
            )?;
            counter(
                &mut encoder,
                "skiff_accel_missed_messages",
                "Messages that took the normal path (peer not in the sockhash).",
                a.msg_missed,
            )?;
            counter(
                &mut encoder,
                "skiff_accel_inserted_sockets",
                "Sockets sock_ops put into the sockhash.",
                a.socks_inserted,
            )?;
            counter(
                &mut encoder,
                "skiff_accel_diverted_messages",
                "Messages of diverted senders, sent on the normal path.",
                a.msg_diverted,
            )?;
            counter(
                &mut encoder,
                "skiff_accel_diverted_senders",
                "Senders diverted to the normal path because the router's queue reached its limit.",
                a.senders_diverted + a.backpressure.senders_diverted,
            )?;
            counter(
                &mut encoder,
                "skiff_accel_unstuck_reads",
                "Reads of a redirected socket made past a wakeup that never came.",
                a.backpressure.reads_unstuck,
            )?;
            counter(
                &mut encoder,
                "skiff_accel_returned_senders",
                "Diverted senders taken back onto redirection once their TCP path was drained.",
                a.senders_returned,
            )?;
            counter(
                &mut encoder,
                "skiff_accel_pressure_diverted_senders",
                "Senders diverted to the normal path while TCP's memory was past tcp_mem's low mark.",
                a.senders_under_pressure,
            )?;
            counter(
                &mut encoder,
                "skiff_accel_paused_writes",
                "Times the router paused writing because a redirected peer's queue was full.",
                a.backpressure.writes_paused,
            )?;
            counter(
                &mut encoder,
                "skiff_accel_shortcut_messages",
                "Messages moved straight between two local workloads by a router's shortcut.",
                a.msg_shortcut,
            )?;
            counter(
                &mut encoder,
                "skiff_accel_shortcut_bytes",
                "Bytes moved straight between two local workloads by a router's shortcut.",
                a.bytes_shortcut,
            )?;
            counter(
                &mut encoder,
                "skiff_accel_shortcut_over_budget_messages",
                "Messages of a sender with a shortcut sent to the router because the far reader held the queue limit unread.",
                a.shortcut_over_budget,
            )?;
            counter(
                &mut encoder,
                "skiff_accel_shortcut_behind_messages",
                "Messages of a sender with a shortcut sent to the router because the router had not forwarded its earlier bytes yet.",
                a.shortcut_behind,
            )?;
            counter(
                &mut encoder,
                "skiff_accel_shortcuts_offered",
                "Shortcut budgets the router offered to local senders.",
                a.backpressure.shortcuts_offered,
            )?;
        }
        if let Some(n) = s.accel_sockets {
            gauge(
                &mut encoder,
                "skiff_accel_sockets",
                "Sockets in the sockhash now.",
                n,
            )?;
        }
        if let Some(i) = s.isolation {
            counter(
                &mut encoder,
                "skiff_isolation_allowed_connects",
                "connect() calls to protected listeners that were allowed.",
                i.allowed,
            )?;
            counter(
                &mut encoder,
                "skiff_isolation_lost_events",
                "Deny events lost to a full ring buffer.",
                i.events_lost,
            )?;
            let denied = ConstCounter::new(0u64);
            let mut family = encoder.encode_descriptor(
                "skiff_isolation_denied_connects",
                "connect() calls refused with EPERM, by the caller's namespace.",
                None,
                denied.metric_type(),
            )?;
            for (namespace, n) in &s.denied_by_namespace {
                let labels = [("namespace", namespace.as_str())];
                ConstCounter::new(*n).encode(family.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }
}

/// Serves `/metrics` for `source` on `listener` until the task is aborted.
pub async fn serve<S: Source>(listener: TcpListener, source: &Arc<S>) {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(RouterCollector(Arc::downgrade(source))));
    let limits = http::Limits {
        concurrent: MAX_SCRAPES,
        deadline: SCRAPE_DEADLINE,
    };
    http::serve(listener, limits, "metrics", move |request| {
        answer(&request, &registry)
    })
    .await;
}

/// Metrics requests served at once; more are closed as they arrive.
pub const MAX_SCRAPES: usize = 32;

/// How long one metrics request may take from accept to the last byte, however slowly the
/// client drips its request.
pub const SCRAPE_DEADLINE: Duration = Duration::from_secs(5);

/// The exposition for `GET /metrics`, 404 otherwise.
fn answer(request: &http::Request, registry: &Registry) -> http::Response {
    const EXPOSITION: &str = "text/plain; version=0.0.4; charset=utf-8";
    if request.method != "GET" || request.path != "/metrics" {
        return http::Response::new(
            "404 Not Found",
            EXPOSITION,
            "only /metrics is served here\n",
        );
    }
    let mut body = String::new();
    match text::encode(&mut body, registry) {
        Ok(()) => http::Response::new("200 OK", EXPOSITION, body),
        Err(_) => http::Response::text("500 Internal Server Error", "encoding failed\n"),
    }
}
