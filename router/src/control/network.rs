//! This site's view of the network and what it tells its neighbours: the routing table, and
//! the link-state advertisements flooded over every link when it changes.
//!
//! The routing table sits behind one `Mutex` shared with forwarding (which chooses routes and
//! counts streams under it); it is a leaf lock, never held while a frame is sent.

use std::{
    collections::BTreeSet,
    sync::{Arc, Mutex},
};

use serde::Serialize;
use tracing::warn;

use crate::{
    forward::Forwarding,
    link::{
        Link,
        frame::{Frame, LinkState},
    },
    log_limit::LogLimit,
    routing::{self, Received, Routing},
};

/// The routing table and its floods.
pub struct Network {
    routing: Arc<Mutex<Routing>>,
    /// The link table floods go to.
    forwarding: Arc<Forwarding>,
    /// Link-state advertisements refused or refuted (a peer can send them in a loop).
    refusals: Mutex<LogLimit>,
}

impl std::fmt::Debug for Network {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Network").finish_non_exhaustive()
    }
}

/// One site as `skiff network status` shows it.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SiteView {
    pub site: String,
    pub cost: Option<u32>,
    pub reachable: bool,
    pub routing_keys: Vec<String>,
    pub links: Vec<PeerCost>,
    pub link_summary: Vec<String>,
}

/// A link of a site, and its cost.
#[derive(Debug, Serialize)]
pub struct PeerCost {
    pub peer: String,
    pub cost: u32,
}

impl Network {
    #[must_use]
    pub fn new(routing: Arc<Mutex<Routing>>, forwarding: Arc<Forwarding>) -> Self {
        Self {
            routing,
            forwarding,
            refusals: Mutex::new(LogLimit::default()),
        }
    }

    fn routing(&self) -> std::sync::MutexGuard<'_, Routing> {
        self.routing.lock().expect("routing lock")
    }

    /// Tells the network this site now has a connector for `key`.
    pub fn advertise_key(&self, key: &str) {
        let own = self.routing().add_local_key(key);
        self.flood(vec![own], None);
    }

    /// Tells the network this site no longer has a connector for `key` (unless another
    /// connector still serves it).
    pub fn withdraw_key(&self, key: &str) {
        let own = self.routing().remove_local_key(key);
        self.flood(vec![own], None);
    }

    /// Adds and removes several keys, and floods once: each advertisement carries the whole
    /// local state, so the last supersedes the rest.
    pub fn change_keys(&self, add: &[String], remove: &[String]) {
        let last = {
            let mut routing = self.routing();
            let mut last = None;
            for key in add {
                last = Some(routing.add_local_key(key));
            }
            for key in remove {
                last = Some(routing.remove_local_key(key));
            }
            last
        };
        if let Some(last) = last {
            self.flood(vec![last], None);
        }
    }

    /// Whether a stream for `key` has somewhere to go now.
    #[must_use]
    pub fn reachable(&self, key: &str) -> bool {
        self.routing().choose(key).is_some()
    }

    /// Routing neither sends to nor through `revoked`.
    pub fn exclude(&self, revoked: BTreeSet<String>) {
        self.routing().exclude(revoked);
    }

    /// A link to `link.peer` came up: when it is the first (`first`), this site's own state
    /// changes and is flooded to the others; the new neighbour learns everything known here.
    pub fn link_up(&self, link: &Arc<Link>, cost: u32, first: bool) {
        let (own, all) = {
            let mut routing = self.routing();
            let own = first.then(|| routing.link_up(&link.peer, cost));
            (own, routing.all_states())
        };
        if let Some(own) = own {
            self.flood(vec![own], Some(&link.peer));
        }
        let link = Arc::clone(link);
        tokio::spawn(async move {
            for state in all {
                if link.send(Frame::LinkState(state)).await.is_err() {
                    return;
                }
            }
        });
    }

    /// The last link to `peer` went down.
    pub fn link_down(&self, peer: &str) {
        let own = self.routing().link_down(peer);
        self.flood(vec![own], None);
    }

    /// A neighbour's advertisement: stored and flooded on when new; a copy of this site's
    /// own is refuted; a refused one is logged, at most once a second.
    pub fn receive(self: &Arc<Self>, from: &Arc<Link>, state: LinkState) {
        let received = self.routing().receive(state.clone());
        let refusal = match received {
            Received::New => {
                self.flood(vec![state], Some(&from.peer));
                return;
            }
            Received::Old => return,
            Received::Refuted(own) => {
                self.flood(vec![own], None);
                format!(
                    "a copy of this router's own link state numbered {}: re-originated above it",
                    state.seq
                )
            }
            Received::RefuteLater => {
                let network = Arc::clone(self);
                tokio::spawn(async move {
                    tokio::time::sleep(routing::REFUTE_EVERY).await;
                    let own = network.routing().refute_now();
                    network.flood(vec![own], None);
                });
                format!(
                    "another copy of this router's own link state numbered {} within {:?}: another site may use this site's name",
                    state.seq,
                    routing::REFUTE_EVERY
                )
            }
            Received::Refused(why) => why.to_string(),
        };
        let log = self.refusals.lock().expect("refusals lock").hit();
        if let Some(unlogged) = log {
            warn!(peer = %from.peer, unlogged, "link state refused: {refusal}");
        }
    }

    /// Every site this one knows of.
    #[must_use]
    pub fn view(&self) -> Vec<SiteView> {
        self.routing()
            .network()
            .into_iter()
            .map(|r| SiteView {
                link_summary: r
                    .links
                    .iter()
                    .map(|(n, c)| format!("{n}(cost {c})"))
                    .collect(),
                links: r
                    .links
                    .into_iter()
                    .map(|(peer, cost)| PeerCost { peer, cost })
                    .collect(),
                site: r.name,
                reachable: r.cost.is_some(),
                cost: r.cost,
                routing_keys: r.keys,
            })
            .collect()
    }

    /// Sends `states` to one connection of every linked site (except `skip`), in the
    /// background.
    fn flood(&self, states: Vec<LinkState>, skip: Option<&str>) {
        let links: Vec<Arc<Link>> = self
            .forwarding
            .links()
            .into_iter()
            .filter(|(peer, _)| Some(peer.as_str()) != skip)
            .filter_map(|(_, links)| links.first().cloned())
            .collect();
        for link in links {
            let states = states.clone();
            tokio::spawn(async move {
                for state in states {
                    if link.send(Frame::LinkState(state)).await.is_err() {
                        return;
                    }
                }
            });
        }
    }
}
