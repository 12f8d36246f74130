//! The paths under test. Each scenario owns its namespaces, cgroups, backends, relays and
//! configuration files (guards: everything is removed when it drops) and knows where its
//! clients connect.
//!
//! Every path carries the same four services, so that every client measures every path:
//! iperf3 (throughput), sockperf (ping-pong latency), an echo server (connection rate and
//! idle streams) and a discard server (100 and 1,000 streams at once). A relay listens for
//! them on [`FRONT`] + 0, 1, 2, 3.

use std::{fmt::Write as _, path::Path, time::Duration};

use anyhow::Context as _;
use kernel_tests::{Cgroup, Netns, Proc, TempDir, skiff::Site};

/// The services behind every path: (routing key, backend port on 127.0.0.1).
pub const SERVICES: [(&str, u16); 4] = [
    ("iperf", 5201),
    ("ping", 11111),
    ("echo", 7007),
    ("flood", 9009),
];
/// The first port a relay listens on; service `i` is at `FRONT + i`.
const FRONT: u16 = 6000;
/// The first port of the TLS tunnel between two relays, on the west namespace's veth address.
const TUNNEL: u16 = 6100;

/// Where a client reaches each service.
#[derive(Clone, Copy, Debug)]
pub struct Ports {
    pub iperf: u16,
    pub ping: u16,
    pub echo: u16,
    pub flood: u16,
}

impl Ports {
    /// The backends' own ports: for clients that reach them without a relay.
    fn backends() -> Self {
        let [(_, iperf), (_, ping), (_, echo), (_, flood)] = SERVICES;
        Self {
            iperf,
            ping,
            echo,
            flood,
        }
    }

    fn starting_at(base: u16) -> Self {
        Self {
            iperf: base,
            ping: base + 1,
            echo: base + 2,
            flood: base + 3,
        }
    }
}

/// One path from the clients to the backends.
///
/// Fields drop in declaration order: relays and backends first, then the (by then empty)
/// cgroup, then the namespaces, then the configuration files.
pub struct Scenario {
    pub name: &'static str,
    pub description: &'static str,
    /// Where the clients connect (always 127.0.0.1 inside `client_ns`).
    pub ports: Ports,
    /// The relaying processes (each with its descendants), charged with CPU and memory.
    relays: Vec<u32>,
    _relay_procs: Vec<Graceful>,
    _sites: Vec<Site>,
    /// Programs the bench loaded itself (direct-sockmap); detached before the cgroup goes.
    _accel: Option<router::accel::Accel>,
    _backends: Vec<Proc>,
    /// Where the clients run, and inside which cgroup.
    pub client_cgroup: Option<Cgroup>,
    pub client_ns: Netns,
    _extra_ns: Vec<Netns>,
    _files: Option<TempDir>,
}

impl Scenario {
    /// A peer relaying in one namespace, its clients and backends beside it.
    fn peer(
        name: &'static str,
        description: &'static str,
        ns: Netns,
        backends: Vec<Proc>,
        relays: Vec<Graceful>,
        files: TempDir,
    ) -> Self {
        Self {
            name,
            description,
            ports: Ports::starting_at(FRONT),
            relays: relays
                .iter()
                .filter_map(|p| p.0.as_ref().map(Proc::pid))
                .collect(),
            _relay_procs: relays,
            _sites: vec![],
            _accel: None,
            _backends: backends,
            client_cgroup: None,
            client_ns: ns,
            _extra_ns: vec![],
            _files: Some(files),
        }
    }

    /// CPU seconds (user + system) used so far by the relaying processes and their children.
    pub fn relay_cpu_seconds(&self) -> f64 {
        self.relays.iter().map(|pid| tree_cpu_seconds(*pid)).sum()
    }

    /// Bytes skiff's routers have let take a shortcut past themselves so far (`skiff status`,
    /// `accel.bytesShortcut`); `None` where no router relays or nothing is accelerated.
    pub fn shortcut_bytes(&self) -> Option<u64> {
        self.client_cgroup.as_ref()?;
        if !self.has_relay() {
            return None;
        }
        let mut total = None;
        for site in &self._sites {
            if let Some(n) = site.status().ok()?["accel"]["bytesShortcut"].as_u64() {
                *total.get_or_insert(0) += n;
            }
        }
        total
    }

