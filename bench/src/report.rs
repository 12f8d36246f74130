//! Statistics and the three outputs: JSON (for machines), Markdown (for people), SVG (a chart).

use std::{fmt::Write as _, path::Path};

use serde::Serialize;

use crate::scenario::Scenario;

/// One measured run of every client through one scenario.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Sample {
    /// Which of the interleaved runs it is (from 1): run i of every scenario was measured in
    /// the same pass, minutes apart at most, which makes per-run ratios the fairest
    /// comparison on a machine whose speed drifts.
    pub run: usize,
    /// iperf3, one stream.
    pub gbps: f64,
    /// CPU seconds of the relaying processes per Gbit moved in the one-stream run (0 for the
    /// direct path).
    pub cpu_per_gbit: f64,
    /// iperf3 with [`crate::PARALLEL`] streams.
    pub gbps_parallel: f64,
    /// 100 connections sending at once (`loadgen flood`, with `--streams`), the aggregate
    /// the server counted.
    pub gbps_100: Option<f64>,
    /// CPU seconds of the relaying processes per Gbit in the 100-connection run.
    pub cpu_per_gbit_100: Option<f64>,
    /// The same with 1,000 connections.
    pub gbps_1000: Option<f64>,
    /// sockperf ping-pong round trip.
    pub rtt_p50_us: f64,
    pub rtt_p99_us: f64,
    /// New connections per second (connect, one byte there and back, close).
    pub conns_per_s: f64,
    /// Share of the one-stream run's bytes that took a shortcut past the router (accelerated
    /// scenarios only).
    pub shortcut_share: Option<f64>,
}

/// Median, min and max of one figure.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Spread {
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

impl Spread {
    fn of(mut values: Vec<f64>) -> Self {
        values.sort_by(f64::total_cmp);
        let n = values.len();
        let median = if n == 0 {
            0.0
        } else if n % 2 == 1 {
            values[n / 2]
        } else {
            (values[n / 2 - 1] + values[n / 2]) / 2.0
        };
        Self {
            median,
            min: values.first().copied().unwrap_or(0.0),
            max: values.last().copied().unwrap_or(0.0),
        }
    }
}

/// One-stream throughput of `a` over `b` in each run both measured (a failed run leaves a
/// gap), as a spread; `None` when they share no run.
fn per_run(a: &[Sample], b: &[Sample]) -> Option<Spread> {
    let ratios: Vec<f64> = a
        .iter()
        .filter_map(|x| {
            let y = b.iter().find(|y| y.run == x.run)?;
            (y.gbps > 0.0).then(|| x.gbps / y.gbps)
        })
        .collect();
    (!ratios.is_empty()).then(|| Spread::of(ratios))
}

/// One scenario's results. Every `*_vs_direct` is this scenario's median over the direct
/// baseline's median of the same run.
#[derive(Debug, Serialize)]
pub struct Row {
    pub scenario: String,
    pub description: String,
    pub throughput_gbps: Spread,
    pub throughput_vs_direct: f64,
    pub parallel_gbps: Spread,
    pub parallel_vs_direct: f64,
    pub relay_cpu_seconds_per_gbit: Spread,
    /// Aggregate of 100 and of 1,000 connections sending at once (with `--streams`).
    pub streams_100_gbps: Option<Spread>,
    pub streams_1000_gbps: Option<Spread>,
    /// Relay CPU seconds per Gbit with 100 connections.
    pub relay_cpu_seconds_per_gbit_100: Option<Spread>,
    pub rtt_p50_us: Spread,
    /// Round trip added to direct loopback's, at the median.
    pub rtt_p50_added_us: f64,
    pub rtt_p50_vs_direct: f64,
    pub rtt_p99_us: Spread,
    pub conns_per_second: Spread,
    pub conns_vs_direct: f64,
    /// Growth of the relays' proportional set size per 1,000 idle streams, KiB.
    pub kib_per_1000_idle_streams: Option<f64>,
    /// Share of the one-stream bytes that took a shortcut past the router, where accelerated.
    pub shortcut_share: Option<Spread>,
    /// Runs in which a client failed (left out of the figures), with the reason.
    pub failed_runs: Vec<String>,
    pub samples: Vec<Sample>,
}

