//! A skiff site running as a real process inside a network namespace, driven through the real
//! `skiff` command line.

use std::{
    path::PathBuf,
    process::Command,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};

use crate::{Cgroup, Netns, Proc};

/// The `skiff` binary: `$SKIFF_BIN`, or the one built in the same target directory as the
/// running executable (a test in `target/<profile>/deps/`, or xtask in `target/<profile>/`).
///
/// # Errors
/// When it has not been built.
pub fn binary() -> anyhow::Result<PathBuf> {
    if let Some(bin) = std::env::var_os("SKIFF_BIN") {
        return Ok(bin.into());
    }
    let exe = std::env::current_exe().context("no current exe")?;
    let dir = exe.parent().context("executable has no directory")?;
    [dir.join("skiff"), dir.join("../skiff")]
        .into_iter()
        .find(|p| p.exists())
        .with_context(|| {
            format!(
                "no skiff binary next to {}: build it with `cargo build -p router` (cargo xtask kernel-test does)",
                exe.display()
            )
        })
}

/// A site: its state directory and its router process. Dropping it stops the router (by PID)
/// and removes the state directory.
#[derive(Debug)]
pub struct Site {
    pub name: String,
    state: PathBuf,
    router: Option<Proc>,
    log: PathBuf,
    run_args: Vec<String>,
    /// Put before the router's command line (`setpriv ...` for an unprivileged router).
    run_prefix: Vec<String>,
}

impl Site {
    /// Creates the site and starts its router inside `netns`.
    ///
    /// # Errors
    /// When `skiff site create` fails or the router does not come up.
    pub fn start(netns: &Netns, name: &str, link_access: Option<&str>) -> anyhow::Result<Self> {
        Self::start_in(netns, None, name, link_access)
    }

    /// Like [`Site::start`], with the router inside `cgroup` and socket acceleration attached
    /// to it (`--accel sockmap --cgroup`).
    ///
    /// # Errors
    /// When the site cannot be created or its router does not come up.
    pub fn start_in(
        netns: &Netns,
        cgroup: Option<&Cgroup>,
        name: &str,
        link_access: Option<&str>,
    ) -> anyhow::Result<Self> {
        let accel: &[&str] = if cgroup.is_some() {
            &["--accel", "sockmap"]
        } else {
            &[]
        };
        Self::start_with(netns, cgroup, name, link_access, &[], accel)
    }

    /// The most general start: extra `site create` arguments, and `router run` arguments
    /// (`--cgroup` is added when `cgroup` is given).
    ///
    /// # Errors
    /// When the site cannot be created or its router does not come up.
    pub fn start_with(
        netns: &Netns,
        cgroup: Option<&Cgroup>,
        name: &str,
        link_access: Option<&str>,
        create_args: &[&str],
        run_args: &[&str],
    ) -> anyhow::Result<Self> {
        let mut site = Self::unstarted(netns, name, run_args);
        site.create(link_access, create_args)?;
        site.run(netns, cgroup)?;
        Ok(site)
    }

    /// Creates the site declared in the YAML file `site_yaml` with `skiff apply -f`, then
    /// starts its router.
    ///
    /// # Errors
    /// When the apply fails or the router does not come up.
    pub fn start_from_yaml(
        netns: &Netns,
        cgroup: Option<&Cgroup>,
        name: &str,
        site_yaml: &std::path::Path,
        run_args: &[&str],
    ) -> anyhow::Result<Self> {
        let mut site = Self::unstarted(netns, name, run_args);
        let yaml = site_yaml.to_str().context("yaml path not UTF-8")?;
        site.cli(&["apply", "-f", yaml])?;
        site.run(netns, cgroup)?;
        Ok(site)
    }

    /// `skiff site create NAME [--link-access ADDR] EXTRA...`.
    fn create(&self, link_access: Option<&str>, extra: &[&str]) -> anyhow::Result<()> {
        let mut args = vec!["site", "create", &self.name];
        if let Some(addr) = link_access {
            args.extend(["--link-access", addr]);
        }
        args.extend(extra);
        self.cli(&args).map(drop)
    }

    fn unstarted(netns: &Netns, name: &str, run_args: &[&str]) -> Self {
        let state = std::env::temp_dir().join(format!("{}-{name}", netns.name()));
        let log = state.with_extension("log");
        Self {
            name: name.to_owned(),
            state,
            router: None,
            log,
            run_args: run_args.iter().map(|a| (*a).to_owned()).collect(),
            run_prefix: Vec::new(),
        }
    }

