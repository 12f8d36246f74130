//! `skiff`: parses the command line, starts telemetry, and runs the command.

use std::process::ExitCode;

use anyhow::Context as _;
use clap::Parser as _;
use router::{
    admin::{self, Request},
    app,
    cli::{
        self, Cli, Command, ConnectorCommand, LinkCommand, ListenerCommand, PolicyCommand,
        RouterCommand, SiteCommand, TokenCommand,
    },
    pki::CertKey,
    privilege,
    service::{Connector, ConnectorTls, Listener, ListenerTls},
    site::{SiteConfig, StateDir, Supplied},
    token::Token,
};

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SKIFF_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    crash_on_panic();
    // Before the runtime starts its threads: privilege is per thread in the kernel.
    let started = match before_threads(&cli) {
        Ok(started) => started,
        Err(e) => return failure(&e),
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("skiff: error: failed to start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = match started {
        Started::Nothing => runtime.block_on(run(cli)),
        Started::Finished => Ok(()),
        Started::Router {
            kernel,
            options,
            keeper,
        } => {
            let result = runtime
                .block_on(app::run_attached(
                    StateDir::new(&cli.state_dir),
                    options,
                    *kernel,
                ))
                .map_err(anyhow::Error::from);
            if let Some(mut keeper) = keeper {
                // Closing its pipe tells the keeper the router is done; wait for the pins to go.
                drop(keeper.stdin.take());
                let _ = keeper.wait();
            }
            result
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => failure(&e),
    }
}

/// A panic anywhere ends the process at once, after one line that says where. Tokio would
/// catch a panicking task and go on, but a panic while a lock is held leaves that lock
/// poisoned and the state behind it half-changed, and every later use of it would panic in
/// turn: a wedged router is worse than a restarted one (systemd's `Restart=`, a DaemonSet's
/// pod restart), which re-dials its links from the state directory and clears its own pins.
fn crash_on_panic() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        default(info);
        eprintln!("skiff: internal error (a bug, please report it): {info}; stopping");
        std::process::abort();
    }));
}

/// Prints `e` on one line: what failed, then its causes.
fn failure(e: &anyhow::Error) -> ExitCode {
    let chain: Vec<String> = e.chain().map(ToString::to_string).collect();
    eprintln!("skiff: error: {}", chain.join(": "));
    ExitCode::FAILURE
}

/// What happened before the runtime started.
enum Started {
    /// Nothing: the command runs in the runtime.
    Nothing,
    /// The command is done (the pin keeper).
    Finished,
    /// `router run`: programs attached and, with `--user`, privilege given up.
    Router {
        kernel: Box<app::Kernel>,
        options: app::RunOptions,
        keeper: Option<std::process::Child>,
    },
}

/// `router run` attaches its eBPF programs and, with `--user`, gives up privilege (with a pin
/// keeper started first when there are pins); `router keep-pins` is the keeper.
fn before_threads(cli: &Cli) -> anyhow::Result<Started> {
    let (accel, datapath, cgroup, metrics_addr, flow_log, user, drain, console_addr) =
        match &cli.command {
            Command::Router(RouterCommand::KeepPins { pin_dir }) => {
                privilege::keep_pins(pin_dir)?;
                return Ok(Started::Finished);
            }
            Command::Router(RouterCommand::Run {
                accel,
                datapath,
                cgroup,
                metrics_addr,
                flow_log,
                user,
                drain_timeout,
                console_addr,
            }) => (
                accel,
                datapath,
                cgroup,
                metrics_addr,
                flow_log,
                user,
                *drain_timeout,
                console_addr,
            ),
            _ => return Ok(Started::Nothing),
        };
    match router::open_files::raise() {
        Ok((soft, hard)) if soft < router::open_files::LOW => tracing::warn!(
            open_files = soft,
            hard_limit = hard,
            "the router may hold only {soft} open files, about {} connections: raise its hard limit (LimitNOFILE=, ulimit -Hn)",
            soft / 2
        ),
        Ok((soft, _)) => tracing::info!(open_files = soft, "open files limit"),
        Err(e) => tracing::warn!(error = %e, "failed to raise the limit on open files"),
    }
    let state = StateDir::new(&cli.state_dir);
    let user = user.as_deref().map(privilege::User::lookup).transpose()?;
    if let Some(user) = &user {
        user.check_owns(state.root())?;
    }
    let options = app::RunOptions {
        accel: (*accel).into(),
        datapath: datapath.map(Into::into),
        cgroup: cgroup.clone(),
        metrics_addr: metrics_addr.clone(),
        flow_log: flow_log.clone(),
        owner: user.as_ref().map(|u| u.uid),
        drain: Some(drain),
        console_addr: console_addr.clone(),
    };
    let mut kernel = app::Kernel::attach_for(&state, &options)?;
    let mut keeper = None;
    if let Some(user) = &user {
        if let Some(dir) = kernel.pin_dir() {
            keeper = Some(privilege::spawn_keeper(dir)?);
            kernel.leave_pins_to_keeper();
        }
        let keep = if kernel.uses_maps() {
            privilege::Keep::for_this_kernel()
        } else {
            privilege::Keep::Nothing
        };
        privilege::drop_to(user, keep)?;
        match keep {
            privilege::Keep::Nothing => tracing::info!(
                user = %user.name,
                uid = user.uid,
                "privileges dropped: no capabilities from here on"
            ),
            privilege::Keep::Bpf => tracing::warn!(
                user = %user.name,
                uid = user.uid,
                "privileges dropped but CAP_BPF: before Linux 5.19 the kernel refuses every bpf() \
                 call to a caller without it while kernel.unprivileged_bpf_disabled is set"
            ),
        }
    }
    Ok(Started::Router {
        kernel: Box::new(kernel),
        options,
        keeper,
    })
}

