//! `bench`: measures skiff against direct loopback and other relays on this machine, in one
//! run, and reports every figure as a ratio to the direct baseline measured in the same run.
//!
//! Method: every scenario is set up once; runs are interleaved (A B C A B C ...) so that drift
//! in the machine's state affects all scenarios alike; each figure is the median of the runs,
//! with min and max. Throughput comes from iperf3 (one TCP stream), CPU cost from the relaying
//! processes' user + system time per Gbit moved. Nothing here is a pass/fail threshold.

mod connect;
mod report;
mod scenario;

use std::{path::PathBuf, time::Duration};

use anyhow::Context as _;
use clap::Parser;
use kernel_tests::Proc;

/// Benchmarks skiff against direct loopback and other relays.
#[derive(Debug, Parser)]
#[command(name = "bench")]
struct Args {
    /// Scenarios to run (default: all). Known: direct, socat, skiff-hop, skiff-hop-accel, skiff-mtls.
    scenarios: Vec<String>,
    /// Runs per scenario.
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Seconds per iperf3 run.
    #[arg(long, default_value_t = 5)]
    seconds: u32,
    /// Three runs of two seconds: under two minutes for every scenario.
    #[arg(long)]
    quick: bool,
    /// One run of one second: proves the harness works, measures nothing worth reading.
    #[arg(long)]
    smoke: bool,
    /// Also measure connect() latency with namespace isolation (1,000 protected listeners).
    #[arg(long)]
    connect_latency: bool,
    /// Where to write results.json, results.md and throughput.svg.
    #[arg(long, default_value = "bench/results/latest")]
    out: PathBuf,
}

fn main() -> anyhow::Result<()> {
    let mut args = Args::parse();
    if args.quick {
        (args.runs, args.seconds) = (3, 2);
    }
    if args.smoke {
        (args.runs, args.seconds) = (1, 1);
    }
    let names: Vec<String> = if args.scenarios.is_empty() {
        scenario::ALL.iter().map(|s| (*s).to_owned()).collect()
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
        .map(|(i, name)| scenario::build(name, 240 + u8::try_from(i).unwrap_or(0)))
        .collect::<anyhow::Result<Vec<_>>>()?;

    let jiffies_before = report::cpu_jiffies();
    let mut samples: Vec<Vec<report::Sample>> = vec![Vec::new(); scenarios.len()];
    for run in 1..=args.runs {
        for (i, s) in scenarios.iter().enumerate() {
            let sample =
                measure(s, args.seconds).with_context(|| format!("scenario {}", s.name))?;
            eprintln!(
                "bench: run {run}/{} {:<16} {:>7.2} Gbit/s",
                args.runs, s.name, sample.gbps
            );
            samples[i].push(sample);
        }
    }

    let steal = report::steal_percent(jiffies_before, report::cpu_jiffies());
    if steal > 5.0 {
        eprintln!(
            "bench: warning: the hypervisor stole {steal:.0}% of CPU time during the run; absolute figures are unreliable"
        );
    }
    let report = report::Report::new(&scenarios, &samples, args.runs, args.seconds, steal);
    // Free the scenarios' namespaces and routers before the next measurement.
    drop(scenarios);
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("failed to create {}", args.out.display()))?;
    report.write(&args.out)?;
    let mut md = report.markdown();
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

/// One iperf3 run through `s`, with the relays' CPU time over the same interval.
fn measure(s: &scenario::Scenario, seconds: u32) -> anyhow::Result<report::Sample> {
    let (host, port) = &s.target;
    let cpu_before = s.relay_cpu_seconds();
    let client = Proc::spawn(
        &s.client_ns,
        s.client_cgroup.as_ref(),
        &[
            "iperf3",
            "-c",
            host,
            "-p",
            &port.to_string(),
            "-t",
            &seconds.to_string(),
            "-J",
        ],
    )?;
    let out = client.wait(Duration::from_secs(u64::from(seconds) + 30))?;
    let cpu = s.relay_cpu_seconds() - cpu_before;
    let json: serde_json::Value = serde_json::from_str(&out).context("iperf3 printed no JSON")?;
    let bps = json["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .context("iperf3 report has no received rate")?;
    let bytes = json["end"]["sum_received"]["bytes"].as_f64().unwrap_or(0.0);
    let gbit = bytes * 8.0 / 1e9;
    Ok(report::Sample {
        gbps: bps / 1e9,
        cpu_per_gbit: if gbit > 0.0 { cpu / gbit } else { 0.0 },
    })
}
