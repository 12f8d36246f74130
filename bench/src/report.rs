//! Statistics and the three outputs: JSON (for machines), Markdown (for people), SVG (a chart).

use std::{fmt::Write as _, path::Path};

use serde::Serialize;

use crate::scenario::Scenario;

/// One measured run.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Sample {
    pub gbps: f64,
    /// CPU seconds of the relaying processes per Gbit moved (0 for the direct path).
    pub cpu_per_gbit: f64,
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

/// One scenario's results.
#[derive(Debug, Serialize)]
pub struct Row {
    pub scenario: String,
    pub description: String,
    pub throughput_gbps: Spread,
    /// Median throughput over the direct baseline's median, same run.
    pub ratio_to_direct: f64,
    pub relay_cpu_seconds_per_gbit: Spread,
    pub samples: Vec<Sample>,
}

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

impl Report {
    pub fn new(
        scenarios: &[Scenario],
        samples: &[Vec<Sample>],
        runs: usize,
        seconds: u32,
        steal_percent: f64,
    ) -> Self {
        let spreads: Vec<Spread> = samples
            .iter()
            .map(|s| Spread::of(s.iter().map(|x| x.gbps).collect()))
            .collect();
        let direct = scenarios
            .iter()
            .position(|s| s.name == "direct")
            .map_or(1.0, |i| spreads[i].median);
        let rows = scenarios
            .iter()
            .zip(samples)
            .zip(&spreads)
            .map(|((s, samples), spread)| Row {
                scenario: s.name.to_owned(),
                description: s.description.to_owned(),
                throughput_gbps: *spread,
                ratio_to_direct: if direct > 0.0 {
                    spread.median / direct
                } else {
                    0.0
                },
                relay_cpu_seconds_per_gbit: Spread::of(
                    samples.iter().map(|x| x.cpu_per_gbit).collect(),
                ),
                samples: samples.clone(),
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

    pub fn markdown(&self) -> String {
        let mut md = format!(
            "Machine: {}. {} interleaved runs of {} s per scenario, iperf3 single stream; median (min-max). CPU steal during the run: {:.1}%.\n\n",
            self.machine, self.runs, self.seconds_per_run, self.steal_percent
        );
        md.push_str("| scenario | throughput Gbit/s | vs direct | relay CPU s/Gbit | path |\n|---|---|---|---|---|\n");
        for r in &self.rows {
            let t = r.throughput_gbps;
            let c = r.relay_cpu_seconds_per_gbit;
            let _ = writeln!(
                md,
                "| {} | {:.2} ({:.2}-{:.2}) | {:.0}% | {:.3} | {} |",
                r.scenario,
                t.median,
                t.min,
                t.max,
                r.ratio_to_direct * 100.0,
                c.median,
                r.description
            );
        }
        md
    }

    /// A horizontal bar chart of median throughput, with min-max whiskers.
    pub fn svg(&self) -> String {
        let (left, bar_h, gap, width) = (150.0, 22.0, 10.0, 520.0);
        let max = self
            .rows
            .iter()
            .map(|r| r.throughput_gbps.max)
            .fold(1.0_f64, f64::max);
        let height = 40.0 + self.rows.len() as f64 * (bar_h + gap);
        let mut svg = format!(
            "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{height}\" font-family=\"sans-serif\" font-size=\"12\">\n<text x=\"10\" y=\"18\">iperf3 throughput, Gbit/s (median, min-max)</text>\n",
            w = left + width + 80.0
        );
        for (i, r) in self.rows.iter().enumerate() {
            let y = 30.0 + i as f64 * (bar_h + gap);
            let scale = |v: f64| v / max * width;
            let t = r.throughput_gbps;
            let _ = writeln!(
                svg,
                "<text x=\"10\" y=\"{ty}\">{name}</text><rect x=\"{left}\" y=\"{y}\" width=\"{bw:.1}\" height=\"{bar_h}\" fill=\"#4a7fb5\"/><line x1=\"{x1:.1}\" x2=\"{x2:.1}\" y1=\"{my}\" y2=\"{my}\" stroke=\"black\"/><text x=\"{lx:.1}\" y=\"{ty}\">{m:.2} ({p:.0}%)</text>",
                ty = y + 15.0,
                name = r.scenario,
                bw = scale(t.median),
                x1 = left + scale(t.min),
                x2 = left + scale(t.max),
                my = y + bar_h / 2.0,
                lx = left + scale(t.max) + 6.0,
                m = t.median,
                p = r.ratio_to_direct * 100.0,
            );
        }
        svg.push_str("</svg>\n");
        svg
    }

    pub fn write(&self, dir: &Path) -> anyhow::Result<()> {
        std::fs::write(dir.join("results.json"), serde_json::to_vec_pretty(self)?)?;
        std::fs::write(dir.join("results.md"), self.markdown())?;
        std::fs::write(dir.join("throughput.svg"), self.svg())?;
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
    fn spread_takes_the_median_of_odd_and_even_counts() {
        let odd = Spread::of(vec![3.0, 1.0, 2.0]);
        assert_eq!((odd.median, odd.min, odd.max), (2.0, 1.0, 3.0));
        let even = Spread::of(vec![4.0, 1.0, 2.0, 3.0]);
        assert_eq!(even.median, 2.5);
    }
}
