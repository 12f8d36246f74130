//! The build, lint, test and demo tasks, and the small process helpers they share.

use std::process::Command;

use anyhow::{Context as _, bail, ensure};

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

fn cargo() -> Command {
    Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
}

fn is_root() -> bool {
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
    ]))
}

pub fn unit_tests() -> anyhow::Result<()> {
    println!("test: unit and in-process integration tests");
    status(cargo().arg("test"))
}

pub fn kernel_tests(args: &[String]) -> anyhow::Result<()> {
    if !is_root() {
        if std::env::var_os("CI").is_some() {
            bail!("kernel tests need root (CAP_BPF, CAP_NET_ADMIN) and CI is set");
        }
        println!("kernel-test: skipped, not root (run as root to load BPF programs)");
        return Ok(());
    }
    println!("kernel-test: privileged tests on the real kernel");
    status(
        cargo()
            .args(["test", "--package", "kernel-tests", "--"])
            .args(args),
    )
}

pub fn demo() -> anyhow::Result<()> {
    ensure!(
        is_root(),
        "the demo creates network namespaces and loads BPF programs: run it as root"
    );
    println!("demo: sock_ops + sk_msg attached to a fresh cgroup in a fresh network namespace;");
    println!(
        "demo: a 4 MiB transfer inside the cgroup goes socket to socket, a control one outside"
    );
    println!("demo: it crosses loopback. The capture and counters below show the difference.");
    status(cargo().args([
        "test",
        "--package",
        "kernel-tests",
        "--test",
        "redirect",
        "--",
        "--nocapture",
    ]))
}
