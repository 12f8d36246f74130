//! `bench`: measures skiff against direct loopback and other relays on this machine, in one
//! run, and reports every figure as a ratio to the direct baseline measured in the same run.
//!
//! Method: every scenario is set up once; runs are interleaved (A B C A B C ...) so that drift
//! in the machine's state affects all scenarios alike; each figure is the median of the runs,
//! with min and max. Each run drives the same real clients through every path: iperf3 with one
//! stream and with [`PARALLEL`], sockperf ping-pong (round-trip p50 and p99), and a
//! connection-rate client; memory per 1,000 idle streams is read once per scenario at the end.
//! CPU cost is the relaying processes' user + system time per Gbit moved. Nothing here is a
//! pass/fail threshold.

mod connect;
mod report;
mod scenario;

use std::{path::PathBuf, time::Duration};

use std::fmt::Write as _;

use anyhow::Context as _;
use clap::Parser;
use kernel_tests::Proc;

/// Benchmarks skiff against direct loopback and other relays.
#[derive(Debug, Parser)]
#[command(name = "bench")]
struct Args {
    /// Scenarios to run (default: all). Known: direct, socat, haproxy, nginx, skiff-hop,
    /// skiff-hop-uring, skiff-hop-accel, direct-sockmap, haproxy-tls, stunnel, skiff-chain, skiff-chain-uring,
    /// skiff-mtls, skiff-mtls-uring, skiff-mtls-accel.
    scenarios: Vec<String>,
    /// Runs per scenario.
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Seconds per iperf3 run.
    #[arg(long, default_value_t = 5)]
    seconds: u32,
    /// Three runs of one second per client, and (unless scenarios are named) only direct,
    /// skiff's own paths and the accelerated hop's ceiling: about two minutes (131 s here), for
    /// judging a change to skiff.
    #[arg(long)]
    quick: bool,
    /// One run of one second: proves the harness works, measures nothing worth reading.
    #[arg(long)]
    smoke: bool,
    /// TLS connections per link in the skiff-mtls scenarios (`token redeem --connections`).
    #[arg(long, default_value_t = 1)]
    link_connections: u32,
    /// Also measure connect() latency with namespace isolation (1,000 protected listeners).
    #[arg(long)]
    connect_latency: bool,
    /// Also run 100 and 1,000 streams at once through every path (`loadgen flood`). Not in the
    /// default run yet: several paths fail it (docs/performance.md, "Many streams at once").
    #[arg(long)]
    streams: bool,
    /// Where to write results.json, results.md and throughput.svg.
    #[arg(long, default_value = "bench/results/latest")]
    out: PathBuf,
}

/// Set by SIGINT: stop after the measurement in progress and clean up (namespaces, cgroups,
/// routers and peers are guards that only run when `main` returns normally).
static INTERRUPTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

extern "C" fn on_sigint(_: libc::c_int) {
    INTERRUPTED.store(true, std::sync::atomic::Ordering::Relaxed);
}

fn interrupted() -> bool {
    INTERRUPTED.load(std::sync::atomic::Ordering::Relaxed)
}

