//! Revoking one site's link credential at the issuing site.

mod common;

use std::time::{Duration, Instant};

use common::{Site, checksum_backend, transfer};
use router::admin::Request;

async fn links(site: &Site) -> u64 {
    let status = site.call(Request::Status).await.expect("status");
    status["links"].as_u64().unwrap_or(0)
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

    // east keeps redialling with the revoked credential, in vain; north is untouched.
    tokio::time::sleep(Duration::from_secs(2)).await;
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
    tokio::time::sleep(Duration::from_secs(1)).await;
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
