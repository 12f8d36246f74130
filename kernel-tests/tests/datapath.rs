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

#[test]
fn auto_runs_io_uring_and_falls_back_to_epoll_saying_why() -> anyhow::Result<()> {
    if !require_root() {
        return Ok(());
    }
    let ns = Netns::new("kdpath")?;
    assert_eq!(
        std::fs::read_to_string(SYSCTL)?.trim(),
        "0",
        "io_uring is on here"
    );
    let on = Site::start_with(&ns, None, "on", None, &[], &["--datapath", "auto"])?;
    let status = on.status()?;
    assert_eq!(status["datapath"], "uring", "{status}");
    drop(on);

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
        error.contains("--datapath uring: io_uring_setup")
            && error.contains("io_uring_disabled is 2"),
        "{error}"
    );
    Ok(())
}