    /// Proportional set size of the relaying processes and their children, in KiB.
    pub fn relay_pss_kib(&self) -> u64 {
        self.relays.iter().map(|pid| tree_pss_kib(*pid)).sum()
    }

    /// Whether anything relays on this path (direct has nothing to charge).
    pub fn has_relay(&self) -> bool {
        !self.relays.is_empty()
    }
}

/// Every scenario name, in the order they run.
pub const ALL: &[&str] = &[
    "direct",
    "socat",
    "haproxy",
    "nginx",
    "skiff-hop",
    "skiff-hop-uring",
    "skiff-hop-accel",
    "direct-sockmap",
    "haproxy-tls",
    "stunnel",
    "skiff-chain",
    "skiff-chain-uring",
    "skiff-mtls",
    "skiff-mtls-uring",
    "skiff-mtls-accel",
];

/// The scenarios of a `--quick` run: the baseline and skiff's own paths.
pub const QUICK: &[&str] = &[
    "direct",
    "skiff-hop",
    "skiff-hop-uring",
    "skiff-hop-accel",
    "direct-sockmap",
    "skiff-mtls",
    "skiff-mtls-uring",
    "skiff-mtls-accel",
];

/// A peer process stopped with SIGINT on drop, so that a master (nginx) takes its workers
/// with it instead of leaving them behind as orphans.
struct Graceful(Option<Proc>);

impl Drop for Graceful {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = p.interrupt();
        }
    }
}

/// `pid` and its live descendants.
fn tree(pid: u32) -> Vec<u32> {
    let mut all = vec![pid];
    let mut i = 0;
    while i < all.len() {
        let p = all[i];
        if let Ok(tasks) = std::fs::read_dir(format!("/proc/{p}/task")) {
            for task in tasks.flatten() {
                let children =
                    std::fs::read_to_string(task.path().join("children")).unwrap_or_default();
                all.extend(
                    children
                        .split_whitespace()
                        .filter_map(|c| c.parse::<u32>().ok()),
                );
            }
        }
        i += 1;
    }
    all
}

fn tree_cpu_seconds(pid: u32) -> f64 {
    // SAFETY: sysconf has no preconditions.
    let hz = (unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64).max(1.0);
    tree(pid)
        .into_iter()
        .map(|p| {
            let stat = std::fs::read_to_string(format!("/proc/{p}/stat")).unwrap_or_default();
            // Fields after the command name (which may contain spaces): utime, stime, and
            // cutime, cstime for reaped children (socat forks a child per connection).
            let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
            let fields: Vec<&str> = rest.split_whitespace().collect();
            [11, 12, 13, 14]
                .iter()
                .filter_map(|i| fields.get(*i).and_then(|v| v.parse::<f64>().ok()))
                .sum::<f64>()
                / hz
        })
        .sum()
}

