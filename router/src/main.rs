//! `skiff`: parses the command line, starts telemetry, and runs the command.

use std::process::ExitCode;

use anyhow::Context as _;
use clap::Parser as _;
use router::{
    admin::{self, Request},
    app,
    cli::{
        self, Cli, Command, ConnectorCommand, LinkCommand, ListenerCommand, RouterCommand,
        SiteCommand, TokenCommand,
    },
    pki::CertKey,
    service::{Connector, Listener},
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
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line: what failed, then its causes.
            let chain: Vec<String> = e.chain().map(ToString::to_string).collect();
            eprintln!("skiff: error: {}", chain.join(": "));
            ExitCode::FAILURE
        }
    }
}

/// Creates the declared site, or checks that the existing one matches it.
fn apply_site(state: &StateDir, site: &SiteConfig) -> anyhow::Result<()> {
    match state.config() {
        Ok(existing) if existing == *site => println!("Site {} unchanged", site.name),
        Ok(existing) => anyhow::bail!(
            "site {} already exists in {} with other settings; a site's settings change only by `skiff site delete` and applying again",
            existing.name,
            state.root().display()
        ),
        Err(router::site::Error::NoSite { .. }) => {
            state.create(site)?;
            println!("Site {} created", site.name);
        }
        Err(e) => return Err(e.into()),
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
                },
                &supplied,
            )?;
            println!("site {name} created in {}", state.root().display());
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
        Command::Router(RouterCommand::Run {
            accel,
            cgroup,
            metrics_addr,
        }) => {
            app::run(
                state,
                app::RunOptions {
                    accel: accel.into(),
                    cgroup,
                    metrics_addr,
                },
            )
            .await?;
        }
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
        Command::Link(LinkCommand::Delete { name }) => {
            call(Request::LinkDelete { name: name.clone() }).await?;
            println!("link {name} deleted");
        }
        Command::Listener(ListenerCommand::Create(args)) => {
            let routing_key = args.routing_key.unwrap_or_else(|| args.name.clone());
            let listener = Listener {
                name: args.name.clone(),
                host: args.host,
                port: args.port,
                routing_key,
                namespace: args.namespace,
                allow_namespaces: args.allow_namespace,
            };
            call(Request::ListenerCreate { listener }).await?;
            println!("listener {} created", args.name);
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
            };
            call(Request::ConnectorCreate { connector }).await?;
            println!("connector {} created", args.name);
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
                ("ACCEL", "accelSummary"),
                ("ISOLATION", "isolationSummary"),
            ],
        ),
        Command::Apply { file } => {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("failed to read {}", file.display()))?;
            let declared = router::resource::parse(&text)?;
            if let Some(site) = &declared.site {
                apply_site(&state, site)?;
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