fn main() -> anyhow::Result<()> {
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        libc::signal(
            libc::SIGINT,
            on_sigint as extern "C" fn(libc::c_int) as *const () as libc::sighandler_t,
        )
    };
    let started = std::time::Instant::now();
    let mut args = Args::parse();
    if args.quick {
        (args.runs, args.seconds) = (3, 1);
    }
    if args.smoke {
        (args.runs, args.seconds) = (1, 1);
    }
    let names: Vec<String> = if args.scenarios.is_empty() {
        let all = if args.quick {
            scenario::QUICK
        } else {
            scenario::ALL
        };
        all.iter().map(|s| (*s).to_owned()).collect()
    } else {
        args.scenarios.clone()
    };
    anyhow::ensure!(
        names.iter().any(|n| n == "direct"),
        "the direct baseline must be part of every run"
    );

    eprintln!("bench: setting up {}", names.join(", "));
    let scenarios = names
        .iter()
        .enumerate()
        .map(|(i, name)| {
            scenario::build(
                name,
                240 + u8::try_from(i).unwrap_or(0),
                args.link_connections,
            )
        })
        .collect::<anyhow::Result<Vec<_>>>()?;

    let jiffies_before = report::cpu_jiffies();
    let mut samples: Vec<Vec<report::Sample>> = vec![Vec::new(); scenarios.len()];
    let mut failures: Vec<Vec<String>> = vec![Vec::new(); scenarios.len()];
    'runs: for run in 1..=args.runs {
        for (i, s) in scenarios.iter().enumerate() {
            if interrupted() {
                break 'runs;
            }
            // A failed run is reported, not fatal: the other scenarios' figures still stand,
            // and how often a path fails is itself a result.
            let sample = match measure(s, run, args.seconds, args.streams) {
                Ok(sample) => sample,
                Err(e) => {
                    eprintln!(
                        "bench: run {run}/{} {:<16} failed: {e:#}",
                        args.runs, s.name
                    );
                    failures[i].push(format!("run {run}: {e:#}"));
                    continue;
                }
            };
            eprintln!(
                "bench: run {run}/{} {:<16} {:>6.2} Gbit/s, x{PARALLEL} {:>6.2}{} Gbit/s, rtt p50 {:>6.1} µs, {:>7.0} conn/s",
                args.runs,
                s.name,
                sample.gbps,
                sample.gbps_parallel,
                sample
                    .gbps_100
                    .zip(sample.gbps_1000)
                    .map_or_else(String::new, |(a, b)| format!(
                        ", x100 {a:>6.2}, x1000 {b:>6.2}"
                    )),
                sample.rtt_p50_us,
                sample.conns_per_s
            );
            samples[i].push(sample);
        }
    }

    let idle = if args.smoke { 100 } else { IDLE_STREAMS };
    let memory = scenarios
        .iter()
        .filter(|_| !interrupted())
        .map(|s| {
            let m = idle_memory(s, idle).with_context(|| format!("scenario {}", s.name))?;
            if let Some(kib) = m {
                eprintln!(
                    "bench: {:<16} {kib:>8.0} KiB per 1,000 idle streams",
                    s.name
                );
            }
            Ok(m)
        })
        .collect::<anyhow::Result<Vec<_>>>()?;

    if interrupted() {
        drop(scenarios);
        anyhow::bail!("interrupted; everything the run set up has been removed");
    }
    let steal = report::steal_percent(jiffies_before, report::cpu_jiffies());
    if steal > 5.0 {
        eprintln!(
            "bench: warning: the hypervisor stole {steal:.0}% of CPU time during the run; absolute figures are unreliable"
        );
    }
    let report = report::Report::new(
        &scenarios,
        &samples,
        &memory,
        &failures,
        args.runs,
        args.seconds,
        steal,
    );
    // Free the scenarios' namespaces and routers before the next measurement.
    drop(scenarios);
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("failed to create {}", args.out.display()))?;
    report.write(&args.out)?;
    let mut md = report.markdown();
    let _ = writeln!(
        md,
        "\nWall time of the run: {:.0} s.",
        started.elapsed().as_secs_f64()
    );
    if args.connect_latency {
        eprintln!("bench: connect() latency with 1,001 protected listeners");
        let connects = if args.smoke { 200 } else { 5_000 };
        let section = connect::run(args.runs, connects)?;
        std::fs::write(args.out.join("connect.md"), &section)?;
        md.push_str(&section);
    }
    println!("{md}");
    eprintln!("bench: results in {}", args.out.display());
    Ok(())
}

/// Streams in iperf3's parallel run.
pub const PARALLEL: u32 = 4;
/// Connections the connection-rate client keeps in flight.
const CONNRATE_PARALLEL: u32 = 16;
/// Idle streams held open for the memory reading.
const IDLE_STREAMS: usize = 1_000;

/// Runs `argv` as a client of `s` (in its namespace and cgroup) and returns its stdout.
fn client(s: &scenario::Scenario, argv: &[&str], seconds: u32) -> anyhow::Result<String> {
    Proc::spawn(&s.client_ns, s.client_cgroup.as_ref(), argv)?
        .wait(Duration::from_secs(u64::from(seconds) + 30))
}

/// Run number `run` of every client through `s`.
fn measure(
    s: &scenario::Scenario,
    run: usize,
    seconds: u32,
    streams: bool,
) -> anyhow::Result<report::Sample> {
    // The status reads stay outside the CPU reading: answering them is the router's work too.
    let shortcut_before = s.shortcut_bytes();
    let cpu_before = s.relay_cpu_seconds();
    let (gbps, bytes) = iperf3(s, seconds, 1)?;
    let cpu = s.relay_cpu_seconds() - cpu_before;
    let shortcut_share = shortcut_before
        .zip(s.shortcut_bytes())
        .filter(|_| bytes > 0.0)
        .map(|(before, after)| after.saturating_sub(before) as f64 / bytes);
    let gbit = bytes * 8.0 / 1e9;
    let (gbps_parallel, _) = iperf3(s, seconds, PARALLEL)?;
    // Latency and connection rate settle faster than throughput: at most 3 s each keeps the
    // full run under 20 minutes.
    let short = seconds.min(3);
    let (rtt_p50_us, rtt_p99_us) = sockperf(s, short)?;
    let (mut gbps_100, mut cpu_per_gbit_100, mut gbps_1000) = (None, None, None);
    if streams {
        let cpu_before = s.relay_cpu_seconds();
        let (gbps, bytes) = flood(s, 100, short)?;
        let cpu = s.relay_cpu_seconds() - cpu_before;
        let gbit = bytes * 8.0 / 1e9;
        gbps_100 = Some(gbps);
        cpu_per_gbit_100 = Some(if gbit > 0.0 { cpu / gbit } else { 0.0 });
        gbps_1000 = Some(flood(s, 1000, short)?.0);
    }
    Ok(report::Sample {
        run,
        gbps,
        cpu_per_gbit: if gbit > 0.0 { cpu / gbit } else { 0.0 },
        gbps_parallel,
        gbps_100,
        cpu_per_gbit_100,
        gbps_1000,
        rtt_p50_us,
        rtt_p99_us,
        conns_per_s: connrate(s, short)?,
        shortcut_share,
    })
}

