//! The `skiff` command line: parsing, and rendering answers as tables or JSON.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};
use serde_json::Value;

/// skiff connects services across sites into one application network secured with mutual TLS.
#[derive(Debug, Parser)]
#[command(name = "skiff", version, about)]
pub struct Cli {
    /// The site's state directory.
    #[arg(
        long,
        global = true,
        env = "SKIFF_STATE_DIR",
        default_value = "/var/lib/skiff"
    )]
    pub state_dir: PathBuf,
    /// How to print answers.
    #[arg(long, short, global = true, value_enum, default_value_t = Output::Table)]
    pub output: Output,
    #[command(subcommand)]
    pub command: Command,
}

/// Output format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Table,
    Json,
    Yaml,
    /// A Graphviz graph (`skiff network status` only).
    Dot,
    /// The graph drawn as SVG by Graphviz's `dot` (`skiff network status` only).
    Svg,
}

/// `--datapath` values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Datapath {
    /// tokio's epoll reactor.
    Epoll,
    /// io_uring, or fail to start.
    Uring,
    /// io_uring where `io_uring_setup` works; epoll otherwise, saying why.
    Auto,
}

impl From<Datapath> for crate::datapath::Mode {
    fn from(value: Datapath) -> Self {
        match value {
            Datapath::Epoll => Self::Epoll,
            Datapath::Uring => Self::Uring,
            Datapath::Auto => Self::Auto,
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create or delete this site.
    #[command(subcommand)]
    Site(SiteCommand),
    /// Run the router.
    #[command(subcommand)]
    Router(RouterCommand),
    /// Issue or redeem link tokens.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Inspect or remove links.
    #[command(subcommand)]
    Link(LinkCommand),
    /// Local addresses that accept connections for a routing key.
    #[command(subcommand)]
    Listener(ListenerCommand),
    /// Routing keys bound to backends at this site.
    #[command(subcommand)]
    Connector(ConnectorCommand),
    /// This site.
    Status,
    /// Every site, link and routing key the router knows of.
    #[command(subcommand)]
    Network(NetworkCommand),
    /// Recent connections, one record each (kept: the last 1,024).
    Flows {
        /// Keep printing flows as they end (JSON lines with --output json).
        #[arg(long)]
        follow: bool,
    },
    /// The site policy: which sites may link, where links may go, what may be exposed.
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// Create or update the site, its policy, listeners and connectors from a YAML file (the
    /// CRDs' schema).
    Apply {
        /// The YAML file; several resources separated by `---`.
        #[arg(short = 'f', long = "filename")]
        file: PathBuf,
    },
    /// Run the node controller: keep this node's router in step with the skiff resources of
    /// the namespaces it serves, and its isolation namespaces with the node's pods (in a pod of
    /// the DaemonSet, beside the router).
    Controller {
        /// This node's name: the pods it maps are those with this spec.nodeName.
        #[arg(long, env = "SKIFF_NODE_NAME")]
        node: String,
        /// A namespace whose skiff resources it acts on (repeat, or comma-separated); every
        /// namespace when none is given.
        #[arg(long, env = "SKIFF_NAMESPACES", value_delimiter = ',')]
        namespace: Vec<String>,
        /// Where to look for the kubelet's kubepods cgroups (repeat); every cgroup2 mount in
        /// /proc/mounts when none is given.
        #[arg(long, env = "SKIFF_CGROUP_ROOT", value_delimiter = ',')]
        cgroup_root: Vec<PathBuf>,
        /// How often everything is applied again without a change, in seconds.
        #[arg(long, default_value_t = 60)]
        resync_secs: u64,
    },
}

#[derive(Debug, Subcommand)]
pub enum SiteCommand {
    /// Create the site: state directory, its own CA, a router identity.
    Create {
        name: String,
        /// HOST:PORT where this site accepts links and token redemptions.
        #[arg(long)]
        link_access: Option<String>,
        /// A namespace of this node: NAME=CGROUP_PATH (the cgroup v2 subtree of its workloads).
        #[arg(long, value_parser = parse_namespace)]
        namespace: Vec<(String, String)>,
        /// Make every listener reachable only from its own namespace and those it allows
        /// (enforced at connect() in the kernel; needs `router run --cgroup`).
        #[arg(long)]
        isolate_namespaces: bool,
        /// Use this CA certificate (PEM) as the site CA instead of generating one.
        #[arg(long, requires = "ca_key")]
        ca_cert: Option<PathBuf>,
        /// The site CA's private key (PEM).
        #[arg(long, requires = "ca_cert")]
        ca_key: Option<PathBuf>,
        /// Use this router identity certificate (PEM), signed by the site CA.
        #[arg(long, requires = "router_key")]
        router_cert: Option<PathBuf>,
        /// The router identity's private key (PEM).
        #[arg(long, requires = "router_cert")]
        router_key: Option<PathBuf>,
        /// Lifetime of the certificates the router issues itself (90d, 12h, ...); renewed
        /// automatically when a third is left. Default: one year.
        #[arg(long, value_parser = crate::site::parse_lifetime)]
        cert_lifetime: Option<u64>,
        /// The data path the site's router runs on unless `router run --datapath` says
        /// otherwise. Default: auto.
        #[arg(long, value_enum)]
        datapath: Option<Datapath>,
    },
    /// Stop the router and remove the site's state: nothing is left behind.
    Delete,
    /// Replace the router identity and every TLS listener's certificate with new ones from
    /// the same CAs, while the router runs: links and streams stay up.
    RotateCerts,
}

#[derive(Debug, Subcommand)]
pub enum RouterCommand {
    /// Run the router in the foreground until SIGTERM or SIGINT.
    Run {
        /// Socket redirection between local workloads and the router (sock_ops + sk_msg).
        #[arg(long, value_enum, default_value_t = Accel::Off, env = "SKIFF_ACCEL")]
        accel: Accel,
        /// The backend that moves bytes: io_uring worker threads, tokio's epoll reactor, or
        /// io_uring where the kernel allows it (epoll otherwise, with the reason logged).
        /// Default: the site's `datapath`, else auto.
        #[arg(long, value_enum, env = "SKIFF_DATAPATH")]
        datapath: Option<Datapath>,
        /// The cgroup v2 directory whose workloads' sockets are accelerated (the router's own
        /// process must be inside it too). Required by --accel sockmap.
        #[arg(long, env = "SKIFF_CGROUP")]
        cgroup: Option<PathBuf>,
        /// Serve Prometheus metrics on HOST:PORT (path /metrics).
        #[arg(long, env = "SKIFF_METRICS_ADDR")]
        metrics_addr: Option<String>,
        /// Append a JSON line to PATH for each connection as it ends (`-`: standard output).
        /// Opened after privilege is given up: with --user, USER must be able to write it.
        #[arg(long, env = "SKIFF_FLOW_LOG", value_name = "PATH")]
        flow_log: Option<String>,
        /// Start as root, attach the eBPF programs, then run as USER (name or uid) with no
        /// capabilities, before opening any network socket. The state directory must belong
        /// to USER; a root-owned keeper process removes the pins when the router exits.
        #[arg(long, env = "SKIFF_USER")]
        user: Option<String>,
        /// Serve a read-only web console on [HOST:]PORT (a bare port binds loopback). Its
        /// token is written to STATE/console.token; open http://ADDR/?token=TOKEN.
        #[arg(long, env = "SKIFF_CONSOLE_ADDR", value_name = "[HOST:]PORT")]
        console_addr: Option<String>,
        /// How long a stopping router lets open connections finish before it closes them
        /// (e.g. 30s, 5m).
        #[arg(long, env = "SKIFF_DRAIN_TIMEOUT", default_value = "10s", value_parser = crate::token::parse_duration)]
        drain_timeout: std::time::Duration,
    },
    /// The pin keeper `run --user` starts: removes PIN_DIR when its stdin closes.
    #[command(hide = true)]
    KeepPins {
        #[arg(long)]
        pin_dir: PathBuf,
    },
}

/// `--accel` values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Accel {
    /// Use it, or fail to start.
    Sockmap,
    /// Never.
    Off,
    /// Use it where the kernel and privileges allow; say why not otherwise.
    Auto,
}

impl From<Accel> for crate::app::AccelMode {
    fn from(value: Accel) -> Self {
        match value {
            Accel::Sockmap => Self::Sockmap,
            Accel::Off => Self::Off,
            Accel::Auto => Self::Auto,
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Create an access grant and write a token for it to FILE.
    Issue {
        file: PathBuf,
        /// How many times the token may be redeemed.
        #[arg(long, default_value_t = crate::token::DEFAULT_REDEMPTIONS)]
        redemptions: u32,
        /// How long the token is valid (e.g. 30s, 15m, 2h, 1d).
        #[arg(long, default_value = "15m", value_parser = crate::token::parse_duration)]
        expiry: std::time::Duration,
    },
    /// Redeem the token in FILE: obtain link credentials and start the link.
    Redeem {
        file: PathBuf,
        /// Name of the link (default: the issuing site's name).
        #[arg(long)]
        name: Option<String>,
        /// Routing cost of the link (default 1); traffic prefers cheaper paths.
        #[arg(long)]
        cost: Option<u32>,
        /// Parallel TLS connections for the link (1-16, default 1).
        #[arg(long)]
        connections: Option<u32>,
    },
}

#[derive(Debug, Subcommand)]
pub enum LinkCommand {
    /// Every link: state, peer, round-trip time, streams, bytes.
    Status,
    /// Stop an outgoing link and forget its credentials.
    Delete { name: String },
    /// Link to a site with a credential obtained out of band instead of a token: a client
    /// certificate signed by the peer's site CA (its common name is this site's name), its
    /// key, and the peer's CA.
    Create(LinkCreateArgs),
    /// Revoke the link credentials this site issued to SITE: its links are cut at once and
    /// refused from then on (a new token invites it again).
    Revoke { site: String },
}

#[derive(Debug, Args)]
pub struct LinkCreateArgs {
    /// The link's name (default: the peer site's name).
    pub name: Option<String>,
    /// The peer's link-access endpoint, HOST:PORT.
    #[arg(long)]
    pub url: String,
    /// The peer's site name: its router certificate must carry it.
    #[arg(long)]
    pub peer_site: String,
    /// PEM file of the peer's site CA: the only CA the link trusts.
    #[arg(long)]
    pub ca_file: PathBuf,
    /// PEM file of this site's link credential, signed by the peer's CA.
    #[arg(long)]
    pub cert: PathBuf,
    /// PEM file of the credential's private key.
    #[arg(long)]
    pub key: PathBuf,
    /// Link cost for routing.
    #[arg(long)]
    pub cost: Option<u32>,
    /// Parallel TLS connections.
    #[arg(long)]
    pub connections: Option<u32>,
}

#[derive(Debug, Subcommand)]
pub enum ListenerCommand {
    Create(ListenerArgs),
    Status,
    Delete { name: String },
}

#[derive(Debug, Args)]
pub struct ListenerArgs {
    pub name: String,
    #[arg(long)]
    pub port: u16,
    /// Address to bind (default: 127.0.0.1 for a listener with --namespace, 0.0.0.0 otherwise).
    #[arg(long)]
    pub host: Option<String>,
    /// Routing key (default: the listener's name).
    #[arg(long)]
    pub routing_key: Option<String>,
    /// The namespace the listener belongs to.
    #[arg(long)]
    pub namespace: Option<String>,
    /// Another namespace that may connect (repeatable).
    #[arg(long)]
    pub allow_namespace: Vec<String>,
    /// Serve TLS to workloads, with a certificate from the site's service CA.
    #[arg(long)]
    pub tls: bool,
    /// With --tls: also require client certificates signed by the service CA.
    #[arg(long, requires = "tls")]
    pub require_client_cert: bool,
    /// With --tls: write a client bundle (ca.crt, tls.crt, tls.key) into this directory.
    #[arg(long, requires = "tls")]
    pub bundle_out: Option<PathBuf>,
    /// With --tls: serve this certificate (PEM) instead of one from the service CA.
    #[arg(long, requires_all = ["tls", "key"])]
    pub cert: Option<PathBuf>,
    /// The private key (PEM) of --cert.
    #[arg(long, requires = "cert")]
    pub key: Option<PathBuf>,
    /// With --tls: application protocols (ALPN) to offer clients, in order of preference
    /// (e.g. h2,http/1.1); a TLS connector asks its backend for the one the client chose.
    #[arg(long, requires = "tls", value_delimiter = ',', value_parser = parse_alpn)]
    pub alpn: Vec<String>,
}

/// An ALPN protocol id: 1-255 bytes (RFC 7301).
fn parse_alpn(text: &str) -> Result<String, String> {
    if (1..=255).contains(&text.len()) {
        Ok(text.to_owned())
    } else {
        Err(format!("ALPN id {text:?} must be 1-255 bytes"))
    }
}

fn parse_namespace(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((name, path)) if !name.is_empty() && path.starts_with('/') => {
            Ok((name.to_owned(), path.to_owned()))
        }
        _ => Err(format!("expected NAME=/path/to/cgroup, got {text:?}")),
    }
}

#[derive(Debug, Subcommand)]
pub enum ConnectorCommand {
    Create(ConnectorArgs),
    Status,
    Delete { name: String },
}

#[derive(Debug, Args)]
pub struct ConnectorArgs {
    pub name: String,
    #[arg(long)]
    pub port: u16,
    /// Backend host.
    #[arg(long)]
    pub host: String,
    /// Routing key (default: the connector's name).
    #[arg(long)]
    pub routing_key: Option<String>,
    /// Connect to the backend over TLS, verifying its certificate.
    #[arg(long)]
    pub tls: bool,
    /// With --tls: the CA (PEM file) the backend's certificate chains to (default: the site's
    /// service CA).
    #[arg(long, requires = "tls")]
    pub ca_file: Option<PathBuf>,
    /// With --tls: the name the backend's certificate must carry (default: --host).
    #[arg(long, requires = "tls")]
    pub server_name: Option<String>,
    /// With --tls: write a server bundle for the backend (ca.crt, tls.crt, tls.key) into this
    /// directory.
    #[arg(long, requires = "tls")]
    pub bundle_out: Option<PathBuf>,
    /// With --tls: present this client certificate (PEM) to the backend.
    #[arg(long, requires_all = ["tls", "key"])]
    pub cert: Option<PathBuf>,
    /// The private key (PEM) of --cert.
    #[arg(long, requires = "cert")]
    pub key: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// The policy in force and the denials counted per control.
    Status,
    /// Remove the policy: everything is allowed again.
    Delete,
}

#[derive(Debug, Subcommand)]
pub enum NetworkCommand {
    /// Every site, link and routing key the router knows of.
    Status,
}

/// Prints `value` as JSON, or as a table of `columns` (header, JSON field).
pub fn print(output: Output, value: &Value, columns: &[(&str, &str)]) {
    if output == Output::Json || columns.is_empty() {
        println!(
            "{}",
            serde_json::to_string_pretty(value).unwrap_or_default()
        );
        return;
    }
    let rows: Vec<&Value> = match value {
        Value::Array(items) => items.iter().collect(),
        other => vec![other],
    };
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|row| {
            columns
                .iter()
                .map(|(_, field)| cell(&row[*field]))
                .collect()
        })
        .collect();
    let widths: Vec<usize> = columns
        .iter()
        .enumerate()
        .map(|(i, (header, _))| {
            cells
                .iter()
                .map(|r| r[i].len())
                .chain([header.len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let line = |items: Vec<&str>| {
        let padded: Vec<String> = items
            .iter()
            .zip(&widths)
            .map(|(s, w)| format!("{s:<w$}"))
            .collect();
        println!("{}", padded.join("  ").trim_end());
    };
    line(columns.iter().map(|(h, _)| *h).collect());
    for row in &cells {
        line(row.iter().map(String::as_str).collect());
    }
}

/// One row of `columns` on one line, cells separated by two spaces (for output that grows a
/// row at a time).
#[must_use]
pub fn row(value: &Value, columns: &[(&str, &str)]) -> String {
    columns
        .iter()
        .map(|(_, field)| cell(&value[*field]))
        .collect::<Vec<_>>()
        .join("  ")
}

fn cell(value: &Value) -> String {
    match value {
        Value::Null => "-".to_owned(),
        Value::String(s) => s.clone(),
        Value::Array(items) => {
            let parts: Vec<String> = items.iter().map(cell).collect();
            if parts.is_empty() {
                "-".to_owned()
            } else {
                parts.join(",")
            }
        }
        Value::Object(map) => map.values().map(cell).collect::<Vec<_>>().join(":"),
        other => other.to_string(),
    }
}
