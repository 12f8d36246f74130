//! Which data-path backend a router runs on, on the real kernel: `auto` runs io_uring where
//! `io_uring_setup` works and falls back to epoll, saying why, where it does not; `uring`
//! refuses to start without it. io_uring is switched off with `kernel.io_uring_disabled=2`
//! for the test and switched back on after (this file is its own test binary, so no other
//! test runs while it is off).

use kernel_tests::{Netns, require_root, skiff::Site};

const SYSCTL: &str = "/proc/sys/kernel/io_uring_disabled";

/// Sets `kernel.io_uring_disabled` and puts the old value back when dropped.
struct Disabled(String);

impl Disabled {
    fn set(value: &str) -> anyhow::Result<Self> {
        let old = std::fs::read_to_string(SYSCTL)?.trim().to_owned();
        std::fs::write(SYSCTL, value)?;
        Ok(Self(old))
    }
}

impl Drop for Disabled {
    fn drop(&mut self) {
        if let Err(e) = std::fs::write(SYSCTL, &self.0) {
            eprintln!("failed to restore kernel.io_uring_disabled={}: {e}", self.0);
        }
    }
}

/// The running kernel's (major, minor) version.
fn kernel_version() -> anyhow::Result<(u32, u32)> {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease")?;
    let mut parts = release.trim().split(['.', '-']);
    let mut next = || -> anyhow::Result<u32> {
        Ok(parts
            .next()
            .ok_or_else(|| anyhow::anyhow!("kernel release {release}"))?
            .parse()?)
    };
    Ok((next()?, next()?))
}

#[test]
fn auto_runs_io_uring_and_falls_back_to_epoll_saying_why() -> anyhow::Result<()> {
    if !require_root() {
        return Ok(());
    }
    let ns = Netns::new("kdpath")?;
    let version = kernel_version()?;
    let on = Site::start_with(&ns, None, "on", None, &[], &["--datapath", "auto"])?;
    let status = on.status()?;
    if version < (5, 19) {
        // The uring backend needs provided buffer rings (Linux 5.19): auto says so and runs
        // on epoll, and `uring` refuses to start.
        assert_eq!(status["datapath"], "epoll", "{status}");
        let why = status["datapathSummary"].as_str().unwrap_or_default();
        assert!(why.contains("provided buffer rings"), "{why}");
        assert!(
            on.log_tail()
                .contains("io_uring unavailable: data path on epoll"),
            "{}",
            on.log_tail()
        );
        drop(on);
        let refused = Site::start_with(&ns, None, "must", None, &[], &["--datapath", "uring"]);
        assert!(refused.is_err(), "--datapath uring started on {version:?}");
        return Ok(());
    }
    assert_eq!(status["datapath"], "uring", "{status}");
    drop(on);
    if version < (6, 6) {
        // No kernel.io_uring_disabled before Linux 6.6: io_uring cannot be switched off to
        // see the fallback, which the kernels before 5.19 show instead.
        eprintln!("kernel {version:?} has no {SYSCTL}: the forced fallback is not tried");
        return Ok(());
    }
    assert_eq!(
        std::fs::read_to_string(SYSCTL)?.trim(),
        "0",
        "io_uring is on here"
    );

    let _off = Disabled::set("2")?;
    let fallback = Site::start_with(&ns, None, "off", None, &[], &["--datapath", "auto"])?;
    let status = fallback.status()?;
    assert_eq!(status["datapath"], "epoll", "{status}");
    let why = status["datapathSummary"].as_str().unwrap_or_default();
    assert!(why.contains("kernel.io_uring_disabled is 2"), "{why}");
    assert!(
        fallback
            .log_tail()
            .contains("io_uring unavailable: data path on epoll"),
        "{}",
        fallback.log_tail()
    );
    drop(fallback);

    let refused = Site::start_with(&ns, None, "must", None, &[], &["--datapath", "uring"]);
    let error = refused.err().map(|e| format!("{e:#}")).unwrap_or_default();
    assert!(
        error.contains("datapath uring: io_uring_setup")
            && error.contains("io_uring_disabled is 2"),
        "{error}"
    );
    Ok(())
}
