//! What an authenticated but hostile peer can and cannot do to a router: it holds a real link
//! credential and speaks the protocol by hand (`common::peer`), sending what a real router
//! never would. Every test checks that the router refuses the input and keeps serving.

mod common;

use std::time::{Duration, SystemTime};

use common::{Site, peer};
use router::{
    admin::Request,
    link::frame::{Frame, LinkState},
};
use serde_json::Value;

fn micros_now() -> u64 {
    let since = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .expect("clock after 1970");
    u64::try_from(since.as_micros()).expect("fits")
}

fn keys_of<'a>(network: &'a Value, site: &str) -> Option<&'a Value> {
    network
        .as_array()?
        .iter()
        .find(|r| r["site"] == site)
        .map(|r| &r["routingKeys"])
}

/// The review's frame: `LinkState` at the top of the sequence space, for the receiver itself
/// and for a third site, then a copy of the receiver's own state just inside the bound. The
/// receiver neither crashes nor stores them; the third site's real advertisements still
/// count, at the receiver and at a router one hop further.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_link_state_neither_crashes_nor_poisons_the_network() {
    let west = Site::start("west", true).await;
    let east = Site::start("east", false).await;
    east.link_to(&west).await;
    let mut evil = peer::linked_peer(&west, "evil").await;

    for origin in ["west", "east"] {
        peer::send(
            &mut evil,
            Frame::LinkState(LinkState {
                origin: origin.into(),
                seq: u64::MAX,
                links: vec![("evil".into(), 1)],
                keys: vec!["stolen".into()],
            }),
        )
        .await;
    }
    // Just inside the bound: west must re-originate above it, and east must believe west.
    peer::send(
        &mut evil,
        Frame::LinkState(LinkState {
            origin: "west".into(),
            seq: micros_now() + 60_000_000,
            links: vec![],
            keys: vec!["stolen".into()],
        }),
    )
    .await;

    // East's next advertisement (a new connector) reaches west and is believed.
    east.connector("db", "db", 9).await;
    let network = west
        .wait_for(
            |v| keys_of(v, "east").is_some_and(|k| k.to_string().contains("\"db\"")),
            Request::NetworkStatus,
        )
        .await;
    assert!(!network.to_string().contains("stolen"), "{network}");
    // East's view of west is west's own, not the forgery: west lists its link to east.
    east.wait_for(
        |v| {
            v.as_array().is_some_and(|rows| {
                rows.iter().any(|r| {
                    r["site"] == "west"
                        && r["links"].to_string().contains("\"east\"")
                        && !r["routingKeys"].to_string().contains("stolen")
                })
            })
        },
        Request::NetworkStatus,
    )
    .await;
    // The connection that carried them stays up: refusing an advertisement is not a
    // protocol error. West answers a Ping on it.
    peer::send(&mut evil, Frame::Ping { nonce: 7 }).await;
    assert!(peer::pong(&mut evil, 7, Duration::from_secs(5)).await);
}