/// Picks a figure and its ratio to direct from a row, for a chart.
type Pick = fn(&Row) -> (Spread, f64);

/// A whole run.
#[derive(Debug, Serialize)]
pub struct Report {
    pub machine: String,
    /// Share of CPU time the hypervisor took from this machine during the run (steal, from
    /// /proc/stat). Above a few percent, absolute figures are unreliable; ratios less so.
    pub steal_percent: f64,
    pub runs: usize,
    pub seconds_per_run: u32,
    pub rows: Vec<Row>,
}

fn ratio(a: f64, b: f64) -> f64 {
    if b > 0.0 { a / b } else { 0.0 }
}

impl Report {
    pub fn new(
        scenarios: &[Scenario],
        samples: &[Vec<Sample>],
        memory: &[Option<f64>],
        failures: &[Vec<String>],
        runs: usize,
        seconds: u32,
        steal_percent: f64,
    ) -> Self {
        let spread =
            |i: usize, f: fn(&Sample) -> f64| Spread::of(samples[i].iter().map(f).collect());
        let some_spread = |i: usize, f: fn(&Sample) -> Option<f64>| {
            let values: Vec<f64> = samples[i].iter().filter_map(f).collect();
            (!values.is_empty()).then(|| Spread::of(values))
        };
        let direct = scenarios.iter().position(|s| s.name == "direct");
        let base = |f: fn(&Sample) -> f64| direct.map_or(0.0, |i| spread(i, f).median);
        let (gbps, par, p50, conns) = (
            base(|x| x.gbps),
            base(|x| x.gbps_parallel),
            base(|x| x.rtt_p50_us),
            base(|x| x.conns_per_s),
        );
        let rows = scenarios
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let throughput = spread(i, |x| x.gbps);
                let parallel = spread(i, |x| x.gbps_parallel);
                let rtt = spread(i, |x| x.rtt_p50_us);
                let conns_per_second = spread(i, |x| x.conns_per_s);
                Row {
                    scenario: s.name.to_owned(),
                    description: s.description.to_owned(),
                    throughput_gbps: throughput,
                    throughput_vs_direct: ratio(throughput.median, gbps),
                    parallel_gbps: parallel,
                    parallel_vs_direct: ratio(parallel.median, par),
                    relay_cpu_seconds_per_gbit: spread(i, |x| x.cpu_per_gbit),
                    streams_100_gbps: some_spread(i, |x| x.gbps_100),
                    streams_1000_gbps: some_spread(i, |x| x.gbps_1000),
                    relay_cpu_seconds_per_gbit_100: some_spread(i, |x| x.cpu_per_gbit_100),
                    rtt_p50_us: rtt,
                    rtt_p50_added_us: rtt.median - p50,
                    rtt_p50_vs_direct: ratio(rtt.median, p50),
                    rtt_p99_us: spread(i, |x| x.rtt_p99_us),
                    conns_per_second,
                    conns_vs_direct: ratio(conns_per_second.median, conns),
                    kib_per_1000_idle_streams: memory.get(i).copied().flatten(),
                    shortcut_share: {
                        let shares: Vec<f64> =
                            samples[i].iter().filter_map(|x| x.shortcut_share).collect();
                        (!shares.is_empty()).then(|| Spread::of(shares))
                    },
                    failed_runs: failures.get(i).cloned().unwrap_or_default(),
                    samples: samples[i].clone(),
                }
            })
            .collect();
        Self {
            machine: machine(),
            steal_percent,
            runs,
            seconds_per_run: seconds,
            rows,
        }
    }

    /// The row of scenario `name`, if it ran and at least one run succeeded.
    fn measured(&self, name: &str) -> Option<&Row> {
        self.rows
            .iter()
            .find(|r| r.scenario == name && !r.samples.is_empty())
    }

    pub fn markdown(&self) -> String {
        let mut md = format!(
            "Machine: {}. {} interleaved runs of {} s per client and scenario; median (min-max). CPU steal during the run: {:.1}%.\n\n",
            self.machine, self.runs, self.seconds_per_run, self.steal_percent
        );
        let _ = writeln!(
            md,
            "Throughput (iperf3):\n\n| scenario | 1 stream Gbit/s | vs direct | {p} streams Gbit/s | vs direct | relay CPU s/Gbit |\n|---|---|---|---|---|---|",
            p = crate::PARALLEL
        );
        let cell = |s: Spread, digits: usize| {
            format!(
                "{:.digits$} ({:.digits$}-{:.digits$})",
                s.median, s.min, s.max
            )
        };
        for r in &self.rows {
            if r.samples.is_empty() {
                let _ = writeln!(md, "| {} | every run failed (below) | | | | |", r.scenario);
                continue;
            }
            let _ = writeln!(
                md,
                "| {} | {} | {:.0}% | {} | {:.0}% | {:.3} |",
                r.scenario,
                cell(r.throughput_gbps, 2),
                r.throughput_vs_direct * 100.0,
                cell(r.parallel_gbps, 2),
                r.parallel_vs_direct * 100.0,
                r.relay_cpu_seconds_per_gbit.median,
            );
        }
        if self.rows.iter().any(|r| r.streams_100_gbps.is_some()) {
            md.push_str("\nMany streams at once (`loadgen flood`: each connection sends as fast as it can; the aggregate the server counted):\n\n| scenario | 100 streams Gbit/s | relay CPU s/Gbit | 1,000 streams Gbit/s |\n|---|---|---|---|\n");
            for r in &self.rows {
                let (Some(s100), Some(cpu), Some(s1000)) = (
                    r.streams_100_gbps,
                    r.relay_cpu_seconds_per_gbit_100,
                    r.streams_1000_gbps,
                ) else {
                    let _ = writeln!(md, "| {} | every run failed (below) | | |", r.scenario);
                    continue;
                };
                let _ = writeln!(
                    md,
                    "| {} | {} | {:.3} | {} |",
                    r.scenario,
                    cell(s100, 2),
                    cpu.median,
                    cell(s1000, 2),
                );
            }
        }
        md.push_str("\nLatency (sockperf ping-pong round trip), new connections, idle memory:\n\n| scenario | RTT p50 µs | added p50 µs | RTT p99 µs | new conn/s | vs direct | relay KiB per 1,000 idle streams |\n|---|---|---|---|---|---|---|\n");
        for r in &self.rows {
            if r.samples.is_empty() {
                let _ = writeln!(
                    md,
                    "| {} | every run failed (below) | | | | | |",
                    r.scenario
                );
                continue;
            }
            let _ = writeln!(
                md,
                "| {} | {} | {:+.1} | {} | {} | {:.0}% | {} |",
                r.scenario,
                cell(r.rtt_p50_us, 1),
                r.rtt_p50_added_us,
                cell(r.rtt_p99_us, 1),
                cell(r.conns_per_second, 0),
                r.conns_vs_direct * 100.0,
                r.kib_per_1000_idle_streams
                    .map_or_else(|| "-".to_owned(), |k| format!("{k:.0}")),
            );
        }
        let goals = self.goals();
        if !goals.is_empty() {
            md.push_str("\nGoals (issues 3, 4, 7), from this run:\n\n| goal | measured | met |\n|---|---|---|\n");
            for (goal, measured, met) in goals {
                let _ = writeln!(
                    md,
                    "| {goal} | {measured} | {} |",
                    if met { "yes" } else { "no" }
                );
            }
        }
        if let Some(chain) = ["skiff-chain", "skiff-chain-uring"]
            .into_iter()
            .filter_map(|name| self.measured(name))
            .max_by(|a, b| {
                a.throughput_gbps
                    .median
                    .total_cmp(&b.throughput_gbps.median)
            })
        {
            let _ = write!(
                md,
                "\nBound for the mTLS path: {}, the same three TCP legs and two routers with no TLS, \
                 made {:.0}% of direct",
                chain.scenario,
                chain.throughput_vs_direct * 100.0
            );
            for name in ["skiff-mtls", "skiff-mtls-uring"] {
                if let Some(mtls) = self.measured(name) {
                    let _ = write!(
                        md,
                        "; {name} made {:.0}% of it",
                        mtls.throughput_gbps.median / chain.throughput_gbps.median * 100.0
                    );
                }
            }
            md.push_str(".\n");
        }
        if let (Some(ceiling), Some(accel), Some(hop)) = (
            self.measured("direct-sockmap"),
            self.measured("skiff-hop-accel"),
            self.measured("skiff-hop"),
        ) {
            let _ = writeln!(
                md,
                "\nCeiling for the accelerated hop: direct-sockmap, client and server redirected \
                 into each other with no relay, made {:.0}% of direct and {:.2}x skiff-hop; \
                 skiff-hop-accel made {:.0}% of direct-sockmap.",
                ceiling.throughput_vs_direct * 100.0,
                ceiling.throughput_gbps.median / hop.throughput_gbps.median,
                accel.throughput_gbps.median / ceiling.throughput_gbps.median * 100.0
            );
            if let (Some(of_ceiling), Some(ceiling_over_hop)) = (
                per_run(&accel.samples, &ceiling.samples),
                per_run(&ceiling.samples, &hop.samples),
            ) {
                let _ = writeln!(
                    md,
                    "\nRun for run (each run's ratio, then their median and spread): \
                     skiff-hop-accel made {:.0}% ({:.0}-{:.0}%) of direct-sockmap; direct-sockmap \
                     made {:.2}x ({:.2}-{:.2}x) skiff-hop.",
                    of_ceiling.median * 100.0,
                    of_ceiling.min * 100.0,
                    of_ceiling.max * 100.0,
                    ceiling_over_hop.median,
                    ceiling_over_hop.min,
                    ceiling_over_hop.max
                );
            }
        }
        for r in self.rows.iter().filter(|r| !r.samples.is_empty()) {
            if let Some(share) = r.shortcut_share {
                let _ = writeln!(
                    md,
                    "\n{}: {:.0}% ({:.0}-{:.0}%) of the one-stream bytes took the shortcut past \
                     the router (`skiff status`, accel.bytesShortcut).",
                    r.scenario,
                    share.median * 100.0,
                    share.min * 100.0,
                    share.max * 100.0
                );
            }
        }
        let failed: Vec<&Row> = self
            .rows
            .iter()
            .filter(|r| !r.failed_runs.is_empty())
            .collect();
        if !failed.is_empty() {
            md.push_str("\nFailed runs (left out of the figures above):\n\n");
            for r in failed {
                for f in &r.failed_runs {
                    let _ = writeln!(md, "- {}: {f}", r.scenario);
                }
            }
        }
        md.push_str("\nPaths:\n\n| scenario | path |\n|---|---|\n");
        for r in &self.rows {
            let _ = writeln!(md, "| {} | {} |", r.scenario, r.description);
        }
        md
    }

    /// The product's performance goals, each with what this run measured. Only goals whose
    /// scenarios ran are listed.
    fn goals(&self) -> Vec<(&'static str, String, bool)> {
        let mut goals = Vec::new();
        let mut at_least = |goal, value: Option<f64>, target: f64, unit: &str| {
            if let Some(v) = value {
                goals.push((goal, format!("{:.0}{unit}", v * 100.0), v >= target));
            }
        };
        let vs = |name: &str| self.measured(name).map(|r| r.throughput_vs_direct);
        at_least("one plain hop >= 75% of direct", vs("skiff-hop"), 0.75, "%");
        at_least(
            "one plain hop on io_uring >= 80% of direct",
            vs("skiff-hop-uring"),
            0.8,
            "%",
        );
        at_least(
            "one hop with acceleration >= 100% of direct",
            vs("skiff-hop-accel"),
            1.0,
            "%",
        );
        at_least("mTLS path >= 60% of direct", vs("skiff-mtls"), 0.6, "%");
        let over = |a: &str, b: &str| {
            Some(
                self.measured(a)?.throughput_gbps.median / self.measured(b)?.throughput_gbps.median,
            )
        };
        at_least(
            "mTLS path >= 1.5x a stunnel pair",
            over("skiff-mtls", "stunnel"),
            1.5,
            "% of stunnel",
        );
        at_least(
            "acceleration >= 1.7x the same hop without",
            over("skiff-hop-accel", "skiff-hop"),
            1.7,
            "% of skiff-hop",
        );
        at_least(
            "new connections/s through the router >= 25% of direct",
            self.measured("skiff-hop").map(|r| r.conns_vs_direct),
            0.25,
            "%",
        );
        for name in ["skiff-hop", "skiff-hop-uring", "skiff-mtls"] {
            if let Some(r) = self.measured(name)
                && let (Some(s100), Some(s1000)) = (r.streams_100_gbps, r.streams_1000_gbps)
            {
                let one = r.throughput_gbps.median;
                let least = r.parallel_gbps.median.min(s100.median).min(s1000.median);
                goals.push((
                    match name {
                        "skiff-hop" => "skiff-hop: 4, 100 and 1,000 streams make at least one stream's figure",
                        "skiff-hop-uring" => "skiff-hop-uring: 4, 100 and 1,000 streams make at least one stream's figure",
                        _ => "skiff-mtls: 4, 100 and 1,000 streams make at least one stream's figure",
                    },
                    format!("least {least:.2} vs {one:.2} Gbit/s"),
                    least >= one,
                ));
            }
        }
        if let (Some(Some(u)), Some(Some(e))) = (
            self.measured("skiff-hop-uring")
                .map(|r| r.relay_cpu_seconds_per_gbit_100),
            self.measured("skiff-hop")
                .map(|r| r.relay_cpu_seconds_per_gbit_100),
        ) {
            let (u, e) = (u.median, e.median);
            goals.push((
                "io_uring hop: at least 1.3x less router CPU per Gbit than epoll at 100 streams",
                format!("epoll / uring = {:.2} ({u:.3} vs {e:.3} CPU-s/Gbit)", e / u),
                u > 0.0 && e / u >= 1.3,
            ));
        }
        if let (Some(uring), Some(epoll)) =
            (self.measured("skiff-hop-uring"), self.measured("skiff-hop"))
        {
            let (u, e) = (
                uring.relay_cpu_seconds_per_gbit.median,
                epoll.relay_cpu_seconds_per_gbit.median,
            );
            goals.push((
                "io_uring hop: router CPU per Gbit no worse than the epoll hop's",
                format!("{u:.3} vs {e:.3} CPU-s/Gbit"),
                u <= e,
            ));
        }
        if let (Some(hop), Some(direct)) =
            (self.measured("skiff-hop-accel"), self.measured("direct"))
        {
            goals.push((
                "accelerated hop adds no more p50 RTT than direct loopback has",
                format!(
                    "+{:.1} µs vs {:.1} µs",
                    hop.rtt_p50_added_us, direct.rtt_p50_us.median
                ),
                hop.rtt_p50_added_us <= direct.rtt_p50_us.median,
            ));
        }
        goals
    }

    /// Two bar charts, one above the other: single-stream throughput and p50 round trip, each
    /// median with a min-max whisker and the ratio to direct.
    pub fn svg(&self) -> String {
        let (bar_h, gap) = (20.0, 8.0);
        let panel_h = 34.0 + self.rows.len() as f64 * (bar_h + gap);
        let mut svg = format!(
            "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"780\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n",
            h = 2.0 * panel_h + 10.0
        );
        let panels: [(&str, Pick, &str); 2] = [
            (
                "iperf3 one stream, Gbit/s (median, min-max; % of direct)",
                |r| (r.throughput_gbps, r.throughput_vs_direct),
                "#4a7fb5",
            ),
            (
                "sockperf round trip p50, µs (median, min-max; % of direct)",
                |r| (r.rtt_p50_us, r.rtt_p50_vs_direct),
                "#c0793a",
            ),
        ];
        for (p, (title, pick, colour)) in panels.into_iter().enumerate() {
            let top = p as f64 * panel_h;
            let (left, width) = (150.0, 520.0);
            let max = self
                .rows
                .iter()
                .map(|r| pick(r).0.max)
                .fold(1e-9_f64, f64::max);
            let _ = writeln!(svg, "<text x=\"10\" y=\"{}\">{title}</text>", top + 18.0);
            for (i, r) in self.rows.iter().enumerate() {
                let (s, vs) = pick(r);
                let label = if r.samples.is_empty() {
                    "every run failed".to_owned()
                } else {
                    format!("{:.2} ({:.0}%)", s.median, vs * 100.0)
                };
                let y = top + 28.0 + i as f64 * (bar_h + gap);
                let scale = |v: f64| v / max * width;
                let _ = writeln!(
                    svg,
                    "<text x=\"10\" y=\"{ty}\">{name}</text><rect x=\"{left}\" y=\"{y}\" width=\"{bw:.1}\" height=\"{bar_h}\" fill=\"{colour}\"/><line x1=\"{x1:.1}\" x2=\"{x2:.1}\" y1=\"{my}\" y2=\"{my}\" stroke=\"black\"/><text x=\"{lx:.1}\" y=\"{ty}\">{label}</text>",
                    ty = y + 14.0,
                    name = r.scenario,
                    bw = scale(s.median),
                    x1 = left + scale(s.min),
                    x2 = left + scale(s.max),
                    my = y + bar_h / 2.0,
                    lx = left + scale(s.max) + 6.0,
                );
            }
        }
        svg.push_str("</svg>\n");
        svg
    }

    pub fn write(&self, dir: &Path) -> anyhow::Result<()> {
        std::fs::write(dir.join("results.json"), serde_json::to_vec_pretty(self)?)?;
        std::fs::write(dir.join("results.md"), self.markdown())?;
        std::fs::write(dir.join("chart.svg"), self.svg())?;
        Ok(())
    }
}

