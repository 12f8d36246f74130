//! TLS between workloads and the router, with real tools: curl and openssl s_client against
//! TLS listeners, a TLS connector to an `openssl s_server` backend, bundles written by the
//! `skiff` CLI with `--bundle-out`.

mod common;

use std::{
    path::Path,
    process::{Child, Command, Output, Stdio},
    time::Duration,
};

use common::Site;
use router::admin::Request;

/// A process this test started, killed (by PID) on drop.
struct Spawned(Child);

impl Drop for Spawned {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A port nothing listens on yet.
async fn free_port() -> u16 {
    let socket = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    socket.local_addr().expect("addr").port()
}

async fn wait_listening(port: u16) {
    for _ in 0..200 {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("nothing listens on {port}");
}

/// Runs the `skiff` CLI against `site`'s running router.
fn skiff(site: &Site, args: &[&str]) -> Output {
    let out = Command::new(env!("CARGO_BIN_EXE_skiff"))
        .arg("--state-dir")
        .arg(site.dir())
        .args(args)
        .output()
        .expect("run skiff");
    assert!(
        out.status.success(),
        "skiff {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn run(program: &str, args: &[&str]) -> Output {
    Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("failed to run {program}: {e}"))
}

/// A real HTTP server (python's) serving `dir` on a free port.
async fn web_server(dir: &Path) -> (u16, Spawned) {
    let port = free_port().await;
    let child = Command::new("python3")
        .args([
            "-m",
            "http.server",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
        ])
        .current_dir(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("python3 http.server");
    let server = Spawned(child);
    wait_listening(port).await;
    (port, server)
}

fn listener_port(site_status: &serde_json::Value, name: &str) -> u16 {
    let row = site_status
        .as_array()
        .and_then(|rows| rows.iter().find(|r| r["name"] == name))
        .expect("listener row");
    u16::try_from(row["port"].as_u64().expect("port")).expect("port fits")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_listeners_serve_curl_and_openssl_and_check_client_certificates() {
    let west = Site::start("west", true).await;
    let east = Site::start("east", false).await;
    east.link_to(&west).await;
    let files = kernel_tests::TempDir::new("tls-web").expect("dir");
    std::fs::write(files.path().join("hello.txt"), "hello over TLS\n").expect("write");
    let (backend, _server) = web_server(files.path()).await;
    let backend = backend.to_string();
    skiff(
        &west,
        &[
            "connector",
            "create",
            "web",
            "--host",
            "127.0.0.1",
            "--port",
            &backend,
        ],
    );

    let bundle = files.path().join("bundle");
    let bundle_arg = bundle.to_string_lossy().into_owned();
    let out = skiff(
        &east,
        &[
            "listener",
            "create",
            "web",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--tls",
            "--bundle-out",
            &bundle_arg,
        ],
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("client bundle written"));
    for file in ["ca.crt", "tls.crt", "tls.key"] {
        assert!(bundle.join(file).exists(), "{file} in the bundle");
    }
    let key_mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(bundle.join("tls.key"))
            .expect("key")
            .permissions(),
    );
    assert_eq!(key_mode & 0o777, 0o600, "the bundle's key is private");
    let status = east
        .wait_for(
            |v| {
                v.as_array()
                    .is_some_and(|ls| ls.iter().all(|l| l["reachable"] == true))
            },
            Request::ListenerStatus,
        )
        .await;
    let port = listener_port(&status, "web");
    let url = format!("https://localhost:{port}/hello.txt");
    let ca = bundle.join("ca.crt").to_string_lossy().into_owned();

    // curl verifies the listener against the bundle's CA and gets the file from west.
    let ok = run("curl", &["-sS", "--fail", "--cacert", &ca, &url]);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&ok.stdout), "hello over TLS\n");
    // Without the CA, curl refuses the certificate (exit 60).
    let unknown = run("curl", &["-sS", &url]);
    assert_eq!(unknown.status.code(), Some(60), "{unknown:?}");
    // openssl s_client sees a chain that verifies.
    let s_client = run(
        "openssl",
        &[
            "s_client",
            "-connect",
            &format!("127.0.0.1:{port}"),
            "-servername",
            "web",
            "-CAfile",
            &ca,
            "-verify_return_error",
        ],
    );
    let said = String::from_utf8_lossy(&s_client.stdout);
    assert!(said.contains("Verify return code: 0 (ok)"), "{said}");
    // Plaintext on the TLS port is refused; the listener keeps serving.
    let plain = run(
        "curl",
        &["-sS", &format!("http://127.0.0.1:{port}/hello.txt")],
    );
    assert!(!plain.status.success(), "plaintext must not get through");
    let again = run("curl", &["-sS", "--fail", "--cacert", &ca, &url]);
    assert!(
        again.status.success(),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );

    // A listener that checks client certificates: no certificate, no service; the bundle's
    // certificate gets through.
    let mtls_bundle = files.path().join("mtls");
    let mtls_arg = mtls_bundle.to_string_lossy().into_owned();
    skiff(
        &east,
        &[
            "listener",
            "create",
            "web-mtls",
            "--routing-key",
            "web",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--tls",
            "--require-client-cert",
            "--bundle-out",
            &mtls_arg,
        ],
    );
    let status = east
        .wait_for(
            |v| {
                v.as_array()
                    .is_some_and(|ls| ls.len() == 2 && ls.iter().all(|l| l["reachable"] == true))
            },
            Request::ListenerStatus,
        )
        .await;
    let mtls_url = format!(
        "https://localhost:{}/hello.txt",
        listener_port(&status, "web-mtls")
    );
    let ca = mtls_bundle.join("ca.crt").to_string_lossy().into_owned();
    let refused = run("curl", &["-sS", "--fail", "--cacert", &ca, &mtls_url]);
    assert!(
        !refused.status.success(),
        "no client certificate must be refused"
    );
    let cert = mtls_bundle.join("tls.crt").to_string_lossy().into_owned();
    let key = mtls_bundle.join("tls.key").to_string_lossy().into_owned();
    let ok = run(
        "curl",
        &[
            "-sS", "--fail", "--cacert", &ca, "--cert", &cert, "--key", &key, &mtls_url,
        ],
    );
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&ok.stdout), "hello over TLS\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_connector_reaches_an_openssl_server_with_its_bundle() {
    let west = Site::start("west", true).await;
    let east = Site::start("east", false).await;
    east.link_to(&west).await;
    let files = kernel_tests::TempDir::new("tls-backend").expect("dir");
    let backend = free_port().await.to_string();