    /// Creates the site as root, hands its state directory to `nobody`, and runs the router as
    /// `nobody` with no capabilities at all (no acceleration, no isolation).
    ///
    /// # Errors
    /// When the site cannot be created or its router does not come up.
    pub fn start_unprivileged(
        netns: &Netns,
        name: &str,
        link_access: Option<&str>,
    ) -> anyhow::Result<Self> {
        let mut site = Self::unstarted(netns, name, &[]);
        site.create(link_access, &[])?;
        let state = site.state.to_str().context("state path not UTF-8")?;
        crate::run("chown", &["-R", "nobody:nogroup", state])?;
        site.run_prefix = [
            "setpriv",
            "--reuid=nobody",
            "--regid=nogroup",
            "--clear-groups",
            "--inh-caps=-all",
            "--bounding-set=-all",
            "--",
        ]
        .map(str::to_owned)
        .to_vec();
        site.run(netns, None)?;
        Ok(site)
    }

    /// Creates the site as root, hands its state directory to `user`, and runs the router with
    /// acceleration on `cgroup` and `--user USER`: it attaches its programs as root, then drops
    /// to `user` with no capabilities.
    ///
    /// # Errors
    /// When the site cannot be created or its router does not come up.
    pub fn start_accelerated_as(
        netns: &Netns,
        cgroup: &Cgroup,
        name: &str,
        user: &str,
    ) -> anyhow::Result<Self> {
        Self::start_as(netns, cgroup, name, &[], &["--accel", "sockmap"], user)
    }

    /// Creates the site as root with `create_args`, hands its state directory to `user`, and
    /// runs the router in `cgroup` with `run_args` and `--user USER`.
    ///
    /// # Errors
    /// When the site cannot be created or its router does not come up.
    pub fn start_as(
        netns: &Netns,
        cgroup: &Cgroup,
        name: &str,
        create_args: &[&str],
        run_args: &[&str],
        user: &str,
    ) -> anyhow::Result<Self> {
        let mut run_args = run_args.to_vec();
        run_args.extend(["--user", user]);
        let mut site = Self::unstarted(netns, name, &run_args);
        site.create(None, create_args)?;
        let state = site.state.to_str().context("state path not UTF-8")?;
        crate::run("chown", &["-R", user, state])?;
        site.run(netns, Some(cgroup))?;
        Ok(site)
    }

