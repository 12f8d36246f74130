//! HTTP/2 through the service network, with h2load against nghttpd: over TLS end to end (the
//! client's ALPN reaches the backend, since the routers relay the TLS bytes untouched) and in
//! cleartext with prior knowledge (h2c).

mod common;

use std::process::Command;

use common::{Site, Spawned, free_port, self_signed, serve};

/// nghttpd serving `dir` on `port`, with TLS when `tls` holds (key, cert) paths.
async fn nghttpd(dir: &std::path::Path, port: u16, tls: Option<(&str, &str)>) -> Spawned {
    let mut cmd = Command::new("nghttpd");
    cmd.arg("-d").arg(dir).arg(port.to_string());
    match tls {
        Some((key, cert)) => cmd.args([key, cert]),
        None => cmd.arg("--no-tls"),
    };
    serve(&mut cmd, port).await
}

/// Runs h2load and returns its report.
fn h2load(url: &str) -> String {
    let out = Command::new("h2load")
        .args(["-n", "2000", "-c", "4", "-m", "8", url])
        .output()
        .expect("h2load (Debian's nghttp2-client)");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_passes_through_with_alpn_end_to_end_and_in_cleartext() {
    let west = Site::start("west", true).await;
    let east = Site::start("east", false).await;
    east.link_to(&west).await;
    let files = kernel_tests::TempDir::new("h2").expect("dir");
    std::fs::write(files.path().join("index.html"), "over HTTP/2\n").expect("write");
    let key = files.path().join("tls.key");
    let cert = files.path().join("tls.crt");
    self_signed("localhost", &key, &cert);

    // TLS from h2load to nghttpd; the routers carry it as bytes.
    let tls_port = free_port().await;
    let (key, cert) = (key.to_string_lossy(), cert.to_string_lossy());
    let _tls_server = nghttpd(files.path(), tls_port, Some((&key, &cert))).await;
    west.connector("h2-tls", "h2-tls", tls_port).await;
    let port = east.listener("h2-tls", "h2-tls").await;
    let report = h2load(&format!("https://127.0.0.1:{port}/index.html"));
    assert!(report.contains("Application protocol: h2"), "{report}");
    assert!(report.contains("2000 succeeded, 0 failed"), "{report}");

    // Cleartext HTTP/2 with prior knowledge.
    let clear_port = free_port().await;
    let _clear_server = nghttpd(files.path(), clear_port, None).await;
    west.connector("h2c", "h2c", clear_port).await;
    let port = east.listener("h2c", "h2c").await;
    let report = h2load(&format!("http://127.0.0.1:{port}/index.html"));
    assert!(report.contains("Application protocol: h2c"), "{report}");
    assert!(report.contains("2000 succeeded, 0 failed"), "{report}");
}
