//! Link-state routing.
//!
//! Every router floods a [`LinkState`]: its links (neighbour, cost) and the routing keys it has
//! connectors for, with a sequence number that grows with each change. Every router keeps the
//! newest state of every other router, and computes shortest paths (Dijkstra over summed costs).
//! An edge counts only when both ends list it, so a dead router's stale advertisement cannot
//! attract traffic. New streams for a key go to the cheapest reachable routers that advertise
//! it, and among those to the one with the fewest outstanding streams from here.
//!
//! Sequence numbers are a peer's input, so they are bounded before they are compared: a router
//! numbers its advertisements with its clock in microseconds (never less than the last number
//! plus one), and refuses any advertisement numbered more than [`SEQ_AHEAD`] past its own
//! clock. A forged or replayed copy of this router's own advertisement is never stored: when
//! its number reaches this router's, the router re-originates above it (the "fight back" of
//! OSPF and IS-IS), which the bound keeps possible and which refutes the forgery everywhere the
//! flood reaches. docs/security.md says what this does and does not protect against.

use std::{
    cmp::Reverse,
    collections::{BTreeMap, BTreeSet, BinaryHeap, HashMap},
    time::{Duration, SystemTime},
};

use crate::link::frame::LinkState;

/// How far past this router's clock a received advertisement may be numbered. Sites' clocks
/// must agree this closely anyway: their certificates are checked against them.
pub const SEQ_AHEAD: Duration = Duration::from_secs(600);

/// Microseconds since the Unix epoch: where a router's own sequence numbers start.
fn clock_micros() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

/// What became of a received advertisement.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Received {
    /// Newer than what was known: stored, to be flooded on.
    New,
    /// Not newer than what is known: dropped.
    Old,
    /// A copy of this router's own advertisement at or above its current number: dropped, and
    /// this router re-originated above it; flood the returned state to every neighbour.
    Refuted(LinkState),
    /// As `Refuted`, but this router refuted another copy less than [`REFUTE_EVERY`] ago:
    /// flood [`Routing::refute_now`]'s state once that has passed. Two routers that claim one
    /// name would otherwise outbid each other as fast as the flood goes round.
    RefuteLater,
    /// Refused without being stored or flooded.
    Refused(Refusal),
}

/// How often a router re-originates to refute copies of its own state (OSPF's MinLSInterval
/// plays this part).
pub const REFUTE_EVERY: Duration = Duration::from_secs(1);

/// Why an advertisement was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("link state of {origin} numbered {seq}, more than {}s past this router's clock ({limit})", SEQ_AHEAD.as_secs())]
    AheadOfClock {
        origin: String,
        seq: u64,
        limit: u64,
    },
}

/// Where a new stream for a key goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    /// The router whose connector serves the stream.
    pub dest: String,
    /// The neighbour to send it to, or `None` when `dest` is this router.
    pub next_hop: Option<String>,
    pub cost: u32,
}

/// One router as this router sees it, for `skiff network status`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RouterView {
    pub name: String,
    /// Path cost from here; `None` when unreachable.
    pub cost: Option<u32>,
    /// Routing keys it has connectors for.
    pub keys: Vec<String>,
    /// Its links: (neighbour, cost).
    pub links: Vec<(String, u32)>,
}

/// A router's view of the network.
#[derive(Debug)]
pub struct Routing {
    me: String,
    seq: u64,
    neighbors: BTreeMap<String, u32>,
    local_keys: BTreeMap<String, usize>,
    states: HashMap<String, LinkState>,
    /// router -> (cost, first hop); recomputed on every change.
    paths: HashMap<String, (u32, Option<String>)>,
    outstanding: HashMap<String, usize>,
    /// Where sequence numbers come from: the clock in microseconds (replaced in tests).
    clock: fn() -> u64,
    /// Routers this one neither sends to nor routes through (revoked sites).
    excluded: BTreeSet<String>,
    /// When this router last refuted a copy of its state, and whether a refutation waits.
    last_refuted: Option<std::time::Instant>,
    refute_pending: bool,
}