    /// Starts (or restarts) the router process and waits for its admin socket.
    ///
    /// # Errors
    /// When it does not answer within five seconds.
    pub fn run(&mut self, netns: &Netns, cgroup: Option<&Cgroup>) -> anyhow::Result<()> {
        let bin = binary()?;
        let state = self.state.to_str().context("state path not UTF-8")?;
        let bin = bin.to_str().context("binary path not UTF-8")?;
        let mut argv: Vec<&str> = self.run_prefix.iter().map(String::as_str).collect();
        argv.extend([bin, "--state-dir", state, "router", "run"]);
        argv.extend(self.run_args.iter().map(String::as_str));
        let cgroup_arg;
        if let Some(cg) = cgroup {
            cgroup_arg = cg
                .path()
                .to_str()
                .context("cgroup path not UTF-8")?
                .to_owned();
            argv.extend(["--cgroup", &cgroup_arg]);
        }
        self.router = Some(Proc::spawn_logged(netns, cgroup, &argv, &self.log)?);
        let deadline = Instant::now() + crate::patience(Duration::from_secs(5));
        while self.cli(&["status"]).is_err() {
            let exited = self.router.as_mut().is_some_and(Proc::exited);
            if exited || Instant::now() > deadline {
                self.router = None;
                bail!("router {} did not start: {}", self.name, self.log_tail());
            }
            thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    /// `skiff status --output json`, parsed.
    ///
    /// # Errors
    /// When the command fails or prints something that is not JSON.
    pub fn status(&self) -> anyhow::Result<serde_json::Value> {
        Ok(serde_json::from_str(
            &self.cli(&["status", "--output", "json"])?,
        )?)
    }

    /// Runs `skiff --state-dir STATE ARGS...` and returns its stdout.
    ///
    /// # Errors
    /// When it exits non-zero (the error carries its one-line stderr).
    pub fn cli(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = Command::new(binary()?)
            .arg("--state-dir")
            .arg(&self.state)
            .args(args)
            .output()
            .context("failed to run skiff")?;
        ensure!(
            out.status.success(),
            "skiff {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Exposes the backend at 127.0.0.1:`port` under routing key `key`
    /// (`skiff connector create KEY --host 127.0.0.1 --port PORT`).
    ///
    /// # Errors
    /// When the command fails.
    pub fn connector(&self, key: &str, port: u16) -> anyhow::Result<()> {
        self.create_local("connector", key, port)
    }

    /// Listens on 127.0.0.1:`port` for routing key `key`
    /// (`skiff listener create KEY --host 127.0.0.1 --port PORT`).
    ///
    /// # Errors
    /// When the command fails.
    pub fn listener(&self, key: &str, port: u16) -> anyhow::Result<()> {
        self.create_local("listener", key, port)
    }

    fn create_local(&self, kind: &str, key: &str, port: u16) -> anyhow::Result<()> {
        let port = port.to_string();
        let args = [kind, "create", key, "--host", "127.0.0.1", "--port", &port];
        self.cli(&args).map(drop)
    }

    /// Polls `skiff ARGS --output json` until `ok` accepts the answer.
    ///
    /// # Errors
    /// When it does not within `timeout`.
    pub fn wait_for(
        &self,
        args: &[&str],
        timeout: Duration,
        ok: impl Fn(&str) -> bool,
    ) -> anyhow::Result<String> {
        let deadline = Instant::now() + crate::patience(timeout);
        let mut full = args.to_vec();
        full.extend(["--output", "json"]);
        loop {
            if let Ok(out) = self.cli(&full)
                && ok(&out)
            {
                return Ok(out);
            }
            if Instant::now() > deadline {
                bail!(
                    "{}: skiff {} never satisfied the condition",
                    self.name,
                    args.join(" ")
                );
            }
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// Issues a token here and redeems it at `other`; waits until the link is up at `other`.
    ///
    /// # Errors
    /// When issuing, redeeming or linking fails.
    pub fn link_from(&self, other: &Self) -> anyhow::Result<()> {
        self.link_from_with(other, &[])
    }

    /// [`Site::link_from`], with extra `token redeem` arguments (`--connections N`, `--cost N`).
    ///
    /// # Errors
    /// When issuing or redeeming fails, or the link does not come up within ten seconds.
    pub fn link_from_with(&self, other: &Self, redeem_args: &[&str]) -> anyhow::Result<()> {
        let token = self.state.with_extension("token");
        let token_arg = token.to_str().context("token path not UTF-8")?;
        self.cli(&["token", "issue", token_arg])?;
        let mut args = vec!["token", "redeem", token_arg];
        args.extend_from_slice(redeem_args);
        other.cli(&args)?;
        let _ = std::fs::remove_file(&token);
        other.wait_for(&["link", "status"], Duration::from_secs(10), |out| {
            out.contains("\"up\"")
        })?;
        Ok(())
    }

    /// The last lines of the router's log, for error messages.
    #[must_use]
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().rev().take(10).collect();
        lines.into_iter().rev().collect::<Vec<_>>().join("\n")
    }

    /// The site's state directory (its admin socket is `admin.sock` in it).
    #[must_use]
    pub fn state_dir(&self) -> &std::path::Path {
        &self.state
    }

    /// The router's process id, while it runs.
    #[must_use]
    pub fn router_pid(&self) -> Option<u32> {
        self.router.as_ref().map(Proc::pid)
    }

    /// Kills the router with SIGKILL, as a crash would.
    pub fn kill(&mut self) {
        drop(self.router.take());
    }

    /// Stops the router gracefully (SIGINT) and waits for it.
    ///
    /// # Errors
    /// When it does not exit.
    pub fn stop(&mut self) -> anyhow::Result<()> {
        if let Some(router) = self.router.take() {
            router.interrupt()?;
        }
        Ok(())
    }

    /// [`Site::stop`], giving the router up to `limit` to drain and exit (for a router run
    /// with a `--drain-timeout` longer than the default).
    ///
    /// # Errors
    /// When the router does not exit within `limit`.
    pub fn stop_within(&mut self, limit: Duration) -> anyhow::Result<()> {
        if let Some(router) = self.router.take() {
            router.interrupt_within(limit)?;
        }
        Ok(())
    }
}

impl Drop for Site {
    fn drop(&mut self) {
        // Gracefully, so the router removes its eBPF pins; SIGKILL only if that fails.
        if let Some(router) = self.router.take()
            && let Err(e) = router.interrupt()
        {
            eprintln!(
                "warning: router {} did not stop on SIGINT: {e:#}",
                self.name
            );
        }
        let _ = std::fs::remove_dir_all(&self.state);
        let _ = std::fs::remove_file(&self.log);
    }
}