fn tree_pss_kib(pid: u32) -> u64 {
    tree(pid)
        .into_iter()
        .filter_map(|p| {
            let rollup = std::fs::read_to_string(format!("/proc/{p}/smaps_rollup")).ok()?;
            rollup
                .lines()
                .find_map(|l| l.strip_prefix("Pss:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .sum()
}

/// The path of the load generator built next to the bench binary.
pub fn loadgen() -> anyhow::Result<String> {
    let exe = std::env::current_exe()?;
    let dir = exe.parent().context("no exe dir")?;
    let path = [dir.join("loadgen"), dir.join("../loadgen")]
        .into_iter()
        .find(|p| p.exists())
        .context("loadgen is not built: cargo build -p kernel-tests --bins")?;
    Ok(path.to_string_lossy().into_owned())
}

/// The three backends, on 127.0.0.1 in `ns`.
fn backends(ns: &Netns, cgroup: Option<&Cgroup>) -> anyhow::Result<Vec<Proc>> {
    let [(_, iperf), (_, ping), (_, echo), (_, flood)] = SERVICES;
    let loadgen = loadgen()?;
    let procs = vec![
        Proc::spawn(
            ns,
            cgroup,
            &["iperf3", "-s", "-B", "127.0.0.1", "-p", &iperf.to_string()],
        )?,
        Proc::spawn(
            ns,
            cgroup,
            &[
                "sockperf",
                "server",
                "--tcp",
                "-i",
                "127.0.0.1",
                "-p",
                &ping.to_string(),
            ],
        )?,
        Proc::spawn(
            ns,
            cgroup,
            &[&loadgen, "echo", &format!("127.0.0.1:{echo}")],
        )?,
        Proc::spawn(
            ns,
            cgroup,
            &[&loadgen, "discard", &format!("127.0.0.1:{flood}")],
        )?,
    ];
    for (_, port) in SERVICES {
        ns.wait_listening(port, Duration::from_secs(10))?;
    }
    Ok(procs)
}

/// Waits for the relay to listen on every front port; on failure, says what the relays logged
/// (their logs are in `logs`).
fn wait_front(ns: &Netns, logs: Option<&TempDir>) -> anyhow::Result<()> {
    for i in (0..).take(SERVICES.len()) {
        if let Err(e) = ns.wait_listening(FRONT + i, Duration::from_secs(10)) {
            let mut said = String::new();
            for entry in logs
                .and_then(|d| std::fs::read_dir(d.path()).ok())
                .into_iter()
                .flatten()
                .flatten()
            {
                if entry.path().extension().is_some_and(|x| x == "log") {
                    let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
                    let _ = write!(said, " [{}: {}]", entry.file_name().display(), text.trim());
                }
            }
            return Err(e.context(format!("the relay did not start;{said}")));
        }
    }
    Ok(())
}

fn router_pid(site: &Site) -> anyhow::Result<u32> {
    site.router_pid().context("router not running")
}

/// Starts `argv` as a relay, its output in `log`.
fn relay(ns: &Netns, argv: &[&str], log: &Path) -> anyhow::Result<Graceful> {
    Ok(Graceful(Some(Proc::spawn_logged(ns, None, argv, log)?)))
}

/// A throwaway CA and two certificates signed by it (ECDSA P-256, as skiff's own), for the
/// TLS peers: `server.{crt,key}` with `west_ip` as its address, `client.{crt,key}`, and
/// `*.pem` with certificate and key together (HAProxy's format).
fn certificates(dir: &Path, west_ip: &str) -> anyhow::Result<()> {
    let sh = |script: &str| -> anyhow::Result<()> {
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(script)
            .current_dir(dir)
            .output()
            .context("failed to run openssl")?;
        anyhow::ensure!(
            out.status.success(),
            "openssl failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Ok(())
    };
    let key = "-newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes";
    sh(&format!(
        "openssl req -x509 {key} -keyout ca.key -out ca.crt -days 2 -subj /CN=bench-ca"
    ))?;
    for (name, ext) in [
        (
            "server",
            format!("subjectAltName=IP:{west_ip}\nextendedKeyUsage=serverAuth"),
        ),
        ("client", "extendedKeyUsage=clientAuth".to_owned()),
    ] {
        std::fs::write(dir.join(format!("{name}.ext")), ext)?;
        sh(&format!(
            "openssl req {key} -keyout {name}.key -out {name}.csr -subj /CN={name} && \
             openssl x509 -req -in {name}.csr -CA ca.crt -CAkey ca.key -CAcreateserial \
               -days 2 -extfile {name}.ext -out {name}.crt 2>/dev/null && \
             cat {name}.crt {name}.key > {name}.pem"
        ))?;
    }
    Ok(())
}

/// Builds scenario `name`. `subnet` keeps veth addresses apart between scenarios.
#[allow(clippy::too_many_lines)] // one arm per scenario reads better than ten functions
pub fn build(name: &str, subnet: u8, link_connections: u32) -> anyhow::Result<Scenario> {
    let front = Ports::starting_at(FRONT);
    let s = match name {
        "direct" => {
            let ns = Netns::new("bdirect")?;
            Scenario {
                name: "direct",
                description: "client -> server on loopback (the baseline)",
                ports: Ports::backends(),
                relays: vec![],
                _relay_procs: vec![],
                _sites: vec![],
                _accel: None,
                _backends: backends(&ns, None)?,
                client_cgroup: None,
                client_ns: ns,
                _extra_ns: vec![],
                _files: None,
            }
        }
        "socat" => {
            let ns = Netns::new("bsocat")?;
            let files = TempDir::new("bsocat")?;
            let backends = backends(&ns, None)?;
            let procs = SERVICES
                .iter()
                .zip(FRONT..)
                .map(|((key, port), listen)| {
                    relay(
                        &ns,
                        &[
                            "socat",
                            &format!(
                                "TCP-LISTEN:{listen},bind=127.0.0.1,fork,reuseaddr,backlog=1024"
                            ),
                            &format!("TCP:127.0.0.1:{port}"),
                        ],
                        &files.path().join(format!("{key}.log")),
                    )
                })
                .collect::<anyhow::Result<Vec<_>>>()?;
            wait_front(&ns, Some(&files))?;
            Scenario::peer(
                "socat",
                "client -> socat (plain TCP relay, a process per connection) -> server",
                ns,
                backends,
                procs,
                files,
            )
        }
        "haproxy" => {
            let ns = Netns::new("bhaproxy")?;
            let files = TempDir::new("bhaproxy")?;
            let backends = backends(&ns, None)?;
            let mut cfg = haproxy_global();
            for ((key, port), listen) in SERVICES.iter().zip(FRONT..) {
                let _ = write!(
                    cfg,
                    "listen {key}\n  bind 127.0.0.1:{listen}\n  server backend 127.0.0.1:{port}\n"
                );
            }
            let conf = files.path().join("haproxy.cfg");
            std::fs::write(&conf, cfg)?;
            let p = relay(
                &ns,
                &["haproxy", "-db", "-f", &conf.to_string_lossy()],
                &files.path().join("haproxy.log"),
            )?;
            wait_front(&ns, Some(&files))?;
            Scenario::peer(
                "haproxy",
                "client -> HAProxy (mode tcp) -> server",
                ns,
                backends,
                vec![p],
                files,
            )
        }
        "nginx" => {
            let ns = Netns::new("bnginx")?;
            let files = TempDir::new("bnginx")?;
            let backends = backends(&ns, None)?;
            let dir = files.path().to_string_lossy().into_owned();
            let mut cfg = format!(
                "load_module /usr/lib/nginx/modules/ngx_stream_module.so;\nworker_processes auto;\npid {dir}/nginx.pid;\nerror_log {dir}/error.log warn;\nevents {{ worker_connections 20000; }}\nstream {{\n"
            );
            for ((_, port), listen) in SERVICES.iter().zip(FRONT..) {
                let _ = writeln!(
                    cfg,
                    "  server {{ listen 127.0.0.1:{listen}; proxy_pass 127.0.0.1:{port}; }}"
                );
            }
            cfg.push_str("}\n");
            let conf = files.path().join("nginx.conf");
            std::fs::write(&conf, cfg)?;
            let p = relay(
                &ns,
                &[
                    "nginx",
                    "-p",
                    &dir,
                    "-c",
                    &conf.to_string_lossy(),
                    "-g",
                    "daemon off;",
                ],
                &files.path().join("nginx.log"),
            )?;
            wait_front(&ns, Some(&files))?;
            Scenario::peer(
                "nginx",
                "client -> nginx stream proxy -> server",
                ns,
                backends,
                vec![p],
                files,
            )
        }
        "skiff-hop" | "skiff-hop-uring" | "skiff-hop-accel" => {
            let accel = name == "skiff-hop-accel";
            let uring = name == "skiff-hop-uring";
            let ns = Netns::new(match name {
                "skiff-hop-accel" => "bhopacc",
                "skiff-hop-uring" => "bhopur",
                _ => "bhop",
            })?;
            let cgroup = if accel {
                Some(Cgroup::new("bhopacc")?)
            } else {
                None
            };
            let backends = backends(&ns, cgroup.as_ref())?;
            // The data path is named: a router's default (auto) would pick io_uring here.
            let datapath = ["--datapath", if uring { "uring" } else { "epoll" }];
            let run_args: Vec<&str> = if accel {
                ["--accel", "sockmap"].into_iter().chain(datapath).collect()
            } else {
                datapath.to_vec()
            };
            let site = Site::start_with(&ns, cgroup.as_ref(), "hop", None, &[], &run_args)?;
            for ((key, port), listen) in SERVICES.iter().zip(FRONT..) {
                site.connector(key, *port)?;
                site.listener(key, listen)?;
            }
            wait_front(&ns, None)?;
            Scenario {
                name: match name {
                    "skiff-hop-accel" => "skiff-hop-accel",
                    "skiff-hop-uring" => "skiff-hop-uring",
                    _ => "skiff-hop",
                },
                description: match name {
                    "skiff-hop-accel" => {
                        "client -> skiff listener -> connector -> server, sockmap on both legs"
                    }
                    "skiff-hop-uring" => {
                        "client -> skiff listener -> connector -> server (one router, plain TCP, io_uring data path)"
                    }
                    _ => {
                        "client -> skiff listener -> connector -> server (one router, plain TCP, epoll data path)"
                    }
                },
                ports: front,
                relays: vec![router_pid(&site)?],
                _relay_procs: vec![],
                _sites: vec![site],
                _accel: None,
                _backends: backends,
                client_cgroup: cgroup,
                client_ns: ns,
                _extra_ns: vec![],
                _files: None,
            }
        }
        "direct-sockmap" => {
            // skiff's programs, loaded by the bench itself with each server's port registered
            // as a listener endpoint: the router takes only connections it is an end of, so
            // no router can show what the mechanism makes with no relay at all.
            let ns = Netns::new("bdirsm")?;
            let cgroup = Cgroup::new("bdirsm")?;
            let backends = backends(&ns, Some(&cgroup))?;
            let mut accel = router::accel::Accel::attach_for(cgroup.path(), None, ns.cookie()?)?;
            for (_, port) in SERVICES {
                accel.add_endpoint(
                    std::net::SocketAddr::from(([127, 0, 0, 1], port)),
                    router::accel::EndpointKind::Listener,
                )?;
            }
            Scenario {
                name: "direct-sockmap",
                description: "client -> server, each socket's sends redirected into the other by \
                              skiff's programs, no relay: the ceiling of an accelerated hop",
                ports: Ports::backends(),
                relays: vec![],
                _relay_procs: vec![],
                _sites: vec![],
                _accel: Some(accel),
                _backends: backends,
                client_cgroup: Some(cgroup),
                client_ns: ns,
                _extra_ns: vec![],
                _files: None,
            }
        }
        "haproxy-tls" | "stunnel" => {
            let west_ns = Netns::new(if name == "stunnel" { "bstunw" } else { "bhatw" })?;
            let east_ns = Netns::new(if name == "stunnel" { "bstune" } else { "bhate" })?;
            let files = TempDir::new(name)?;
            let (west_ip, _) = west_ns.link(&east_ns, subnet)?;
            certificates(files.path(), &west_ip)?;
            let backends = backends(&west_ns, None)?;
            let dir = files.path().display().to_string();
            let (east_cfg, west_cfg, program): (String, String, &[&str]) = if name == "stunnel" {
                let (mut east, mut west) = (stunnel_global(), stunnel_global());
                for (((key, port), listen), tunnel) in SERVICES.iter().zip(FRONT..).zip(TUNNEL..) {
                    let _ = write!(
                        east,
                        "[{key}]\nclient = yes\naccept = 127.0.0.1:{listen}\nconnect = {west_ip}:{tunnel}\ncert = {dir}/client.crt\nkey = {dir}/client.key\nCAfile = {dir}/ca.crt\nverifyChain = yes\n"
                    );
                    let _ = write!(
                        west,
                        "[{key}]\naccept = {west_ip}:{tunnel}\nconnect = 127.0.0.1:{port}\ncert = {dir}/server.crt\nkey = {dir}/server.key\nCAfile = {dir}/ca.crt\nverifyChain = yes\nrequireCert = yes\n"
                    );
                }
                (east, west, &["stunnel"])
            } else {
                let (mut east, mut west) = (haproxy_global(), haproxy_global());
                for (((key, port), listen), tunnel) in SERVICES.iter().zip(FRONT..).zip(TUNNEL..) {
                    let _ = write!(
                        east,
                        "listen {key}\n  bind 127.0.0.1:{listen}\n  server west {west_ip}:{tunnel} ssl verify required ca-file {dir}/ca.crt crt {dir}/client.pem\n"
                    );
                    let _ = write!(
                        west,
                        "listen {key}\n  bind {west_ip}:{tunnel} ssl crt {dir}/server.pem ca-file {dir}/ca.crt verify required\n  server backend 127.0.0.1:{port}\n"
                    );
                }
                (east, west, &["haproxy", "-db", "-f"])
            };
            let mut procs = Vec::new();
            for (side, ns, cfg) in [("west", &west_ns, west_cfg), ("east", &east_ns, east_cfg)] {
                let conf = files.path().join(format!("{side}.conf"));
                std::fs::write(&conf, cfg)?;
                let conf = conf.to_string_lossy();
                let args: Vec<&str> = program.iter().copied().chain([conf.as_ref()]).collect();
                procs.push(relay(ns, &args, &files.path().join(format!("{side}.log")))?);
            }
            wait_front(&east_ns, Some(&files))?;
            Scenario {
                name: if name == "stunnel" {
                    "stunnel"
                } else {
                    "haproxy-tls"
                },
                description: if name == "stunnel" {
                    "client -> stunnel client -> TLS 1.3 mTLS over veth -> stunnel server -> server"
                } else {
                    "client -> HAProxy -> TLS 1.3 mTLS over veth -> HAProxy -> server"
                },
                ports: front,
                relays: procs
                    .iter()
                    .filter_map(|p| p.0.as_ref().map(Proc::pid))
                    .collect(),
                _relay_procs: procs,
                _sites: vec![],
                _accel: None,
                _backends: backends,
                client_cgroup: None,
                client_ns: east_ns,
                _extra_ns: vec![west_ns],
                _files: Some(files),
            }
        }
        "skiff-mtls" | "skiff-mtls-uring" | "skiff-mtls-accel" => {
            let accel = name == "skiff-mtls-accel";
            let uring = name == "skiff-mtls-uring";
            let (west, east) = match name {
                "skiff-mtls-accel" => ("bwesta", "beasta"),
                "skiff-mtls-uring" => ("bwestu", "beastu"),
                _ => ("bwest", "beast"),
            };
            let west_ns = Netns::new(west)?;
            let east_ns = Netns::new(east)?;
            // One cgroup for both sites' routers and workloads: the sockhash keys carry the
            // network namespace, so the two sides never mix.
            let cgroup = if accel {
                Some(Cgroup::new("bmtlsacc")?)
            } else {
                None
            };
            let (west_ip, _) = west_ns.link(&east_ns, subnet)?;
            let backends = backends(&west_ns, cgroup.as_ref())?;
            // Accelerated sockets run on epoll (they need its flow control); the others on
            // the backend the scenario names.
            let run_args: &[&str] = match (accel, uring) {
                (true, _) => &["--accel", "sockmap", "--datapath", "epoll"],
                (false, true) => &["--datapath", "uring"],
                (false, false) => &["--datapath", "epoll"],
            };
            let west = Site::start_with(
                &west_ns,
                cgroup.as_ref(),
                "west",
                Some(&format!("{west_ip}:55671")),
                &[],
                run_args,
            )?;
            let east = Site::start_with(&east_ns, cgroup.as_ref(), "east", None, &[], run_args)?;
            west.link_from_with(&east, &["--connections", &link_connections.to_string()])?;
            for ((key, port), listen) in SERVICES.iter().zip(FRONT..) {
                west.connector(key, *port)?;
                east.listener(key, listen)?;
            }
            east.wait_for(&["listener", "status"], Duration::from_secs(10), |out| {
                out.matches("\"reachable\": true").count() == SERVICES.len()
            })?;
            Scenario {
                name: match name {
                    "skiff-mtls-accel" => "skiff-mtls-accel",
                    "skiff-mtls-uring" => "skiff-mtls-uring",
                    _ => "skiff-mtls",
                },
                description: match name {
                    "skiff-mtls-accel" => {
                        "the skiff mTLS path with sockmap on the local legs at both ends"
                    }
                    "skiff-mtls-uring" => {
                        "the skiff mTLS path on io_uring: each router's link connection and the streams' sockets on one worker"
                    }
                    _ => {
                        "client -> router east -> TLS 1.3 mTLS link over veth -> router west -> server (epoll)"
                    }
                },
                ports: front,
                relays: vec![router_pid(&east)?, router_pid(&west)?],
                _relay_procs: vec![],
                _sites: vec![east, west],
                _accel: None,
                _backends: backends,
                client_cgroup: cgroup,
                client_ns: east_ns,
                _extra_ns: vec![west_ns],
                _files: None,
            }
        }
        "skiff-chain" | "skiff-chain-uring" => {
            // The mTLS path's shape without TLS: the same three TCP legs (loopback, veth,
            // loopback) and two routers, each joining a listener to a connector: with splice(2)
            // on epoll, through its worker's buffer ring on uring. What the better of the two
            // makes is a ceiling for the mTLS path on this machine, which does all of this and
            // encrypts and decrypts every byte on top.
            let uring = name == "skiff-chain-uring";
            let (west, east) = if uring {
                ("bchainuw", "bchainue")
            } else {
                ("bchainw", "bchaine")
            };
            let west_ns = Netns::new(west)?;
            let east_ns = Netns::new(east)?;
            let (west_ip, _) = west_ns.link(&east_ns, subnet)?;
            let backends = backends(&west_ns, None)?;
            let datapath = ["--datapath", if uring { "uring" } else { "epoll" }];
            let west = Site::start_with(&west_ns, None, "west", None, &[], &datapath)?;
            let east = Site::start_with(&east_ns, None, "east", None, &[], &datapath)?;
            for (((key, port), listen), tunnel) in SERVICES.iter().zip(FRONT..).zip(TUNNEL..) {
                let tunnel = tunnel.to_string();
                west.connector(key, *port)?;
                west.cli(&[
                    "listener", "create", key, "--host", &west_ip, "--port", &tunnel,
                ])?;
                east.cli(&[
                    "connector",
                    "create",
                    key,
                    "--host",
                    &west_ip,
                    "--port",
                    &tunnel,
                ])?;
                east.listener(key, listen)?;
            }
            wait_front(&east_ns, None)?;
            Scenario {
                name: if uring {
                    "skiff-chain-uring"
                } else {
                    "skiff-chain"
                },
                description: if uring {
                    "the same on io_uring: each router copies through its worker's buffer ring"
                } else {
                    "client -> router east -> plain TCP over veth -> router west -> server (the mTLS path without TLS)"
                },
                ports: front,
                relays: vec![router_pid(&east)?, router_pid(&west)?],
                _relay_procs: vec![],
                _sites: vec![east, west],
                _accel: None,
                _backends: backends,
                client_cgroup: None,
                client_ns: east_ns,
                _extra_ns: vec![west_ns],
                _files: None,
            }
        }
        other => anyhow::bail!("unknown scenario {other:?}; known: {}", ALL.join(", ")),
    };
    tune(&s.client_ns)?;
    for ns in &s._extra_ns {
        tune(ns)?;
    }
    Ok(s)
}

/// Lets a connection-rate run reuse client ports: tens of thousands of short connections in a
/// few seconds would otherwise exhaust them in TIME_WAIT, in every scenario alike.
fn tune(ns: &Netns) -> anyhow::Result<()> {
    ns.run(&[
        "sysctl",
        "-q",
        "-w",
        "net.ipv4.ip_local_port_range=10000 65000",
    ])?;
    ns.run(&["sysctl", "-q", "-w", "net.ipv4.tcp_tw_reuse=1"])?;
    Ok(())
}

fn haproxy_global() -> String {
    "global\n  maxconn 8000\n  ssl-default-bind-options ssl-min-ver TLSv1.3\n  ssl-default-server-options ssl-min-ver TLSv1.3\ndefaults\n  mode tcp\n  timeout connect 5s\n  timeout client 1h\n  timeout server 1h\n".to_owned()
}

fn stunnel_global() -> String {
    "foreground = yes\npid =\ndebug = err\nsslVersionMin = TLSv1.3\n".to_owned()
}
