//! The build, lint, test and demo tasks, and the small process helpers they share.

use std::{
    io::{BufRead as _, BufReader},
    process::{Command, Stdio},
};

use anyhow::{Context as _, bail, ensure};

/// Tests counted over every `cargo test` run of one task, for one closing summary line.
#[derive(Debug, Default, Clone, Copy)]
pub struct Tally {
    pub passed: u64,
    pub failed: u64,
    pub ignored: u64,
}

impl Tally {
    /// Counts a libtest summary line; other lines are ignored.
    pub fn add(&mut self, line: &str) {
        // "test result: ok. 48 passed; 0 failed; 0 ignored; 0 measured; ..."
        let Some(rest) = line.trim().strip_prefix("test result: ") else {
            return;
        };
        for part in rest.split(';') {
            let mut words = part.split_whitespace().rev();
            let (Some(what), Some(n)) = (words.next(), words.next()) else {
                continue;
            };
            let Ok(n) = n.parse::<u64>() else { continue };
            match what {
                "passed" => self.passed += n,
                "failed" => self.failed += n,
                "ignored" => self.ignored += n,
                _ => {}
            }
        }
    }

    /// Prints the closing line CI reads.
    pub fn print(self) {
        println!(
            "skiff: {} passed, {} failed, {} skipped",
            self.passed, self.failed, self.ignored
        );
    }
}

/// Runs `cargo test ARGS`, echoing its output and counting its results into `tally`.
fn cargo_test(args: &[&str], extra: &[String], tally: &mut Tally) -> anyhow::Result<()> {
    cargo_test_with(&[], args, extra, tally)
}

/// [`cargo_test`] with `env` set for the tests.
fn cargo_test_with(
    env: &[(&str, &str)],
    args: &[&str],
    extra: &[String],
    tally: &mut Tally,
) -> anyhow::Result<()> {
    let mut cmd = cargo();
    cmd.arg("test").args(args);
    for (key, value) in env {
        cmd.env(key, value);
    }
    if !extra.is_empty() {
        cmd.arg("--").args(extra);
    }
    let shown = format!("{cmd:?}");
    let mut child = cmd
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("failed to start {shown}"))?;
    let stdout = child.stdout.take().context("no stdout")?;
    for line in BufReader::new(stdout).lines() {
        let line = line?;
        println!("{line}");
        tally.add(&line);
    }
    let st = child.wait()?;
    ensure!(st.success(), "{shown} failed with {st}");
    Ok(())
}

/// Runs `cmd`, streaming its output, and fails if it exits non-zero.
pub fn status(cmd: &mut Command) -> anyhow::Result<()> {
    let shown = format!("{cmd:?}");
    let st = cmd
        .status()
        .with_context(|| format!("failed to start {shown}"))?;
    ensure!(st.success(), "{shown} failed with {st}");
    Ok(())
}

/// Runs `cmd` and returns its stdout; fails if it exits non-zero.
pub fn output(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd
        .output()
        .with_context(|| format!("failed to start {cmd:?}"))?;
    ensure!(out.status.success(), "{cmd:?} failed with {}", out.status);
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The workspace's root directory (xtask's parent).
pub fn workspace_root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map_or_else(|| ".".into(), std::path::Path::to_path_buf)
}

pub fn cargo() -> Command {
    Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

pub fn build(release: bool) -> anyhow::Result<()> {
    let mut cmd = cargo();
    cmd.args(["build", "--package", "router"]);
    if release {
        cmd.arg("--release");
    }
    status(&mut cmd)
}

pub fn lint() -> anyhow::Result<()> {
    println!("lint: every test the docs name exists");
    crate::claims::check(&workspace_root())?;
    println!("lint: cargo fmt --check");
    status(cargo().args(["fmt", "--all", "--", "--check"]))?;
    println!("lint: cargo clippy, warnings denied");
    status(cargo().args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    println!("lint: Kubernetes manifests rendered and validated offline");
    crate::manifests::validate()
}

/// The benchmark harness's end-to-end test (bench/tests/smoke.rs), which needs root.
const BENCH_SMOKE: &str = "smoke_run_writes_results_for_every_requested_scenario";

pub fn unit_tests(tally: &mut Tally) -> anyhow::Result<()> {
    println!("test: unit and in-process integration tests");
    // The benchmark smoke test drives the real skiff binary and the loadgen helper.
    status(cargo().args(["build", "--package", "router", "--bin", "skiff"]))?;
    status(cargo().args(["build", "--package", "kernel-tests", "--bins"]))?;
    // The routers run on their default data path (io_uring where this kernel allows it) ...
    if is_root() {
        cargo_test(&[], &[], tally)?;
    } else {
        // The smoke test creates namespaces: counted as skipped, never run and passed.
        println!("test: {BENCH_SMOKE} skipped, not root (it creates network namespaces)");
        tally.ignored += 1;
        cargo_test(&[], &["--skip".to_owned(), BENCH_SMOKE.to_owned()], tally)?;
    }
    // ... and the in-process suite once more on the other backend.
    println!("test: in-process integration tests again on the epoll data path");
    cargo_test_with(
        &[("SKIFF_DATAPATH", "epoll")],
        &["--package", "router", "--tests"],
        &[],
        tally,
    )
}

pub fn kernel_tests(args: &[String], tally: &mut Tally) -> anyhow::Result<()> {
    if !is_root() {
        if std::env::var_os("CI").is_some() {
            bail!("kernel tests need root (CAP_BPF, CAP_NET_ADMIN) and CI is set");
        }
        // Counted as skipped, never as passed: list them without running them.
        let listed = output(cargo().args(["test", "--package", "kernel-tests", "--", "--list"]))?;
        let tests = listed.lines().filter(|l| l.ends_with(": test")).count() as u64;
        tally.ignored += tests;
        println!("kernel-test: {tests} tests skipped, not root (run as root to load BPF programs)");
        return Ok(());
    }
    println!("kernel-test: privileged tests on the real kernel");
    // The tests run the real `skiff` binary inside network namespaces.
    status(cargo().args(["build", "--package", "router", "--bin", "skiff"]))?;
    cargo_test(&["--package", "kernel-tests"], args, tally)
}

/// Builds skiff and the harness with the release profile and runs the harness.
pub fn bench(args: &[String]) -> anyhow::Result<()> {
    if args == ["--micro"] {
        // In-memory: no root, no namespaces.
        return status(cargo().args(["bench", "--package", "bench", "--benches"]));
    }
    ensure!(
        is_root(),
        "the benchmarks create network namespaces and cgroups: run them as root"
    );
    status(cargo().args([
        "build",
        "--release",
        "--package",
        "router",
        "--bin",
        "skiff",
    ]))?;
    status(cargo().args([
        "build",
        "--release",
        "--package",
        "bench",
        "--package",
        "kernel-tests",
        "--bins",
    ]))?;
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| "target".into(), std::path::PathBuf::from);
    status(
        Command::new(target.join("release/bench"))
            .args(args)
            .env("SKIFF_BIN", target.join("release/skiff")),
    )
}
