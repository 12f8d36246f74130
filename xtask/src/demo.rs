//! `cargo xtask demo`: two sites in network namespaces, linked by a token, a real web server
//! exposed at one and fetched with curl from the other (plain, refused by namespace isolation,
//! and over TLS with a client bundle), then a site policy refusing what it does not name. Every command is printed as it runs;
//! namespaces, processes and state are removed at the end, also on failure.

use std::time::Duration;

use anyhow::Context as _;
use kernel_tests::{Cgroup, Netns, Proc, TempDir, skiff::Site};

use crate::task::status;

fn say(step: &str) {
    println!("\ndemo: {step}");
}

fn show(site: &Site, args: &[&str]) -> anyhow::Result<()> {
    println!("$ skiff --state-dir <{}> {}", site.name, args.join(" "));
    print!("{}", site.cli(args)?);
    Ok(())
}

pub fn run() -> anyhow::Result<()> {
    anyhow::ensure!(
        // SAFETY: geteuid has no preconditions.
        unsafe { libc::geteuid() } == 0,
        "the demo creates network namespaces and loads BPF programs: run it as root"
    );
    say("building the skiff binary");
    status(crate::task::cargo().args(["build", "--package", "router", "--bin", "skiff"]))?;

    say("two hosts: network namespaces 'west' and 'east', joined by a veth pair");
    let west_ns = Netns::new("west")?;
    let east_ns = Netns::new("east")?;
    let (west_ip, east_ip) = west_ns.link(&east_ns, 200)?;
    println!("west {west_ip}  <-veth->  east {east_ip}");

    say("east's workloads live in two namespaces (cgroups team-a and team-b); east isolates them");
    let east_cgroup = Cgroup::new("demo-east")?;
    let (team_a, team_b) = (east_cgroup.child("team-a")?, east_cgroup.child("team-b")?);
    let ns_a = format!("team-a={}", team_a.path().display());
    let ns_b = format!("team-b={}", team_b.path().display());
    println!("{ns_a}\n{ns_b}");

    say("a site in each, each with its own CA; west accepts links on its veth address");
    let link_access = format!("{west_ip}:55671");
    let west = Site::start(&west_ns, "west", Some(&link_access))?;
    // East attaches its connect() hooks as root, then runs as nobody with no capabilities.
    let east = Site::start_as(
        &east_ns,
        &east_cgroup,
        "east",
        &[
            "--namespace",
            &ns_a,
            "--namespace",
            &ns_b,
            "--isolate-namespaces",
        ],
        &[],
        "nobody",
    )?;
    show(&west, &["status"])?;
    if let Some(pid) = east.router_pid() {
        println!(
            "east's router (skiff router run --user nobody): Uid {}, CapEff {}",
            kernel_tests::proc_status(pid, "Uid:")?,
            kernel_tests::proc_status(pid, "CapEff:")?
        );
    }

    say("west issues a one-time token; east redeems it (CSR, signed by west's CA) and links");
    west.link_from(&east)?;
    show(&east, &["link", "status"])?;

    say("a real web server in west, reachable only from west's own loopback");
    let www = TempDir::new("demo-www")?;
    std::fs::write(
        www.path().join("index.html"),
        "<h1>hello from west, through skiff</h1>\n",
    )?;
    let www_arg = www.path().to_str().context("temp path not UTF-8")?;
    let _server = Proc::spawn(
        &west_ns,
        None,
        &[
            "python3",
            "-m",
            "http.server",
            "8080",
            "--bind",
            "127.0.0.1",
            "--directory",
            www_arg,
        ],
    )?;
    west_ns.wait_listening(8080, Duration::from_secs(10))?;

    say("expose it: a connector at west, a listener at east, bound by the routing key 'web'");
    show(
        &west,
        &[
            "connector",
            "create",
            "web",
            "--host",
            "127.0.0.1",
            "--port",
            "8080",
        ],
    )?;
    show(
        &east,
        &[
            "listener",
            "create",
            "web",
            "--host",
            "127.0.0.1",
            "--port",
            "9080",
            "--namespace",
            "team-a",
        ],
    )?;
    east.wait_for(&["listener", "status"], Duration::from_secs(10), |out| {
        out.contains("\"reachable\": true")
    })?;
    show(&east, &["network", "status"])?;

    say("curl in east's team-a fetches west's page through the mTLS link");
    let url = "http://127.0.0.1:9080/index.html";
    let curl = ["curl", "-sS", "--max-time", "10", url];
    println!("$ (in team-a) curl -sS {url}");
    print!(
        "{}",
        Proc::spawn(&east_ns, Some(&team_a), &curl)?.wait(Duration::from_secs(15))?
    );
    show(&east, &["link", "status"])?;

    say("the same curl from team-b is refused by the kernel at connect(): EPERM, no packet sent");
    println!("$ (in team-b) curl -sS {url}");
    match Proc::spawn(&east_ns, Some(&team_b), &curl)?.wait(Duration::from_secs(15)) {
        Ok(body) => anyhow::bail!("team-b should have been refused, got: {body}"),
        Err(e) => println!("{e:#}"),
    }
    show(&east, &["status"])?;

    say(
        "TLS for team-a too: a TLS listener with a certificate from east's service CA and a client bundle",
    );
    let bundle = TempDir::new("demo-bundle")?;
    let bundle_arg = bundle.path().to_str().context("temp path not UTF-8")?;
    show(
        &east,
        &[
            "listener",
            "create",
            "web-tls",
            "--routing-key",
            "web",
            "--host",
            "127.0.0.1",
            "--port",
            "9443",
            "--namespace",
            "team-a",
            "--tls",
            "--bundle-out",
            bundle_arg,
        ],
    )?;
    east_ns.wait_listening(9443, Duration::from_secs(10))?;
    let ca = bundle.path().join("ca.crt");
    let ca = ca.to_str().context("temp path not UTF-8")?;
    let tls_url = "https://localhost:9443/index.html";
    println!("$ (in team-a) curl -sS --cacert <bundle>/ca.crt {tls_url}");
    let curl_tls = ["curl", "-sS", "--max-time", "10", "--cacert", ca, tls_url];
    print!(
        "{}",
        Proc::spawn(&east_ns, Some(&team_a), &curl_tls)?.wait(Duration::from_secs(15))?
    );

    say("a site policy at west: links only from east, only the 'web' service may be exposed");
    let policy = TempDir::new("demo-policy")?;
    let policy_file = policy.path().join("policy.yaml");
    std::fs::write(
        &policy_file,
        "apiVersion: skiff.io/v1alpha1\nkind: SitePolicy\nmetadata: {name: demo}\nspec:\n  allowIncomingLinks: [east]\n  allowedExposedResources: [\"127.0.0.1\"]\n  allowedServices: [web]\n",
    )?;
    print!("{}", std::fs::read_to_string(&policy_file)?);
    show(
        &west,
        &[
            "apply",
            "-f",
            policy_file.to_str().context("temp path not UTF-8")?,
        ],
    )?;
    println!("$ skiff --state-dir <west> connector create db --host 127.0.0.1 --port 5432");
    match west.cli(&[
        "connector",
        "create",
        "db",
        "--host",
        "127.0.0.1",
        "--port",
        "5432",
    ]) {
        Ok(out) => anyhow::bail!("the policy should have refused the connector, got: {out}"),
        Err(e) => println!("{e:#}"),
    }
    show(&west, &["policy", "status"])?;

    say("cleaning up: routers stopped, namespaces, cgroups and state removed");
    drop((west, east));
    drop((team_a, team_b));
    Ok(())
}