/// `path` made absolute against the CLI's working directory: the router, which reads the file,
/// runs elsewhere.
fn absolute(path: &std::path::Path) -> String {
    std::path::absolute(path)
        .unwrap_or_else(|_| path.to_owned())
        .display()
        .to_string()
}

/// Writes a service bundle as Skupper's secrets hold it: `ca.crt`, `tls.crt`, `tls.key`
/// (0600), into `dir` (created 0700 if missing).
/// The columns of `skiff flows`.
const FLOW_COLUMNS: &[(&str, &str)] = &[
    ("ID", "id"),
    ("ROLE", "role"),
    ("ROUTING_KEY", "routingKey"),
    ("RESOURCE", "resource"),
    ("CLIENT", "client"),
    ("ORIGIN", "origin"),
    ("DEST", "dest"),
    ("TO_BACKEND", "bytesToBackend"),
    ("TO_CLIENT", "bytesToClient"),
    ("OUTCOME", "outcome"),
    ("FAILURE", "failure"),
];

/// Draws a DOT graph as SVG with Graphviz's `dot`.
fn render_svg(graph: &str) -> anyhow::Result<String> {
    use std::io::Write as _;
    let mut dot = std::process::Command::new("dot")
        .arg("-Tsvg")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("--output svg needs Graphviz's dot (Debian: apt install graphviz)")?;
    dot.stdin
        .take()
        .context("no stdin for dot")?
        .write_all(graph.as_bytes())
        .context("failed to write the graph to dot")?;
    let drawn = dot.wait_with_output().context("dot failed")?;
    anyhow::ensure!(
        drawn.status.success(),
        "dot failed ({}): {}",
        drawn.status,
        String::from_utf8_lossy(&drawn.stderr).trim()
    );
    String::from_utf8(drawn.stdout).context("dot wrote something that is not UTF-8")
}

fn bundle_request(kind: admin::BundleKind, name: &str) -> Request {
    Request::ServiceBundle {
        kind,
        name: name.to_owned(),
    }
}

fn write_bundle(dir: &std::path::Path, bundle: &serde_json::Value) -> anyhow::Result<()> {
    use std::os::unix::fs::DirBuilderExt as _;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("failed to create {}", dir.display()))?;
    for (file, field, mode) in [
        ("ca.crt", "ca", 0o644),
        ("tls.crt", "cert", 0o644),
        ("tls.key", "key", 0o600),
    ] {
        let pem = bundle[field]
            .as_str()
            .context("the router sent an incomplete bundle")?;
        router::site::write_atomic(&dir.join(file), pem.as_bytes(), mode)?;
    }
    Ok(())
}

/// Prints what a policy change did to existing links and resources, one line per kind.
fn print_policy_changes(changes: &serde_json::Value) {
    for (field, what) in [
        ("closedIncomingLinks", "closed incoming links from"),
        ("stoppedLinks", "stopped links"),
        ("resumedLinks", "resumed links"),
        ("withdrawnConnectors", "withdrew connectors"),
        ("advertisedConnectors", "advertised connectors"),
        ("refusingListeners", "listeners now refusing connections"),
    ] {
        let names: Vec<&str> = changes[field]
            .as_array()
            .map(|a| a.iter().filter_map(serde_json::Value::as_str).collect())
            .unwrap_or_default();
        if !names.is_empty() {
            println!("  {what}: {}", names.join(", "));
        }
    }
}

