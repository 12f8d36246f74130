//! The web console (`router run --console-addr`) in a real browser: a two-site network in
//! network namespaces, east's console opened in Debian's headless Chromium over WebDriver.
//! The page is read as rendered (its script fetched the router's view), and a screenshot of
//! each state is written to `target/test-artifacts/`.

use std::{path::PathBuf, time::Duration};

use kernel_tests::{Netns, browser::Browser, require_root, skiff::Site};

/// Where the screenshots go: beside the build, so CI keeps them with its other artifacts.
fn artifact(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../target/test-artifacts")
        .join(name)
}

/// The rendered text of the links table, and the sites drawn in the topology.
const LINKS_AND_SITES: &str = "return { links: document.querySelector('#links tbody').innerText, \
     sites: Array.from(document.querySelectorAll('#topology [data-site]')).map(g => g.dataset.site).sort() };";

#[test]
fn the_console_shows_the_network_and_follows_a_link_going_down() -> anyhow::Result<()> {
    if !require_root() {
        return Ok(());
    }
    let west_ns = Netns::new("conw")?;
    let east_ns = Netns::new("cone")?;
    let (west_ip, _) = west_ns.link(&east_ns, 41)?;
    let mut west = Site::start(&west_ns, "west", Some(&format!("{west_ip}:55671")))?;
    let east = Site::start_with(
        &east_ns,
        None,
        "east",
        None,
        &[],
        &["--console-addr", "9681"],
    )?;
    west.link_from(&east)?;
    west.cli(&[
        "connector",
        "create",
        "web",
        "--host",
        "127.0.0.1",
        "--port",
        "8081",
    ])?;
    east.cli(&["listener", "create", "web", "--port", "9082"])?;
    east.wait_for(&["listener", "status"], Duration::from_secs(10), |out| {
        out.contains("\"reachable\": true")
    })?;

    // Without the token there is nothing to see; the console binds loopback only.
    let refused = east_ns.run(&[
        "curl",
        "-s",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "http://127.0.0.1:9681/api/view",
    ])?;
    assert_eq!(refused, "401");
    let listening = east_ns.run(&["ss", "-Htln", "sport = :9681"])?;
    assert!(listening.contains("127.0.0.1:9681"), "{listening}");
    let token = std::fs::read_to_string(east.state_dir().join("console.token"))?;

    let browser = Browser::start(&east_ns, 9515)?;
    browser.open(&format!("http://127.0.0.1:9681/?token={}", token.trim()))?;
    let up = browser.wait_for(LINKS_AND_SITES, Duration::from_secs(20), |v| {
        v["sites"] == serde_json::json!(["east", "west"])
            && v["links"]
                .as_str()
                .is_some_and(|t| t.contains("west") && t.contains("up"))
    })?;
    eprintln!("console with the link up: {up}");
    let services = browser.script("return document.querySelector('#services tbody').innerText;")?;
    assert!(
        services
            .as_str()
            .is_some_and(|t| t.contains("web") && t.contains("reachable")),
        "{services}"
    );
    browser.screenshot(&artifact("console-link-up.png"))?;

    // The far router dies: the page, still open, shows the link down on its next refresh.
    west.kill();
    let down = browser.wait_for(LINKS_AND_SITES, Duration::from_secs(30), |v| {
        v["links"].as_str().is_some_and(|t| t.contains("down"))
    })?;
    eprintln!("console with the link down: {down}");
    browser.screenshot(&artifact("console-link-down.png"))?;
    Ok(())
}
