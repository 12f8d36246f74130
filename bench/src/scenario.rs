//! The paths under test. Each scenario owns its namespaces, cgroups, servers and routers
//! (guards: everything is removed when it drops) and knows where its client connects.

use std::time::Duration;

use anyhow::Context as _;
use kernel_tests::{Cgroup, Netns, Proc, skiff::Site};

/// Port of the iperf3 server behind every path.
const SERVER_PORT: u16 = 5201;

/// One path from an iperf3 client to an iperf3 server.
///
/// Fields drop in declaration order: routers and servers first, then the (by then empty)
/// cgroup, then the namespaces.
pub struct Scenario {
    pub name: &'static str,
    pub description: &'static str,
    /// Where the client connects.
    pub target: (String, u16),
    /// The relaying processes, whose CPU time is charged to the scenario.
    relays: Vec<u32>,
    _sites: Vec<Site>,
    _procs: Vec<Proc>,
    /// Where the client runs, and inside which cgroup.
    pub client_cgroup: Option<Cgroup>,
    pub client_ns: Netns,
    _extra_ns: Vec<Netns>,
}

impl Scenario {
    /// CPU seconds (user + system) used so far by the relaying processes.
    pub fn relay_cpu_seconds(&self) -> f64 {
        self.relays.iter().map(|pid| cpu_seconds(*pid)).sum()
    }
}

/// Every scenario name, in the order they run.
pub const ALL: &[&str] = &[
    "direct",
    "socat",
    "skiff-hop",
    "skiff-hop-accel",
    "skiff-mtls",
];

fn cpu_seconds(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // Fields after the command name (which may contain spaces): utime, stime, and cutime,
    // cstime for reaped children (socat forks a child per connection).
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = [11, 12, 13, 14]
        .iter()
        .filter_map(|i| fields.get(*i).and_then(|v| v.parse::<f64>().ok()))
        .sum();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    ticks / hz.max(1.0)
}

fn iperf3_server(ns: &Netns, cgroup: Option<&Cgroup>) -> anyhow::Result<Proc> {
    let server = Proc::spawn(
        ns,
        cgroup,
        &[
            "iperf3",
            "-s",
            "-B",
            "127.0.0.1",
            "-p",
            &SERVER_PORT.to_string(),
        ],
    )?;
    ns.wait_listening(SERVER_PORT, Duration::from_secs(10))?;
    Ok(server)
}

fn router_pid(site: &Site) -> anyhow::Result<u32> {
    site.router_pid().context("router not running")
}

/// Builds scenario `name`. `subnet` keeps veth addresses apart between scenarios.
pub fn build(name: &str, subnet: u8) -> anyhow::Result<Scenario> {
    let local = |port: u16| ("127.0.0.1".to_owned(), port);
    match name {
        "direct" => {
            let ns = Netns::new("bdirect")?;
            let server = iperf3_server(&ns, None)?;
            Ok(Scenario {
                name: "direct",
                description: "client -> server on loopback (the baseline)",
                client_ns: ns,
                client_cgroup: None,
                target: local(SERVER_PORT),
                relays: vec![],
                _sites: vec![],
                _procs: vec![server],
                _extra_ns: vec![],
            })
        }
        "socat" => {
            let ns = Netns::new("bsocat")?;
            let server = iperf3_server(&ns, None)?;
            let relay = Proc::spawn(
                &ns,
                None,
                &[
                    "socat",
                    "TCP-LISTEN:5301,bind=127.0.0.1,fork,reuseaddr",
                    "TCP:127.0.0.1:5201",
                ],
            )?;
            ns.wait_listening(5301, Duration::from_secs(10))?;
            let pid = relay.pid();
            Ok(Scenario {
                name: "socat",
                description: "client -> socat (plain TCP relay) -> server",
                client_ns: ns,
                client_cgroup: None,
                target: local(5301),
                relays: vec![pid],
                _sites: vec![],
                _procs: vec![server, relay],
                _extra_ns: vec![],
            })
        }
        "skiff-hop" | "skiff-hop-accel" => {
            let accel = name == "skiff-hop-accel";
            let ns = Netns::new(if accel { "bhopacc" } else { "bhop" })?;
            let cgroup = if accel {
                Some(Cgroup::new("bhopacc")?)
            } else {
                None
            };
            let server = iperf3_server(&ns, cgroup.as_ref())?;
            let site = Site::start_in(&ns, cgroup.as_ref(), "hop", None)?;
            site.cli(&[
                "connector",
                "create",
                "perf",
                "--host",
                "127.0.0.1",
                "--port",
                "5201",
            ])?;
            site.cli(&[
                "listener",
                "create",
                "perf",
                "--host",
                "127.0.0.1",
                "--port",
                "5302",
            ])?;
            ns.wait_listening(5302, Duration::from_secs(10))?;
            let pid = router_pid(&site)?;
            Ok(Scenario {
                name: if accel {
                    "skiff-hop-accel"
                } else {
                    "skiff-hop"
                },
                description: if accel {
                    "client -> skiff listener -> connector -> server, sockmap on both legs"
                } else {
                    "client -> skiff listener -> connector -> server (one router, plain TCP)"
                },
                client_ns: ns,
                client_cgroup: cgroup,
                target: local(5302),
                relays: vec![pid],
                _sites: vec![site],
                _procs: vec![server],
                _extra_ns: vec![],
            })
        }
        "skiff-mtls" | "skiff-mtls-accel" => {
            let accel = name == "skiff-mtls-accel";
            let west_ns = Netns::new(if accel { "bwesta" } else { "bwest" })?;
            let east_ns = Netns::new(if accel { "beasta" } else { "beast" })?;
            // One cgroup for both sites' routers and workloads: the sockhash keys carry the
            // network namespace, so the two sides never mix.
            let cgroup = if accel {
                Some(Cgroup::new("bmtlsacc")?)
            } else {
                None
            };
            let (west_ip, _) = west_ns.link(&east_ns, subnet)?;
            let server = iperf3_server(&west_ns, cgroup.as_ref())?;
            let west = Site::start_in(
                &west_ns,
                cgroup.as_ref(),
                "west",
                Some(&format!("{west_ip}:55671")),
            )?;
            let east = Site::start_in(&east_ns, cgroup.as_ref(), "east", None)?;
            west.link_from(&east)?;
            west.cli(&[
                "connector",
                "create",
                "perf",
                "--host",
                "127.0.0.1",
                "--port",
                "5201",
            ])?;
            east.cli(&[
                "listener",
                "create",
                "perf",
                "--host",
                "127.0.0.1",
                "--port",
                "5303",
            ])?;
            east.wait_for(&["listener", "status"], Duration::from_secs(10), |out| {
                out.contains("\"reachable\": true")
            })?;
            let relays = vec![router_pid(&east)?, router_pid(&west)?];
            Ok(Scenario {
                name: if accel {
                    "skiff-mtls-accel"
                } else {
                    "skiff-mtls"
                },
                description: if accel {
                    "the mTLS path with sockmap on the local legs at both ends"
                } else {
                    "client -> router east -> mTLS link over veth -> router west -> server"
                },
                target: local(5303),
                relays,
                _sites: vec![east, west],
                _procs: vec![server],
                client_cgroup: cgroup,
                client_ns: east_ns,
                _extra_ns: vec![west_ns],
            })
        }
        other => anyhow::bail!("unknown scenario {other:?}; known: {}", ALL.join(", ")),
    }
}