/// Creates the declared site, or checks that the existing one matches it.
fn apply_site(state: &StateDir, site: &SiteConfig) -> anyhow::Result<()> {
    match state.apply(site)? {
        router::site::Applied::Unchanged => println!("Site {} unchanged", site.name),
        router::site::Applied::Created => println!("Site {} created", site.name),
    }
    Ok(())
}

/// Reads a PEM certificate and key given on the command line.
fn read_pair(
    cert: Option<std::path::PathBuf>,
    key: Option<std::path::PathBuf>,
) -> anyhow::Result<Option<CertKey>> {
    let (Some(cert), Some(key)) = (cert, key) else {
        return Ok(None);
    };
    let read = |path: &std::path::Path| {
        std::fs::read_to_string(path).with_context(|| format!("failed to read {}", path.display()))
    };
    Ok(Some(CertKey {
        cert_pem: read(&cert)?,
        key_pem: read(&key)?,
    }))
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let state = StateDir::new(&cli.state_dir);
    let socket = state.admin_socket();
    let call = |request: Request| {
        let socket = socket.clone();
        async move { admin::call(&socket, &request).await }
    };
    let out = cli.output;
    if matches!(out, cli::Output::Dot | cli::Output::Svg)
        && !matches!(cli.command, Command::Network(cli::NetworkCommand::Status))
    {
        anyhow::bail!("--output dot and --output svg draw `skiff network status` only");
    }
    match cli.command {
        Command::Site(SiteCommand::Create {
            name,
            link_access,
            namespace,
            isolate_namespaces,
            ca_cert,
            ca_key,
            router_cert,
            router_key,
            cert_lifetime,
            datapath,
        }) => {
            let supplied = Supplied {
                ca: read_pair(ca_cert, ca_key)?,
                router: read_pair(router_cert, router_key)?,
            };
            state.create_with(
                &SiteConfig {
                    name: name.clone(),
                    link_access,
                    namespaces: namespace.into_iter().collect(),
                    isolate_namespaces,
                    cert_lifetime_secs: cert_lifetime,
                    datapath: datapath.map(Into::into),
                },
                &supplied,
            )?;
            println!("site {name} created in {}", state.root().display());
        }
        Command::Site(SiteCommand::RotateCerts) => {
            let done = call(Request::RotateCerts).await?;
            println!(
                "router identity and {} TLS listener certificate(s) replaced; links stay up",
                done["listeners"]
            );
        }
        Command::Site(SiteCommand::Delete) => {
            state.config()?;
            // Stop a running router first; none running is fine.
            match call(Request::Shutdown).await {
                Ok(_) | Err(admin::Error::NotRunning { .. }) => {}
                Err(e) => return Err(e.into()),
            }
            for _ in 0..100 {
                if !socket.exists() {
                    break;
                }
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
            state.remove()?;
            println!("site deleted: {} removed", state.root().display());
        }
        Command::Router(_) => unreachable!("router commands run in main, before the runtime"),
        Command::Token(TokenCommand::Issue {
            file,
            redemptions,
            expiry,
        }) => {
            let token = call(Request::TokenIssue {
                redemptions,
                expiry_secs: expiry.as_secs(),
            })
            .await?;
            let text = serde_json::to_vec_pretty(&token)?;
            router::site::write_atomic(&file, &text, 0o600)?;
            println!(
                "token written to {} ({redemptions} redemption(s), valid {}s)",
                file.display(),
                expiry.as_secs()
            );
        }
        Command::Token(TokenCommand::Redeem {
            file,
            name,
            cost,
            connections,
        }) => {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("failed to read token {}", file.display()))?;
            let token: Token = serde_json::from_str(&text)
                .with_context(|| format!("{} is not a skiff token", file.display()))?;
            let answer = call(Request::TokenRedeem {
                token,
                name,
                cost,
                connections,
            })
            .await?;
            println!("link {} created", answer["link"].as_str().unwrap_or("?"));
        }
        Command::Link(LinkCommand::Status) => cli::print(
            out,
            &call(Request::LinkStatus).await?,
            &[
                ("NAME", "name"),
                ("DIRECTION", "direction"),
                ("PEER", "peer"),
                ("STATUS", "status"),
                ("CONNS", "connections"),
                ("RTT_US", "rttMicros"),
                ("STREAMS", "streams"),
                ("BYTES_IN", "bytesIn"),
                ("BYTES_OUT", "bytesOut"),
            ],
        ),
        Command::Link(LinkCommand::Revoke { site }) => {
            let done = call(Request::LinkRevoke { site: site.clone() }).await?;
            println!(
                "revoked {} credential(s) of site {site}; closed {} link connection(s)",
                done["revokedCredentials"], done["closedConnections"]
            );
        }
        Command::Link(LinkCommand::Create(args)) => {
            let read = |path: &std::path::Path| {
                std::fs::read_to_string(path)
                    .with_context(|| format!("failed to read {}", path.display()))
            };
            let name = args.name.unwrap_or_else(|| args.peer_site.clone());
            call(Request::LinkCreate {
                name: name.clone(),
                url: args.url,
                peer_site: args.peer_site,
                ca: read(&args.ca_file)?,
                cert: read(&args.cert)?,
                key: read(&args.key)?,
                cost: args.cost,
                connections: args.connections,
            })
            .await?;
            println!("link {name} created; `skiff link status` shows when it is up");
        }
        Command::Link(LinkCommand::Delete { name }) => {
            call(Request::LinkDelete { name: name.clone() }).await?;
            println!("link {name} deleted");
        }
        Command::Listener(ListenerCommand::Create(args)) => {
            let routing_key = args.routing_key.unwrap_or_else(|| args.name.clone());
            let listener = Listener {
                name: args.name.clone(),
                host: args.host.unwrap_or_else(|| {
                    router::service::default_listener_host(args.namespace.as_deref())
                }),
                port: args.port,
                routing_key,
                namespace: args.namespace,
                allow_namespaces: args.allow_namespace,
                tls: args.tls.then(|| ListenerTls {
                    require_client_cert: args.require_client_cert,
                    cert_file: args.cert.as_deref().map(absolute),
                    key_file: args.key.as_deref().map(absolute),
                    alpn: args.alpn,
                }),
            };
            call(Request::ListenerCreate { listener }).await?;
            println!("listener {} created", args.name);
            if let Some(dir) = args.bundle_out {
                let bundle = call(bundle_request(admin::BundleKind::Client, &args.name)).await?;
                write_bundle(&dir, &bundle)?;
                println!("client bundle written to {}", dir.display());
            }
        }
        Command::Listener(ListenerCommand::Status) => cli::print(
            out,
            &call(Request::ListenerStatus).await?,
            &[
                ("NAME", "name"),
                ("HOST", "host"),
                ("PORT", "port"),
                ("ROUTING_KEY", "routingKey"),
                ("REACHABLE", "reachable"),
                ("CONNECTIONS", "connections"),
            ],
        ),
        Command::Listener(ListenerCommand::Delete { name }) => {
            call(Request::ListenerDelete { name: name.clone() }).await?;
            println!("listener {name} deleted");
        }
        Command::Connector(ConnectorCommand::Create(args)) => {
            let routing_key = args.routing_key.unwrap_or_else(|| args.name.clone());
            let connector = Connector {
                name: args.name.clone(),
                host: args.host,
                port: args.port,
                routing_key,
                tls: args.tls.then(|| ConnectorTls {
                    ca_file: args.ca_file.as_deref().map(absolute),
                    server_name: args.server_name,
                    cert_file: args.cert.as_deref().map(absolute),
                    key_file: args.key.as_deref().map(absolute),
                }),
            };
            call(Request::ConnectorCreate { connector }).await?;
            println!("connector {} created", args.name);
            if let Some(dir) = args.bundle_out {
                let bundle = call(bundle_request(admin::BundleKind::Server, &args.name)).await?;
                write_bundle(&dir, &bundle)?;
                println!("server bundle for the backend written to {}", dir.display());
            }
        }
        Command::Connector(ConnectorCommand::Status) => cli::print(
            out,
            &call(Request::ConnectorStatus).await?,
            &[
                ("NAME", "name"),
                ("HOST", "host"),
                ("PORT", "port"),
                ("ROUTING_KEY", "routingKey"),
            ],
        ),
        Command::Connector(ConnectorCommand::Delete { name }) => {
            call(Request::ConnectorDelete { name: name.clone() }).await?;
            println!("connector {name} deleted");
        }
        Command::Status => cli::print(
            out,
            &call(Request::Status).await?,
            &[
                ("SITE", "site"),
                ("LINK_ACCESS", "linkAccess"),
                ("LINKS", "links"),
                ("LISTENERS", "listeners"),
                ("CONNECTORS", "connectors"),
                ("ACTIVE", "activeConnections"),
                ("DATAPATH", "datapathSummary"),
                ("ACCEL", "accelSummary"),
                ("ISOLATION", "isolationSummary"),
            ],
        ),
        Command::Apply { file } => {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("failed to read {}", file.display()))?;
            let declared = router::resource::parse(&text)?;
            declared.check_applicable()?;
            if let Some(site) = &declared.site {
                apply_site(&state, site)?;
            }
            // The policy first, so that the resources in the same file are checked against it.
            if let Some(policy) = declared.policy {
                let changes = call(Request::PolicySet {
                    policy: Some(policy),
                })
                .await?;
                println!("SitePolicy applied");
                print_policy_changes(&changes);
            }
            let empty =
                declared.resources.listeners.is_empty() && declared.resources.connectors.is_empty();
            if !empty {
                let rows = call(Request::Apply {
                    resources: declared.resources,
                })
                .await?;
                cli::print(
                    out,
                    &rows,
                    &[
                        ("KIND", "kind"),
                        ("NAME", "name"),
                        ("RESULT", "result"),
                        ("ERROR", "error"),
                    ],
                );
                if rows
                    .as_array()
                    .is_some_and(|r| r.iter().any(|row| row["result"] == "failed"))
                {
                    anyhow::bail!("some resources were not applied");
                }
            }
        }
        Command::Controller {
            node,
            namespace,
            cgroup_root,
            resync_secs,
        } => {
            let client = kube::Client::try_default()
                .await
                .context("failed to reach the Kubernetes API server")?;
            let options = router::k8s::controller::Options {
                node,
                // An empty SKIFF_NAMESPACES means every namespace, not one named "".
                namespaces: namespace.into_iter().filter(|n| !n.is_empty()).collect(),
                state,
                cgroup_roots: cgroup_root,
                resync: std::time::Duration::from_secs(resync_secs.max(1)),
            };
            router::k8s::controller::run(client, options).await?;
        }
        Command::Policy(PolicyCommand::Status) => {
            let status = call(Request::PolicyStatus).await?;
            if out == cli::Output::Table {
                match &status["policy"] {
                    serde_json::Value::Null => println!("no policy: everything is allowed"),
                    policy => println!("{}", serde_yaml_ng::to_string(policy)?.trim_end()),
                }
                println!("denials: {}", status["denials"]);
            } else {
                cli::print(out, &status, &[]);
            }
        }
        Command::Policy(PolicyCommand::Delete) => {
            let changes = call(Request::PolicySet { policy: None }).await?;
            println!("policy deleted: everything is allowed");
            print_policy_changes(&changes);
        }
        Command::Flows { follow: false } => cli::print(
            out,
            &call(Request::Flows { since: None }).await?,
            FLOW_COLUMNS,
        ),
        Command::Flows { follow: true } => {
            let mut since = 0;
            loop {
                let flows = call(Request::Flows { since: Some(since) }).await?;
                for flow in flows.as_array().into_iter().flatten() {
                    since = since.max(flow["id"].as_u64().unwrap_or(0));
                    if out == cli::Output::Json {
                        println!("{flow}");
                    } else {
                        println!("{}", cli::row(flow, FLOW_COLUMNS));
                    }
                }
                tokio::time::sleep(std::time::Duration::from_millis(500)).await;
            }
        }
        Command::Network(cli::NetworkCommand::Status)
            if matches!(out, cli::Output::Dot | cli::Output::Svg) =>
        {
            let me = state.config()?.name;
            let graph = router::topology::dot(
                &me,
                &call(Request::NetworkStatus).await?,
                &call(Request::LinkStatus).await?,
                &call(Request::ListenerStatus).await?,
            );
            if out == cli::Output::Dot {
                print!("{graph}");
            } else {
                print!("{}", render_svg(&graph)?);
            }
        }
        Command::Network(cli::NetworkCommand::Status) => cli::print(
            out,
            &call(Request::NetworkStatus).await?,
            &[
                ("SITE", "site"),
                ("REACHABLE", "reachable"),
                ("COST", "cost"),
                ("ROUTING_KEYS", "routingKeys"),
                ("LINKS", "linkSummary"),
            ],
        ),
    }
    Ok(())
}
