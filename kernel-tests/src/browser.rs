//! A headless Chromium in a test's network namespace, driven over WebDriver (Debian's
//! `chromium` and `chromium-driver`): plain HTTP requests made with curl inside the namespace,
//! so a test reads a page as a user's browser renders it, scripts and all.

use std::{path::Path, time::Duration};

use anyhow::{Context as _, bail, ensure};
use serde_json::{Value, json};

use crate::{Netns, Proc, TempDir, patience};

/// Debian's Chromium and its WebDriver.
pub const CHROMIUM: &str = "/usr/bin/chromium";
pub const CHROMEDRIVER: &str = "/usr/bin/chromedriver";

/// A WebDriver session with a headless Chromium; the session ends, and the driver with it,
/// on drop.
#[derive(Debug)]
pub struct Browser<'a> {
    ns: &'a Netns,
    base: String,
    session: String,
    _driver: Proc,
    _profile: TempDir,
}

impl<'a> Browser<'a> {
    /// Starts chromedriver on `port` inside `ns` and opens a session with a fresh profile.
    ///
    /// # Errors
    /// When the driver does not come up or refuses the session.
    pub fn start(ns: &'a Netns, port: u16) -> anyhow::Result<Self> {
        let profile = TempDir::new("chromium")?;
        let driver = Proc::spawn_logged(
            ns,
            None,
            &[CHROMEDRIVER, &format!("--port={port}")],
            &profile.path().join("chromedriver.log"),
        )?;
        ns.wait_listening(port, Duration::from_secs(20))?;
        let base = format!("http://127.0.0.1:{port}");
        let profile_arg = format!(
            "--user-data-dir={}",
            profile.path().join("profile").display()
        );
        // As root in a namespace with no way out: no sandbox, and none of Chromium's own
        // connections to the outside (they would be refused, many at a time).
        let args = [
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-default-apps",
            "--no-first-run",
            "--window-size=1280,1000",
            &profile_arg,
        ];
        let capabilities = json!({
            "capabilities": {"alwaysMatch": {
                "browserName": "chrome",
                "goog:chromeOptions": {"binary": CHROMIUM, "args": args},
            }},
        });
        let answer = call(ns, "POST", &format!("{base}/session"), Some(&capabilities))?;
        let session = answer["sessionId"]
            .as_str()
            .with_context(|| format!("no WebDriver session: {answer}"))?
            .to_owned();
        Ok(Self {
            ns,
            base,
            session,
            _driver: driver,
            _profile: profile,
        })
    }

    fn url(&self, path: &str) -> String {
        format!("{}/session/{}{path}", self.base, self.session)
    }

    /// Loads `url` and waits for its load event.
    ///
    /// # Errors
    /// When the browser cannot load it.
    pub fn open(&self, url: &str) -> anyhow::Result<()> {
        call(
            self.ns,
            "POST",
            &self.url("/url"),
            Some(&json!({"url": url})),
        )?;
        Ok(())
    }

    /// Runs `script` (a function body) in the page and returns what it returns.
    ///
    /// # Errors
    /// When the script throws or the browser is gone.
    pub fn script(&self, script: &str) -> anyhow::Result<Value> {
        let body = json!({"script": script, "args": []});
        call(self.ns, "POST", &self.url("/execute/sync"), Some(&body))
    }

    /// Runs `script` until `done` accepts what it returns, for up to `limit`; returns the last
    /// value seen.
    ///
    /// # Errors
    /// When `done` never accepts it (with the last value in the message).
    pub fn wait_for(
        &self,
        script: &str,
        limit: Duration,
        done: impl Fn(&Value) -> bool,
    ) -> anyhow::Result<Value> {
        let deadline = std::time::Instant::now() + patience(limit);
        loop {
            let value = self.script(script)?;
            if done(&value) {
                return Ok(value);
            }
            if std::time::Instant::now() > deadline {
                bail!("the page never showed what was waited for; last: {value}");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Writes a PNG of the window to `path`.
    ///
    /// # Errors
    /// When the browser cannot take it or the file cannot be written.
    pub fn screenshot(&self, path: &Path) -> anyhow::Result<()> {
        let answer = call(self.ns, "GET", &self.url("/screenshot"), None)?;
        let png = answer
            .as_str()
            .context("the screenshot is not a string")
            .and_then(|b64| {
                base64::Engine::decode(&base64::engine::general_purpose::STANDARD, b64)
                    .context("the screenshot is not base64")
            })?;
        ensure!(png.starts_with(b"\x89PNG"), "the screenshot is not a PNG");
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(path, png).with_context(|| format!("failed to write {}", path.display()))
    }
}

impl Drop for Browser<'_> {
    fn drop(&mut self) {
        let _ = call(self.ns, "DELETE", &self.url(""), None);
    }
}

/// One WebDriver command; returns its `value`.
fn call(ns: &Netns, method: &str, url: &str, body: Option<&Value>) -> anyhow::Result<Value> {
    let body = body.map(ToString::to_string);
    let mut args = vec!["curl", "-sS", "--max-time", "60", "-X", method, url];
    if let Some(body) = &body {
        args.extend([
            "-H",
            "Content-Type: application/json",
            "--data-binary",
            body,
        ]);
    }
    let answer: Value = serde_json::from_str(&ns.run(&args)?)
        .with_context(|| format!("WebDriver {method} {url}: not JSON"))?;
    let value = answer.get("value").cloned().unwrap_or(Value::Null);
    if let Some(error) = value.get("error") {
        bail!("WebDriver {method} {url}: {error}: {}", value["message"]);
    }
    Ok(value)
}
