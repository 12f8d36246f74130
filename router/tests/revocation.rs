//! Revoking one site's link credential at the issuing site.

mod common;

use std::time::{Duration, Instant};

use common::{Site, checksum_backend, transfer};
use router::admin::Request;

async fn links(site: &Site) -> u64 {
    let status = site.call(Request::Status).await.expect("status");
    status["links"].as_u64().unwrap_or(0)
}

/// Waits until `site` has refused `more` link connections than now (east redialling; its
/// backoff reaches 10 s, hence the long limit).
async fn refused_more(site: &Site, more: u64) {
    let refused = || async {
        let status = site.call(Request::Status).await.expect("status");
        status["linksRefused"].as_u64().expect("a count")
    };
    let before = refused().await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while refused().await < before + more {
        assert!(Instant::now() < deadline, "no redial refused within 30 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_site_is_cut_off_at_once_and_stays_out_until_invited_again() {
    // A fixed link-access port, so that the links find the hub again after its restart.
    let addr = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        probe.local_addr().expect("addr").to_string()
    };
    let hub = Site::start_on("hub", &addr).await;
    let east = Site::start("east", false).await;
    let north = Site::start("north", false).await;
    east.link_to(&hub).await;
    north.link_to(&hub).await;
    let (backend, _server) = checksum_backend().await;
    north.connector("db", "db", backend).await;
    let port = hub.listener("db", "db").await;

    let revoked_at = Instant::now();
    let done = hub
        .call(Request::LinkRevoke {
            site: "east".into(),
        })
        .await
        .expect("revoke");
    assert_eq!(done["revokedCredentials"], 1, "{done}");
    east.wait_for(|v| v["links"] == 0, Request::Status).await;
    let cut_after = revoked_at.elapsed();
    assert!(
        cut_after < Duration::from_secs(5),
        "cut after {cut_after:?}"
    );

    // east keeps redialling with the revoked credential, in vain; north is untouched. Wait
    // until the hub has refused two more of east's connections, then look.
    refused_more(&hub, 2).await;
    assert_eq!(
        links(&east).await,
        0,
        "a revoked credential does not come back"
    );
    assert_eq!(links(&north).await, 1);
    transfer(port, 1 << 20).await;

    // The revocation survives a restart of the issuing router.
    let mut hub = hub;
    hub.stop().await;
    hub.run().await;
    north.wait_for(|v| v["links"] == 1, Request::Status).await;
    refused_more(&hub, 1).await;
    assert_eq!(
        links(&east).await,
        0,
        "still revoked after the hub restarted"
    );

    // A new token invites east again with a new credential.
    east.call(Request::LinkDelete { name: "hub".into() })
        .await
        .expect("forget the old link");
    east.link_to(&hub).await;
    assert_eq!(links(&east).await, 1);
}

/// Whether a client at `port` is turned away (reset or closed before any answer) instead of
/// reaching the checksum backend behind it.
async fn turned_away(port: u16) -> bool {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let Ok(mut conn) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await else {
        return true;
    };
    let _ = conn.write_all(b"hello").await;
    let _ = conn.shutdown().await;
    let mut answer = Vec::new();
    match tokio::time::timeout(Duration::from_secs(5), conn.read_to_end(&mut answer)).await {
        Ok(Ok(_)) => answer.is_empty(),
        Ok(Err(_)) => true,
        Err(_) => false,
    }
}

/// The review's gap: revoking a site closed incoming links only, so a link the revoking site
/// dials to it stayed up and carried streams both ways. Now, whichever side dialled, and
/// through a third site: the hub neither sends to the revoked site nor serves streams from it,
/// and its dialer to it stops.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_site_is_cut_off_whichever_side_dialled() {
    let hub = Site::start("hub", true).await;
    let north = Site::start("north", true).await;
    let east = Site::start("east", true).await;
    hub.link_to(&north).await; // the hub dials north
    north.link_to(&east).await;
    east.link_to(&hub).await; // a second path, hub - east - north
    let (backend, _server) = checksum_backend().await;
    north.connector("db", "db", backend).await;
    hub.connector("web", "web", backend).await;
    let db_at_hub = hub.listener("db", "db").await;
    let web_at_north = north.listener("web", "web").await;
    transfer(db_at_hub, 1 << 16).await;
    transfer(web_at_north, 1 << 16).await;

    let done = hub
        .call(Request::LinkRevoke {
            site: "north".into(),
        })
        .await
        .expect("revoke");
    assert_eq!(done["stoppedLinks"], serde_json::json!(["north"]), "{done}");
    // The hub's own link to north goes and is not dialled again.
    hub.wait_for(
        |v| {
            v.as_array().is_some_and(|rows| {
                rows.iter()
                    .all(|r| r["peer"] != "north" || r["status"] != "up")
            })
        },
        Request::LinkStatus,
    )
    .await;
    // Nothing at the hub routes to north, not even through east.
    hub.wait_for(
        |v| {
            v.as_array()
                .is_some_and(|ls| ls.iter().all(|l| l["reachable"] == false))
        },
        Request::ListenerStatus,
    )
    .await;
    assert!(
        turned_away(db_at_hub).await,
        "the hub sent a stream to north"
    );
    // North still reaches the hub through east, and is refused there.
    assert!(
        turned_away(web_at_north).await,
        "a stream from north was served at the hub"
    );
    let links = hub.call(Request::LinkStatus).await.expect("links");
    assert!(
        links.to_string().contains("was revoked here"),
        "the stopped link says why: {links}"
    );
}