impl Routing {
    /// A router named `me` with no links and no keys.
    #[must_use]
    pub fn new(me: &str) -> Self {
        Self::with_clock(me, clock_micros)
    }

    /// As [`Self::new`], numbering advertisements and bounding received ones with `clock`
    /// (microseconds).
    #[must_use]
    pub fn with_clock(me: &str, clock: fn() -> u64) -> Self {
        let mut routing = Self {
            me: me.to_owned(),
            seq: 0,
            neighbors: BTreeMap::new(),
            local_keys: BTreeMap::new(),
            states: HashMap::new(),
            paths: HashMap::new(),
            outstanding: HashMap::new(),
            clock,
            excluded: BTreeSet::new(),
            last_refuted: None,
            refute_pending: false,
        };
        routing.seq = (routing.clock)();
        routing.recompute();
        routing
    }

    /// This router's current advertisement; every call after a change carries a higher `seq`.
    #[must_use]
    pub fn own_state(&self) -> LinkState {
        LinkState {
            origin: self.me.clone(),
            seq: self.seq,
            links: self
                .neighbors
                .iter()
                .map(|(n, c)| (n.clone(), *c))
                .collect(),
            keys: self.local_keys.keys().cloned().collect(),
        }
    }

    /// Every advertisement known, this router's own included: what a new neighbour is sent.
    #[must_use]
    pub fn all_states(&self) -> Vec<LinkState> {
        let mut all: Vec<LinkState> = self.states.values().cloned().collect();
        all.push(self.own_state());
        all
    }

    fn changed(&mut self) {
        self.renumber(self.seq);
        self.recompute();
    }

    /// Numbers the next advertisement above `floor` and above the last one, by the clock when
    /// it is ahead. `floor` is at most the clock plus [`SEQ_AHEAD`], so this cannot overflow
    /// in practice; it saturates rather than wraps all the same.
    fn renumber(&mut self, floor: u64) {
        self.seq = floor.max(self.seq).saturating_add(1).max((self.clock)());
    }

    /// A link to `peer` came up (or its cost changed). Returns the advertisement to flood.
    pub fn link_up(&mut self, peer: &str, cost: u32) -> LinkState {
        self.neighbors.insert(peer.to_owned(), cost);
        self.changed();
        self.own_state()
    }

    /// The last link to `peer` went down. Returns the advertisement to flood.
    pub fn link_down(&mut self, peer: &str) -> LinkState {
        self.neighbors.remove(peer);
        self.changed();
        self.own_state()
    }

    /// A connector for `key` was added here. Returns the advertisement to flood.
    pub fn add_local_key(&mut self, key: &str) -> LinkState {
        *self.local_keys.entry(key.to_owned()).or_default() += 1;
        self.changed();
        self.own_state()
    }

    /// A connector for `key` was removed here. Returns the advertisement to flood.
    pub fn remove_local_key(&mut self, key: &str) -> LinkState {
        if let Some(n) = self.local_keys.get_mut(key) {
            *n -= 1;
            if *n == 0 {
                self.local_keys.remove(key);
            }
        }
        self.changed();
        self.own_state()
    }

    /// Sets the routers this one must neither send streams to nor route through.
    pub fn exclude(&mut self, routers: BTreeSet<String>) {
        self.excluded = routers;
        self.recompute();
    }

    /// Takes in a received advertisement.
    pub fn receive(&mut self, state: LinkState) -> Received {
        let limit = (self.clock)().saturating_add(SEQ_AHEAD.as_micros() as u64);
        if state.seq > limit {
            return Received::Refused(Refusal::AheadOfClock {
                origin: state.origin,
                seq: state.seq,
                limit,
            });
        }
        if state.origin == self.me {
            // A copy of ours: from before a restart, replayed, or forged. Never stored; when
            // it is not older than ours, ours must win again everywhere.
            if state.seq >= self.seq {
                self.renumber(state.seq);
                self.recompute();
                let now = std::time::Instant::now();
                if self
                    .last_refuted
                    .is_some_and(|t| now.duration_since(t) < REFUTE_EVERY)
                {
                    if std::mem::replace(&mut self.refute_pending, true) {
                        return Received::Old;
                    }
                    return Received::RefuteLater;
                }
                self.last_refuted = Some(now);
                return Received::Refuted(self.own_state());
            }
            return Received::Old;
        }
        let newer = self
            .states
            .get(&state.origin)
            .is_none_or(|known| state.seq > known.seq);
        if !newer {
            return Received::Old;
        }
        self.states.insert(state.origin.clone(), state);
        self.recompute();
        Received::New
    }