/// iperf3 with `streams` streams: (Gbit/s received, bytes received).
fn iperf3(s: &scenario::Scenario, seconds: u32, streams: u32) -> anyhow::Result<(f64, f64)> {
    let mut attempts = 0;
    loop {
        attempts += 1;
        let out = client(
            s,
            &[
                "iperf3",
                "-c",
                "127.0.0.1",
                "-p",
                &s.ports.iperf.to_string(),
                "-t",
                &seconds.to_string(),
                "-P",
                &streams.to_string(),
                "-J",
            ],
            seconds,
        )?;
        let json: serde_json::Value =
            serde_json::from_str(&out).context("iperf3 printed no JSON")?;
        let error = json["error"].as_str().unwrap_or("no error given");
        // The iperf3 server closes its listening socket after each test and opens a new one:
        // a client that comes straight back (the direct scenario) can find nothing listening.
        if error.contains("Connection refused") && attempts < 3 {
            std::thread::sleep(Duration::from_millis(200));
            continue;
        }
        let bps = json["end"]["sum_received"]["bits_per_second"]
            .as_f64()
            .with_context(|| format!("iperf3 -P {streams} reported no received rate: {error}"))?;
        let bytes = json["end"]["sum_received"]["bytes"].as_f64().unwrap_or(0.0);
        return Ok((bps / 1e9, bytes));
    }
}

/// `conns` connections sending at once for `seconds` (`loadgen flood` against the discard
/// server): (aggregate Gbit/s, bytes the server counted).
fn flood(s: &scenario::Scenario, conns: usize, seconds: u32) -> anyhow::Result<(f64, f64)> {
    let out = client(
        s,
        &[
            &scenario::loadgen()?,
            "flood",
            &format!("127.0.0.1:{}", s.ports.flood),
            &conns.to_string(),
            &seconds.to_string(),
        ],
        seconds,
    )?;
    let json: serde_json::Value = serde_json::from_str(&out).context("loadgen printed no JSON")?;
    let gbps = json["gbps"]
        .as_f64()
        .context("loadgen report has no rate")?;
    Ok((gbps, json["bytes"].as_f64().unwrap_or(0.0)))
}

/// sockperf ping-pong over one TCP connection: round-trip (p50, p99) in µs. sockperf spends
/// the first 400 ms warming up, so a one-second run measures about 0.6 s.
fn sockperf(s: &scenario::Scenario, seconds: u32) -> anyhow::Result<(f64, f64)> {
    let time = seconds.to_string();
    let out = client(
        s,
        &[
            "sockperf",
            "ping-pong",
            "--tcp",
            "-i",
            "127.0.0.1",
            "-p",
            &s.ports.ping.to_string(),
            "-t",
            &time,
            "--full-rtt",
        ],
        seconds,
    )?;
    let percentile = |p: &str| {
        out.lines()
            .find(|l| l.contains(&format!("percentile {p} =")))
            .and_then(|l| l.rsplit('=').next())
            .and_then(|v| v.trim().parse::<f64>().ok())
            .with_context(|| format!("sockperf printed no {p} percentile: {out}"))
    };
    Ok((percentile("50.000")?, percentile("99.000")?))
}

/// New connections per second: connect, one byte there and back, close.
fn connrate(s: &scenario::Scenario, seconds: u32) -> anyhow::Result<f64> {
    let out = client(
        s,
        &[
            &scenario::loadgen()?,
            "connrate",
            &format!("127.0.0.1:{}", s.ports.echo),
            &seconds.to_string(),
            &CONNRATE_PARALLEL.to_string(),
        ],
        seconds,
    )?;
    let json: serde_json::Value = serde_json::from_str(&out).context("loadgen printed no JSON")?;
    json["per_second"]
        .as_f64()
        .context("loadgen report has no rate")
}

/// The relays' memory per 1,000 idle streams, in KiB (None when nothing relays): the growth
/// of their proportional set size while `n` established, idle connections go through them.
fn idle_memory(s: &scenario::Scenario, n: usize) -> anyhow::Result<Option<f64>> {
    if !s.has_relay() {
        return Ok(None);
    }
    let before = s.relay_pss_kib();
    let mut hold = Proc::spawn(
        &s.client_ns,
        s.client_cgroup.as_ref(),
        &[
            &scenario::loadgen()?,
            "hold",
            &format!("127.0.0.1:{}", s.ports.echo),
            &n.to_string(),
        ],
    )?;
    hold.wait_for_stderr("ready")?;
    // Let the relays finish their side of the last connections.
    std::thread::sleep(Duration::from_millis(500));
    let after = s.relay_pss_kib();
    drop(hold);
    // Let the relays notice the closes before the next scenario is measured.
    std::thread::sleep(Duration::from_millis(500));
    Ok(Some(
        (after.saturating_sub(before)) as f64 * 1000.0 / n as f64,
    ))
}