    // The connector writes the backend's server bundle; openssl s_server serves with it.
    let bundle = files.path().join("backend");
    let bundle_arg = bundle.to_string_lossy().into_owned();
    skiff(
        &west,
        &[
            "connector",
            "create",
            "secure",
            "--host",
            "127.0.0.1",
            "--port",
            &backend,
            "--tls",
            "--bundle-out",
            &bundle_arg,
        ],
    );
    let cert = bundle.join("tls.crt").to_string_lossy().into_owned();
    let key = bundle.join("tls.key").to_string_lossy().into_owned();
    let server = Spawned(
        Command::new("openssl")
            .args([
                "s_server",
                "-accept",
                &format!("127.0.0.1:{backend}"),
                "-cert",
                &cert,
                "-key",
                &key,
                "-www",
                "-quiet",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("openssl s_server"),
    );
    wait_listening(backend.parse().expect("port")).await;

    let status = {
        skiff(
            &east,
            &[
                "listener",
                "create",
                "secure",
                "--host",
                "127.0.0.1",
                "--port",
                "0",
            ],
        );
        east.wait_for(
            |v| {
                v.as_array()
                    .is_some_and(|ls| ls.iter().all(|l| l["reachable"] == true))
            },
            Request::ListenerStatus,
        )
        .await
    };
    let port = listener_port(&status, "secure");
    // Plain HTTP at east's listener; TLS from west's router to the backend, verified against
    // the service CA. s_server -www answers with a page about the TLS session.
    let page = run(
        "curl",
        &["-sS", "--fail", &format!("http://127.0.0.1:{port}/")],
    );
    let body = String::from_utf8_lossy(&page.stdout);
    assert!(
        page.status.success(),
        "{}",
        String::from_utf8_lossy(&page.stderr)
    );
    assert!(
        body.contains("Ciphers supported in s_server binary"),
        "{body}"
    );
    drop(server);

    // A connector that trusts another CA refuses the same kind of backend: the client is reset.
    let other = files.path().join("other");
    std::fs::create_dir_all(&other).expect("dir");
    let other_ca = other.join("ca.crt");
    let made = run(
        "openssl",
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            &other.join("ca.key").to_string_lossy(),
            "-out",
            &other_ca.to_string_lossy(),
            "-days",
            "1",
            "-subj",
            "/CN=other",
        ],
    );
    assert!(made.status.success(), "{made:?}");
    let backend2 = free_port().await.to_string();
    skiff(
        &west,
        &[
            "connector",
            "create",
            "wrong-ca",
            "--host",
            "127.0.0.1",
            "--port",
            &backend2,
            "--tls",
            "--ca-file",
            &other_ca.to_string_lossy(),
            "--bundle-out",
            &files.path().join("b2").to_string_lossy(),
        ],
    );
    let cert2 = files
        .path()
        .join("b2/tls.crt")
        .to_string_lossy()
        .into_owned();
    let key2 = files
        .path()
        .join("b2/tls.key")
        .to_string_lossy()
        .into_owned();
    let _server2 = Spawned(
        Command::new("openssl")
            .args([
                "s_server",
                "-accept",
                &format!("127.0.0.1:{backend2}"),
                "-cert",
                &cert2,
                "-key",
                &key2,
                "-www",
                "-quiet",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("openssl s_server"),
    );
    wait_listening(backend2.parse().expect("port")).await;
    skiff(
        &east,
        &[
            "listener",
            "create",
            "wrong-ca",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
        ],
    );
    let status = east
        .wait_for(
            |v| {
                v.as_array()
                    .is_some_and(|ls| ls.len() == 2 && ls.iter().all(|l| l["reachable"] == true))
            },
            Request::ListenerStatus,
        )
        .await;
    let refused = run(
        "curl",
        &[
            "-sS",
            "--max-time",
            "5",
            &format!("http://127.0.0.1:{}/", listener_port(&status, "wrong-ca")),
        ],
    );
    assert!(
        !refused.status.success(),
        "a backend whose certificate does not chain to the configured CA must not be reached"
    );
}

/// Runs the `skiff` CLI expecting it to fail; returns its one-line error.
fn skiff_fails(site: &Site, args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_skiff"))
        .arg("--state-dir")
        .arg(site.dir())
        .args(args)
        .output()
        .expect("run skiff");
    assert!(
        !out.status.success(),
        "skiff {} should have failed",
        args.join(" ")
    );
    let err = String::from_utf8_lossy(&out.stderr).trim().to_owned();
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    err
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_certificates_are_served_presented_and_checked_with_clear_errors() {
    let west = Site::start("west", true).await;
    let east = Site::start("east", false).await;
    east.link_to(&west).await;
    let files = kernel_tests::TempDir::new("user-pki").expect("dir");
    let dir = files.path();
    user_pki(dir);
    let path = |name: &str| dir.join(name).to_string_lossy().into_owned();
    std::fs::write(dir.join("hello.txt"), "hello\n").expect("write");
    let (web, _server) = web_server(dir).await;
    skiff(
        &west,
        &[
            "connector",
            "create",
            "web",
            "--host",
            "127.0.0.1",
            "--port",
            &web.to_string(),
        ],
    );

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
                "--host",
                "127.0.0.1",
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
    let expired = {
        let key = rcgen::KeyPair::generate().expect("key");
        let mut params = rcgen::CertificateParams::new(vec!["localhost".into()]).expect("params");
        params.not_before = time::OffsetDateTime::now_utc() - time::Duration::days(3);
        params.not_after = time::OffsetDateTime::now_utc() - time::Duration::days(1);
        let cert = params.self_signed(&key).expect("sign");
        std::fs::write(dir.join("expired.crt"), cert.pem()).expect("write");
        std::fs::write(dir.join("expired.key"), key.serialize_pem()).expect("write");
        (path("expired.crt"), path("expired.key"))
    };
    let err = create(&expired.0, &expired.1);
    assert!(err.contains("is not valid now"), "{err}");

    // The user's certificate is served; curl verifies it against the user's CA.
    skiff(
        &east,
        &[
            "listener",
            "create",
            "web",
            "--port",
            "0",
            "--host",
            "127.0.0.1",
            "--tls",
            "--cert",
            &path("server.crt"),
            "--key",
            &path("server.key"),
        ],
    );
    let status = east
        .wait_for(
            |v| {
                v.as_array()
                    .is_some_and(|ls| ls.iter().all(|l| l["reachable"] == true))
            },
            Request::ListenerStatus,
        )
        .await;
    let url = format!(
        "https://localhost:{}/hello.txt",
        listener_port(&status, "web")
    );
    let ok = run(
        "curl",
        &["-sS", "--fail", "--cacert", &path("ca.crt"), &url],
    );
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );

    // A backend that checks clients: the connector presents the user's client certificate.
    let backend = free_port().await.to_string();
    let _server = Spawned(
        Command::new("openssl")
            .args(["s_server", "-accept", &format!("127.0.0.1:{backend}")])
            .args(["-cert", &path("server.crt"), "-key", &path("server.key")])
            .args([
                "-Verify",
                "1",
                "-verify_return_error",
                "-CAfile",
                &path("ca.crt"),
            ])
            .args(["-www", "-quiet"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("openssl s_server"),
    );
    wait_listening(backend.parse().expect("port")).await;
    let (ca, cert, key) = (path("ca.crt"), path("client.crt"), path("client.key"));
    for (name, with_cert) in [("checked", true), ("unchecked", false)] {
        let mut args = vec![
            "connector",
            "create",
            name,
            "--host",
            "127.0.0.1",
            "--port",
            &backend,
            "--tls",
            "--ca-file",
            &ca,
        ];
        if with_cert {
            args.extend(["--cert", cert.as_str(), "--key", key.as_str()]);
        }
        skiff(&west, &args);
        skiff(
            &east,
            &[
                "listener",
                "create",
                name,
                "--host",
                "127.0.0.1",
                "--port",
                "0",
            ],
        );
    }
    let status = east
        .wait_for(
            |v| {
                v.as_array()
                    .is_some_and(|ls| ls.len() == 3 && ls.iter().all(|l| l["reachable"] == true))
            },
            Request::ListenerStatus,
        )
        .await;
    let page = |name: &str| {
        run(
            "curl",
            &[
                "-sS",
                "--max-time",
                "5",
                &format!("http://127.0.0.1:{}/", listener_port(&status, name)),
            ],
        )
    };
    let checked = page("checked");
    assert!(
        String::from_utf8_lossy(&checked.stdout).contains("Ciphers supported in s_server binary"),
        "{checked:?}"
    );
    let unchecked = page("unchecked");
    assert!(
        !String::from_utf8_lossy(&unchecked.stdout).contains("Ciphers supported"),
        "a backend that checks clients refuses a connector without a certificate"
    );
}