    /// The state to flood for a refutation that waited ([`Received::RefuteLater`]).
    pub fn refute_now(&mut self) -> LinkState {
        self.refute_pending = false;
        self.last_refuted = Some(std::time::Instant::now());
        self.own_state()
    }

    fn links_of(&self, router: &str) -> Vec<(String, u32)> {
        if router == self.me {
            return self
                .neighbors
                .iter()
                .map(|(n, c)| (n.clone(), *c))
                .collect();
        }
        self.states
            .get(router)
            .map(|s| s.links.clone())
            .unwrap_or_default()
    }

    fn lists(&self, router: &str, neighbor: &str) -> bool {
        self.links_of(router).iter().any(|(n, _)| n == neighbor)
    }

    fn recompute(&mut self) {
        let mut paths: HashMap<String, (u32, Option<String>)> = HashMap::new();
        let mut heap = BinaryHeap::new();
        heap.push(Reverse((0u32, self.me.clone(), None::<String>)));
        while let Some(Reverse((cost, router, first_hop))) = heap.pop() {
            if paths.contains_key(&router) {
                continue;
            }
            paths.insert(router.clone(), (cost, first_hop.clone()));
            for (neighbor, link_cost) in self.links_of(&router) {
                if paths.contains_key(&neighbor)
                    || self.excluded.contains(&neighbor)
                    || !self.lists(&neighbor, &router)
                {
                    continue;
                }
                let hop = first_hop.clone().or_else(|| Some(neighbor.clone()));
                heap.push(Reverse((
                    cost.saturating_add(link_cost.max(1)),
                    neighbor,
                    hop,
                )));
            }
        }
        self.paths = paths;
    }

    /// The neighbour to forward a stream for `dest` to (`None` if unreachable or local).
    #[must_use]
    pub fn next_hop(&self, dest: &str) -> Option<String> {
        self.paths.get(dest).and_then(|(_, hop)| hop.clone())
    }

    /// Routers that are reachable and advertise `key`, with their costs.
    fn candidates(&self, key: &str) -> Vec<(u32, String)> {
        let mut out = Vec::new();
        if self.local_keys.contains_key(key) {
            out.push((0, self.me.clone()));
        }
        for (origin, state) in &self.states {
            if state.keys.iter().any(|k| k == key)
                && let Some((cost, _)) = self.paths.get(origin)
            {
                out.push((*cost, origin.clone()));
            }
        }
        out
    }

    /// Chooses where a new stream for `key` goes: the cheapest routers, then the one with the
    /// fewest outstanding streams. Call [`Self::stream_started`] when the stream opens.
    #[must_use]
    pub fn choose(&self, key: &str) -> Option<Route> {
        let candidates = self.candidates(key);
        let cheapest = candidates.iter().map(|(c, _)| *c).min()?;
        let (cost, dest) = candidates
            .into_iter()
            .filter(|(c, _)| *c == cheapest)
            .min_by_key(|(_, r)| (self.outstanding.get(r).copied().unwrap_or(0), r.clone()))?;
        let next_hop = if dest == self.me {
            None
        } else {
            self.next_hop(&dest)
        };
        Some(Route {
            dest,
            next_hop,
            cost,
        })
    }

    /// Counts a stream this router started towards `dest`.
    pub fn stream_started(&mut self, dest: &str) {
        *self.outstanding.entry(dest.to_owned()).or_default() += 1;
    }

