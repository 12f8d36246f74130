//! TLS between workloads and the router, with real tools: curl and openssl s_client against
//! TLS listeners, TLS connectors to `openssl s_server` backends, bundles written by the `skiff`
//! CLI with `--bundle-out`, certificates users bring with `--cert/--key`.

mod common;

use std::{
    path::Path,
    process::{Command, Output},
};

use common::{Site, Spawned, free_port, has_lines, scrape_until, self_signed, serve};

/// Runs the `skiff` CLI against `site`'s running router; it must succeed.
fn skiff(site: &Site, args: &[&str]) -> Output {
    let out = skiff_output(site, args);
    assert!(
        out.status.success(),
        "skiff {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Runs the `skiff` CLI expecting it to fail; returns its one-line error.
fn skiff_fails(site: &Site, args: &[&str]) -> String {
    let out = skiff_output(site, args);
    assert!(
        !out.status.success(),
        "skiff {} should have failed",
        args.join(" ")
    );
    let err = String::from_utf8_lossy(&out.stderr).trim().to_owned();
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    err
}

fn skiff_output(site: &Site, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_skiff"))
        .arg("--state-dir")
        .arg(site.dir())
        .args(args)
        .output()
        .expect("run skiff")
}

/// Runs a client tool to completion.
fn run(program: &str, args: &[&str]) -> Output {
    Command::new(program)
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("failed to run {program}: {e}"))
}

/// curl `args`; the body when it succeeds, `None` when it fails (curl's reason goes to the
/// test's output). `localhost` always means 127.0.0.1, where the listeners are: resolved to
/// ::1 first, it could reach whatever else listens there on the same port number.
fn curl(args: &[&str]) -> Option<String> {
    let mut all = vec!["-sS", "--fail", "--max-time", "10"];
    let pins: Vec<String> = args
        .iter()
        .filter_map(|a| a.strip_prefix("https://localhost:"))
        .filter_map(|rest| rest.split('/').next())
        .map(|port| format!("localhost:{port}:127.0.0.1"))
        .collect();
    for pin in &pins {
        all.extend(["--resolve", pin.as_str()]);
    }
    all.extend_from_slice(args);
    let out = run("curl", &all);
    if !out.status.success() {
        eprintln!(
            "curl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// What `openssl s_client` to 127.0.0.1:`port` (server name `web`) with `extra` arguments
/// prints.
fn s_client(port: u16, extra: &[&str]) -> String {
    let connect = format!("127.0.0.1:{port}");
    let mut args = vec!["s_client", "-connect", &connect, "-servername", "web"];
    args.extend_from_slice(extra);
    String::from_utf8_lossy(&run("openssl", &args).stdout).into_owned()
}

/// `skiff listener create NAME --host 127.0.0.1 --port 0 EXTRA...` at `site`; waits until it
/// is reachable and returns the port it got.
async fn listen(site: &Site, name: &str, extra: &[&str]) -> u16 {
    let mut args = vec![
        "listener",
        "create",
        name,
        "--host",
        "127.0.0.1",
        "--port",
        "0",
    ];
    args.extend_from_slice(extra);
    skiff(site, &args);
    site.reachable_port(name).await
}

/// `skiff connector create NAME --host 127.0.0.1 --port PORT EXTRA...` at `site`.
fn connect(site: &Site, name: &str, port: u16, extra: &[&str]) {
    let port = port.to_string();
    let mut args = vec![
        "connector",
        "create",
        name,
        "--host",
        "127.0.0.1",
        "--port",
        &port,
    ];
    args.extend_from_slice(extra);
    skiff(site, &args);
}

/// A real HTTP server (python's) serving `dir`.
async fn web_server(dir: &Path) -> (u16, Spawned) {
    let port = free_port().await;
    let mut cmd = Command::new("python3");
    cmd.args([
        "-m",
        "http.server",
        &port.to_string(),
        "--bind",
        "127.0.0.1",
    ])
    .current_dir(dir);
    (port, serve(&mut cmd, port).await)
}

/// `openssl s_server -www` with `cert` and `key`, and `extra` options; it answers GET with a
/// page about the TLS session.
async fn s_server(cert: &str, key: &str, extra: &[&str]) -> (u16, Spawned) {
    let port = free_port().await;
    let mut cmd = Command::new("openssl");
    cmd.args(["s_server", "-accept", &format!("127.0.0.1:{port}")])
        .args(["-cert", cert, "-key", key, "-www", "-quiet"])
        .args(extra);
    (port, serve(&mut cmd, port).await)
}

const S_SERVER_PAGE: &str = "Ciphers supported in s_server binary";

/// A linked pair: east reaches west.
async fn pair() -> (Site, Site) {
    let west = Site::start("west", true).await;
    let east = Site::start("east", false).await;
    east.link_to(&west).await;
    (west, east)
}

fn text(path: &Path) -> String {
    path.to_string_lossy().into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_listeners_serve_curl_and_openssl_and_check_client_certificates() {
    let (west, east) = pair().await;
    let files = kernel_tests::TempDir::new("tls-web").expect("dir");
    std::fs::write(files.path().join("hello.txt"), "hello over TLS\n").expect("write");
    let (web, _server) = web_server(files.path()).await;
    connect(&west, "web", web, &[]);

    let bundle = files.path().join("bundle");
    let port = listen(&east, "web", &["--tls", "--bundle-out", &text(&bundle)]).await;
    for file in ["ca.crt", "tls.crt", "tls.key"] {
        assert!(bundle.join(file).exists(), "{file} in the bundle");
    }
    let key_mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(bundle.join("tls.key"))
            .expect("key")
            .permissions(),
    );
    assert_eq!(key_mode & 0o777, 0o600, "the bundle's key is private");
    let url = format!("https://localhost:{port}/hello.txt");
    let ca = text(&bundle.join("ca.crt"));

    // curl verifies the listener against the bundle's CA and gets the file from west.
    assert_eq!(
        curl(&["--cacert", &ca, &url]).as_deref(),
        Some("hello over TLS\n")
    );
    // Without the CA, curl refuses the certificate (exit 60).
    let unknown = run("curl", &["-sS", &url]);
    assert_eq!(unknown.status.code(), Some(60), "{unknown:?}");
    // openssl s_client sees a chain that verifies.
    assert!(!s_client(port, &[]).contains("Verify return code: 0 (ok)"));
    let said = s_client(port, &["-CAfile", &ca, "-verify_return_error"]);
    assert!(said.contains("Verify return code: 0 (ok)"), "{said}");
    // Plaintext on the TLS port is refused; the listener keeps serving.
    assert_eq!(curl(&[&format!("http://127.0.0.1:{port}/hello.txt")]), None);
    assert!(curl(&["--cacert", &ca, &url]).is_some());

    // A listener that checks client certificates: no certificate, no service; the bundle's
    // certificate gets through.
    let mtls = files.path().join("mtls");
    let args = [
        "--routing-key",
        "web",
        "--tls",
        "--require-client-cert",
        "--bundle-out",
    ];
    let mut args = args.to_vec();
    let mtls_dir = text(&mtls);
    args.push(&mtls_dir);
    let port = listen(&east, "web-mtls", &args).await;
    let url = format!("https://localhost:{port}/hello.txt");
    let (ca, cert, key) = (
        text(&mtls.join("ca.crt")),
        text(&mtls.join("tls.crt")),
        text(&mtls.join("tls.key")),
    );
    assert_eq!(
        curl(&["--cacert", &ca, &url]),
        None,
        "no client certificate: refused"
    );
    let with_cert = curl(&["--cacert", &ca, "--cert", &cert, "--key", &key, &url]);
    assert_eq!(with_cert.as_deref(), Some("hello over TLS\n"));

    // Each refusal above is counted under its reason: curl without the CA aborted with an
    // alert, plaintext is not TLS, the client certificate was missing.
    let text = scrape_until(
        &east,
        r#"skiff_tls_handshake_failures_total{endpoint="listener",reason="certificate"} 1"#,
    )
    .await;
    has_lines(
        &text,
        &[
            r#"skiff_tls_handshake_failures_total{endpoint="listener",reason="alert"} 1"#,
            r#"skiff_tls_handshake_failures_total{endpoint="listener",reason="protocol"} 1"#,
        ],
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_connector_reaches_an_openssl_server_with_its_bundle() {
    let (west, east) = pair().await;
    let files = kernel_tests::TempDir::new("tls-backend").expect("dir");

    // The connector writes the backend's server bundle; openssl s_server serves with it. The
    // bundle's certificate is for the connector's host, so the port is fixed first.
    let backend = free_port().await;
    let bundle = files.path().join("backend");
    connect(
        &west,
        "secure",
        backend,
        &["--tls", "--bundle-out", &text(&bundle)],
    );
    let mut cmd = Command::new("openssl");
    cmd.args(["s_server", "-accept", &format!("127.0.0.1:{backend}")])
        .args(["-cert", &text(&bundle.join("tls.crt"))])
        .args(["-key", &text(&bundle.join("tls.key")), "-www", "-quiet"]);
    let server = serve(&mut cmd, backend).await;
    // Plain HTTP at east's listener; TLS from west's router to the backend, verified against
    // the service CA.
    let port = listen(&east, "secure", &[]).await;
    let page = curl(&[&format!("http://127.0.0.1:{port}/")]).expect("page");
    assert!(page.contains(S_SERVER_PAGE), "{page}");
    drop(server);

    // A connector that trusts another CA does not reach a backend whose certificate is from
    // the service CA: the client gets nothing.
    let other = files.path().join("other");
    std::fs::create_dir_all(&other).expect("dir");
    self_signed("other", &other.join("ca.key"), &other.join("ca.crt"));
    let (backend, _server) = s_server(
        &text(&bundle.join("tls.crt")),
        &text(&bundle.join("tls.key")),
        &[],
    )
    .await;
    connect(
        &west,
        "wrong-ca",
        backend,
        &["--tls", "--ca-file", &text(&other.join("ca.crt"))],
    );
    let port = listen(&east, "wrong-ca", &[]).await;
    assert_eq!(
        curl(&[&format!("http://127.0.0.1:{port}/")]),
        None,
        "a backend whose certificate does not chain to the configured CA must not be reached"
    );
    // West counted the good backend's handshake and the refused one under its reason.
    let text = scrape_until(
        &west,
        r#"skiff_tls_handshake_failures_total{endpoint="connector",reason="certificate"} 1"#,
    )
    .await;
    has_lines(
        &text,
        &[r#"skiff_tls_handshakes_total{endpoint="connector"} 1"#],
    );
}

/// A CA and certificates made with openssl in `dir`: `ca.crt`, `server.{crt,key}` (serverAuth,
/// localhost and 127.0.0.1), `client.{crt,key}` (clientAuth).
fn user_pki(dir: &Path) {
    let sh = |script: &str| {
        let out = Command::new("sh")
            .arg("-c")
            .arg(script)
            .current_dir(dir)
            .output()
            .expect("sh");
        assert!(out.status.success(), "{script}: {out:?}");
    };
    let key = "-newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes";
    sh(&format!(
        "openssl req -x509 {key} -keyout ca.key -out ca.crt -days 2 -subj /CN=user-ca"
    ));
    for (name, ext) in [
        (
            "server",
            "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth",
        ),
        ("client", "extendedKeyUsage=clientAuth"),
    ] {
        std::fs::write(dir.join(format!("{name}.ext")), ext).expect("ext");
        sh(&format!(
            "openssl req {key} -keyout {name}.key -out {name}.csr -subj /CN={name} && \
             openssl x509 -req -in {name}.csr -CA ca.crt -CAkey ca.key -CAcreateserial \
               -days 2 -extfile {name}.ext -out {name}.crt 2>/dev/null"
        ));
    }
}

/// A self-signed certificate and key that expired yesterday, in `dir`.
fn expired(dir: &Path) -> (String, String) {
    let key = rcgen::KeyPair::generate().expect("key");
    let mut params = rcgen::CertificateParams::new(vec!["localhost".into()]).expect("params");
    params.not_before = time::OffsetDateTime::now_utc() - time::Duration::days(3);
    params.not_after = time::OffsetDateTime::now_utc() - time::Duration::days(1);
    let cert = params.self_signed(&key).expect("sign");
    std::fs::write(dir.join("expired.crt"), cert.pem()).expect("write");
    std::fs::write(dir.join("expired.key"), key.serialize_pem()).expect("write");
    (
        text(&dir.join("expired.crt")),
        text(&dir.join("expired.key")),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_certificates_are_served_presented_and_checked_with_clear_errors() {
    let (west, east) = pair().await;
    let files = kernel_tests::TempDir::new("user-pki").expect("dir");
    let dir = files.path();
    user_pki(dir);
    let path = |name: &str| text(&dir.join(name));
    std::fs::write(dir.join("hello.txt"), "hello\n").expect("write");
    let (web, _server) = web_server(dir).await;
    connect(&west, "web", web, &[]);

    // Refused with one line that says what is wrong.
    let create = |cert: &str, key: &str| {
        skiff_fails(
            &east,
            &[
                "listener",
                "create",
                "bad",
                "--port",
                "0",
                "--tls",
                "--routing-key",
                "web",
                "--cert",
                cert,
                "--key",
                key,
            ],
        )
    };
    let err = create(&path("server.crt"), &path("client.key"));
    assert!(
        err.contains("the private key does not match the certificate"),
        "{err}"
    );
    let err = create(&path("client.crt"), &path("client.key"));
    assert!(
        err.contains("extended key usage does not allow serverAuth"),
        "{err}"
    );
    let (old_cert, old_key) = expired(dir);
    let err = create(&old_cert, &old_key);
    assert!(err.contains("is not valid now"), "{err}");

    // The user's certificate is served; curl verifies it against the user's CA.
    let port = listen(
        &east,
        "web",
        &[
            "--tls",
            "--cert",
            &path("server.crt"),
            "--key",
            &path("server.key"),
        ],
    )
    .await;
    let url = format!("https://localhost:{port}/hello.txt");
    assert_eq!(
        curl(&["--cacert", &path("ca.crt"), &url]).as_deref(),
        Some("hello\n")
    );

    // A backend that checks clients: the connector presents the user's client certificate,
    // and one without it is refused.
    let (backend, _checking) = s_server(
        &path("server.crt"),
        &path("server.key"),
        &[
            "-Verify",
            "1",
            "-verify_return_error",
            "-CAfile",
            &path("ca.crt"),
        ],
    )
    .await;
    let ca = path("ca.crt");
    let (cert, key) = (path("client.crt"), path("client.key"));
    connect(
        &west,
        "checked",
        backend,
        &["--tls", "--ca-file", &ca, "--cert", &cert, "--key", &key],
    );
    connect(&west, "unchecked", backend, &["--tls", "--ca-file", &ca]);
    let checked = listen(&east, "checked", &[]).await;
    let unchecked = listen(&east, "unchecked", &[]).await;
    let page = curl(&[&format!("http://127.0.0.1:{checked}/")]).expect("page");
    assert!(page.contains(S_SERVER_PAGE), "{page}");
    assert_eq!(curl(&[&format!("http://127.0.0.1:{unchecked}/")]), None);
}

/// h2load's report for 2,000 requests to `url`.
fn h2load(url: &str) -> String {
    let out = run("h2load", &["-n", "2000", "-c", "4", "-m", "8", url]);
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// ALPN end to end with TLS on both legs: h2load agrees on h2 with a `--tls --alpn
/// h2,http/1.1` listener at east, the stream carries "h2" across the link, and west's `--tls`
/// connector asks nghttpd (which speaks HTTP/2 over TLS only when ALPN says so) for it. A TLS
/// listener without `--alpn` offers nothing, and h2load, which speaks only HTTP/2, gets no
/// protocol.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alpn_travels_from_a_tls_listener_to_a_tls_connector() {
    let (west, east) = pair().await;
    let files = kernel_tests::TempDir::new("alpn").expect("dir");
    std::fs::write(files.path().join("index.html"), "h2 end to end\n").expect("write");
    let bundle = files.path().join("backend");
    let backend = free_port().await;
    // The connector writes the backend's server bundle, signed by west's service CA.
    connect(
        &west,
        "h2",
        backend,
        &["--tls", "--bundle-out", &text(&bundle)],
    );
    let _server = serve(
        Command::new("nghttpd")
            .arg("-d")
            .arg(files.path())
            .arg(backend.to_string())
            .arg(bundle.join("tls.key"))
            .arg(bundle.join("tls.crt")),
        backend,
    )
    .await;

    let port = listen(&east, "h2", &["--tls", "--alpn", "h2,http/1.1"]).await;
    let report = h2load(&format!("https://127.0.0.1:{port}/index.html"));
    assert!(report.contains("Application protocol: h2"), "{report}");
    assert!(report.contains("2000 succeeded, 0 failed"), "{report}");

    let port = listen(&east, "h2-none", &["--routing-key", "h2", "--tls"]).await;
    let report = h2load(&format!("https://127.0.0.1:{port}/index.html"));
    assert!(!report.contains("Application protocol: h2"), "{report}");
    assert!(!report.contains("2000 succeeded"), "{report}");
}

/// The review's two findings. A client bundle written for one listener opened every listener
/// of the site (each trusted the whole service CA); now it opens only its own. A TLS connector
/// accepted any certificate from the service CA, so a process that took the backend's port and
/// relayed to one of the router's own TLS listeners passed verification; now the connector
/// accepts only the certificate made for its backend.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_certificates_open_only_what_they_were_made_for() {
    let (west, east) = pair().await;
    let files = kernel_tests::TempDir::new("tls-scope").expect("dir");
    std::fs::write(files.path().join("hello.txt"), "hello\n").expect("write");
    let (web, _server) = web_server(files.path()).await;
    connect(&west, "web", web, &[]);

    let (one, two) = (files.path().join("one"), files.path().join("two"));
    let (one_dir, two_dir) = (text(&one), text(&two));
    let mtls = |dir: &str| {
        vec![
            "--routing-key".to_owned(),
            "web".to_owned(),
            "--tls".to_owned(),
            "--require-client-cert".to_owned(),
            "--bundle-out".to_owned(),
            dir.to_owned(),
        ]
    };
    let args: Vec<String> = mtls(&one_dir);
    let a = listen(
        &east,
        "one",
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
    )
    .await;
    let args: Vec<String> = mtls(&two_dir);
    let b = listen(
        &east,
        "two",
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
    )
    .await;
    let with = |bundle: &Path, port: u16| {
        curl(&[
            "--cacert",
            &text(&bundle.join("ca.crt")),
            "--cert",
            &text(&bundle.join("tls.crt")),
            "--key",
            &text(&bundle.join("tls.key")),
            &format!("https://localhost:{port}/hello.txt"),
        ])
    };
    assert_eq!(with(&one, a).as_deref(), Some("hello\n"));
    assert_eq!(with(&two, b).as_deref(), Some("hello\n"));
    assert_eq!(
        with(&one, b),
        None,
        "listener one's bundle opened listener two"
    );
    assert_eq!(
        with(&two, a),
        None,
        "listener two's bundle opened listener one"
    );

    // A TLS connector whose "backend" is the router's own TLS listener (what a relay on the
    // backend's port would show it): its certificate is from the service CA and names
    // 127.0.0.1, but not this connector, so the connector refuses it.
    let own = listen(&west, "own", &["--routing-key", "web", "--tls"]).await;
    connect(&west, "stolen", own, &["--routing-key", "stolen", "--tls"]);
    let front = listen(&east, "front", &["--routing-key", "stolen"]).await;
    assert_eq!(
        curl(&[&format!("http://127.0.0.1:{front}/hello.txt")]),
        None,
        "the connector accepted a listener's certificate as its backend's"
    );
}