/// Total and steal jiffies of all CPUs, from the first line of /proc/stat.
#[must_use]
pub fn cpu_jiffies() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let fields: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal ...
    let total = fields.iter().take(8).sum();
    (total, fields.get(7).copied().unwrap_or(0))
}

/// Steal as a percentage of all CPU time between two [`cpu_jiffies`] readings.
#[must_use]
pub fn steal_percent(before: (u64, u64), after: (u64, u64)) -> f64 {
    let total = after.0.saturating_sub(before.0);
    let steal = after.1.saturating_sub(before.1);
    if total == 0 {
        0.0
    } else {
        steal as f64 * 100.0 / total as f64
    }
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".to_owned());
    let cores = std::thread::available_parallelism().map_or(0, std::num::NonZero::get);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!("{cores} cores, {cpu}, kernel {}", kernel.trim())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_run_ratios_pair_runs_by_number_and_skip_failed_ones() {
        let sample = |run, gbps| Sample {
            run,
            gbps,
            cpu_per_gbit: 0.0,
            gbps_parallel: 0.0,
            gbps_100: None,
            cpu_per_gbit_100: None,
            gbps_1000: None,
            rtt_p50_us: 0.0,
            rtt_p99_us: 0.0,
            conns_per_s: 0.0,
            shortcut_share: None,
        };
        // Run 2 of `b` failed: `a`'s run 3 pairs with `b`'s run 3, not with its second sample.
        let a = [sample(1, 10.0), sample(2, 30.0), sample(3, 12.0)];
        let b = [sample(1, 20.0), sample(3, 8.0)];
        let spread = per_run(&a, &b).expect("two runs in common");
        assert_eq!((spread.min, spread.max, spread.median), (0.5, 1.5, 1.0));
        assert!(per_run(&a[1..2], &b).is_none());
    }

    #[test]
    fn spread_takes_the_median_of_odd_and_even_counts() {
        let odd = Spread::of(vec![3.0, 1.0, 2.0]);
        assert_eq!((odd.median, odd.min, odd.max), (2.0, 1.0, 3.0));
        let even = Spread::of(vec![4.0, 1.0, 2.0, 3.0]);
        assert_eq!(even.median, 2.5);
    }
}