    /// Uncounts a stream started with [`Self::stream_started`].
    pub fn stream_ended(&mut self, dest: &str) {
        if let Some(n) = self.outstanding.get_mut(dest) {
            *n = n.saturating_sub(1);
        }
    }

    /// Every router this one knows of.
    #[must_use]
    pub fn network(&self) -> Vec<RouterView> {
        let mut routers: BTreeSet<&String> = self.states.keys().collect();
        routers.insert(&self.me);
        routers
            .into_iter()
            .map(|r| {
                let cost = self.paths.get(r).map(|(c, _)| *c);
                let (keys, links) = if *r == self.me {
                    let own = self.own_state();
                    (own.keys, own.links)
                } else {
                    let s = &self.states[r];
                    (s.keys.clone(), s.links.clone())
                };
                RouterView {
                    name: r.clone(),
                    cost,
                    keys,
                    links,
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(origin: &str, seq: u64, links: &[(&str, u32)], keys: &[&str]) -> LinkState {
        LinkState {
            origin: origin.into(),
            seq,
            links: links.iter().map(|(n, c)| ((*n).into(), *c)).collect(),
            keys: keys.iter().map(|k| (*k).into()).collect(),
        }
    }

    /// a - b - c, with the key at c: a reaches it through b.
    #[test]
    fn multi_hop_route_goes_through_the_middle_router() {
        let mut a = Routing::new("a");
        let _ = a.link_up("b", 1);
        assert_eq!(
            a.receive(state("b", 1, &[("a", 1), ("c", 1)], &[])),
            Received::New
        );
        assert_eq!(
            a.receive(state("c", 1, &[("b", 1)], &["db"])),
            Received::New
        );
        let route = a.choose("db").expect("route");
        assert_eq!(route.dest, "c");
        assert_eq!(route.next_hop.as_deref(), Some("b"));
        assert_eq!(route.cost, 2);
    }

    #[test]
    fn cheaper_path_wins_and_one_sided_edges_do_not_count() {
        let mut a = Routing::new("a");
        let _ = a.link_up("b", 1);
        let _ = a.link_up("c", 10);
        a.receive(state("b", 1, &[("a", 1), ("c", 1)], &[]));
        a.receive(state("c", 1, &[("a", 10), ("b", 1)], &["db"]));
        assert_eq!(
            a.choose("db").expect("route").next_hop.as_deref(),
            Some("b")
        );
        // b drops its link to c, but c has not noticed yet: the edge is one-sided, so unused.
        a.receive(state("b", 2, &[("a", 1)], &[]));
        assert_eq!(
            a.choose("db").expect("route").next_hop.as_deref(),
            Some("c")
        );
    }

    #[test]
    fn streams_balance_among_equally_cheap_connectors() {
        let mut a = Routing::new("a");
        let _ = a.link_up("b", 1);
        let _ = a.link_up("c", 1);
        a.receive(state("b", 1, &[("a", 1)], &["web"]));
        a.receive(state("c", 1, &[("a", 1)], &["web"]));
        let first = a.choose("web").expect("route").dest;
        a.stream_started(&first);
        let second = a.choose("web").expect("route").dest;
        assert_ne!(first, second);
        a.stream_started(&second);
        a.stream_ended(&first);
        assert_eq!(a.choose("web").expect("route").dest, first);
    }

    #[test]
    fn local_connector_is_cheapest_and_dead_router_is_unreachable() {
        let mut a = Routing::new("a");
        let _ = a.link_up("b", 1);
        a.receive(state("b", 1, &[("a", 1)], &["web"]));
        assert_eq!(a.choose("web").expect("route").dest, "b");
        let _ = a.add_local_key("web");
        assert_eq!(a.choose("web").expect("route").next_hop, None);
        let _ = a.remove_local_key("web");
        let _ = a.link_down("b");
        assert_eq!(a.choose("web"), None);
    }

    /// A revoked router is neither a destination nor a transit: a - b - c with the key at c
    /// and at b; excluding b leaves no route to either.
    #[test]
    fn excluded_routers_are_neither_served_nor_crossed() {
        let mut a = Routing::new("a");
        let _ = a.link_up("b", 1);
        a.receive(state("b", 1, &[("a", 1), ("c", 1)], &["web"]));
        a.receive(state("c", 1, &[("b", 1)], &["db"]));
        assert!(a.choose("db").is_some() && a.choose("web").is_some());
        a.exclude(["b".to_owned()].into());
        assert_eq!(a.choose("db"), None);
        assert_eq!(a.choose("web"), None);
        a.exclude(BTreeSet::new());
        assert_eq!(
            a.choose("db").expect("route").next_hop.as_deref(),
            Some("b")
        );
    }

    #[test]
    fn old_advertisements_are_ignored() {
        let mut a = Routing::new("a");
        assert_eq!(a.receive(state("b", 5, &[], &["x"])), Received::New);
        assert_eq!(a.receive(state("b", 4, &[], &[])), Received::Old);
        assert_eq!(a.receive(state("b", 5, &[], &[])), Received::Old);
    }

    const NOW: u64 = 1_000_000_000;
    fn fixed_clock() -> u64 {
        NOW
    }

    /// The review's frame: a sequence number at the top of the range, for a third site and for
    /// the receiver itself. Neither is stored or flooded, nothing overflows, and the third
    /// site's real advertisements still count.
    #[test]
    fn sequence_numbers_far_past_the_clock_are_refused() {
        let mut a = Routing::with_clock("a", fixed_clock);
        let ahead = NOW + SEQ_AHEAD.as_micros() as u64 + 1;
        for origin in ["c", "a"] {
            for seq in [u64::MAX, ahead] {
                assert!(matches!(
                    a.receive(state(origin, seq, &[], &["stolen"])),
                    Received::Refused(Refusal::AheadOfClock { .. })
                ));
            }
        }
        assert_eq!(a.receive(state("c", NOW, &[], &["db"])), Received::New);
        assert_eq!(
            a.network()
                .iter()
                .find(|r| r.name == "c")
                .map(|r| r.keys.clone()),
            Some(vec!["db".to_owned()])
        );
        assert!(a.own_state().seq <= NOW + 1);
    }

    /// A copy of a router's own advertisement never replaces it: at or above its number, the
    /// router re-originates above it; below, it is old news.
    #[test]
    fn a_forged_own_advertisement_is_refuted_not_stored() {
        let mut a = Routing::with_clock("a", fixed_clock);
        let _ = a.add_local_key("web");
        let forged = NOW + SEQ_AHEAD.as_micros() as u64 - 100;
        let Received::Refuted(own) = a.receive(state("a", forged, &[("evil", 1)], &[])) else {
            panic!("not refuted");
        };
        assert_eq!(own.seq, forged + 1);
        assert_eq!(own.keys, vec!["web".to_owned()]);
        assert!(own.links.is_empty());
        assert_eq!(a.receive(state("a", 5, &[], &[])), Received::Old);
        // Another site under the same name outbids at once: the next refutation waits, and
        // copies in the meantime add nothing; the waiting one is numbered above them all.
        assert_eq!(
            a.receive(state("a", forged + 5, &[], &[])),
            Received::RefuteLater
        );
        assert_eq!(a.receive(state("a", forged + 9, &[], &[])), Received::Old);
        assert_eq!(a.refute_now().seq, forged + 10);
        // Later changes keep numbering above the refutation.
        assert!(a.link_up("b", 1).seq > forged + 1);
    }

    /// Own numbers follow the clock, so a restarted router starts above what it sent before.
    #[test]
    fn own_sequence_numbers_start_at_the_clock_and_always_grow() {
        let mut a = Routing::with_clock("a", fixed_clock);
        assert_eq!(a.own_state().seq, NOW);
        let first = a.link_up("b", 1).seq;
        let second = a.link_down("b").seq;
        assert!(NOW < first && first < second);
        let b = Routing::new("b");
        assert!(
            b.own_state().seq > 1_600_000_000_000_000,
            "microseconds since 1970"
        );
    }
}
