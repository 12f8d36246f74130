//! connect() latency with namespace isolation: the cost the cgroup connect hooks add, with
//! 1,000 protected listeners registered (map lookups, no scans), against the same connects
//! from a process the hooks do not see.

use std::{fmt::Write as _, time::Duration};

use kernel_tests::{Cgroup, Netns, Proc, TempFile, skiff::Site};

/// Protected listeners registered besides the measured one.
const LISTENERS: u16 = 1_000;
const MEASURED_PORT: u16 = 12_000;

/// One timing run: p50, p99, mean in µs.
fn time_connects(ns: &Netns, cgroup: &Cgroup, n: usize) -> anyhow::Result<(f64, f64, f64)> {
    let addr = format!("127.0.0.1:{MEASURED_PORT}");
    let out = Proc::spawn(
        ns,
        Some(cgroup),
        &[
            &crate::scenario::loadgen()?,
            "connects",
            &addr,
            &n.to_string(),
        ],
    )?
    .wait(Duration::from_secs(120))?;
    let v: serde_json::Value = serde_json::from_str(&out)?;
    let f = |k: &str| v[k].as_f64().unwrap_or(f64::NAN);
    Ok((f("p50_us"), f("p99_us"), f("mean_us")))
}

/// Runs the measurement and returns a Markdown section.
pub fn run(runs: usize, connects: usize) -> anyhow::Result<String> {
    let ns = Netns::new("bconn")?;
    let parent = Cgroup::new("bconn")?;
    let team = parent.child("team")?;
    // A sibling outside the hooked subtree: same netns, no hooks.
    let outside = Cgroup::new("bconnout")?;
    let spec = format!("team={}", team.path().display());
    let site = Site::start_with(
        &ns,
        Some(&parent),
        "west",
        None,
        &["--namespace", &spec, "--isolate-namespaces"],
        &[],
    )?;

    let yaml = TempFile::new("listeners.yaml");
    let mut text = String::new();
    for i in 0..=LISTENERS {
        let port = MEASURED_PORT - LISTENERS + i;
        let _ = write!(
            text,
            "apiVersion: skiff.io/v1alpha1\nkind: Listener\nmetadata: {{name: l{port}}}\nspec: {{host: 127.0.0.1, port: {port}, namespace: team}}\n---\n"
        );
    }
    std::fs::write(yaml.path(), text)?;
    site.cli(&["apply", "-f", yaml.arg()])?;
    ns.wait_listening(MEASURED_PORT, Duration::from_secs(30))?;

    let (mut hooked, mut plain) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        hooked.push(time_connects(&ns, &team, connects)?);
        plain.push(time_connects(&ns, &outside, connects)?);
    }
    let median = |v: &[(f64, f64, f64)], pick: fn(&(f64, f64, f64)) -> f64| {
        let mut xs: Vec<f64> = v.iter().map(pick).collect();
        xs.sort_by(f64::total_cmp);
        xs[xs.len() / 2]
    };
    let (h50, h99) = (median(&hooked, |t| t.0), median(&hooked, |t| t.1));
    let (p50, p99) = (median(&plain, |t| t.0), median(&plain, |t| t.1));
    drop(site);
    drop(team);
    Ok(format!(
        "\nconnect() latency, {connects} connects x {runs} runs, {} protected listeners (median of runs):\n\n| caller | p50 µs | p99 µs |\n|---|---|---|\n| outside the hooked cgroup (no hooks) | {p50:.2} | {p99:.2} |\n| in an allowed namespace (hooks, lookups, ancestor walk) | {h50:.2} | {h99:.2} |\n| added by the hooks | {:+.2} | {:+.2} |\n",
        LISTENERS + 1,
        h50 - p50,
        h99 - p99
    ))
}
