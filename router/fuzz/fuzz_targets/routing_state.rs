//! Drives one router's link-state database with what an authenticated peer may send (any
//! sequence of LinkState frames, decoded from the input as from a link) interleaved with its
//! own link and connector changes, and checks the invariants the review broke: nothing panics
//! (no unchecked arithmetic on a peer's number), the router's own advertisement always numbers
//! above any copy of it it accepted and grows with every change, no copy of it is ever stored
//! in place of its own, and no stored state is numbered past the clock's bound.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use router::{
    link::frame::{self, Frame},
    routing::{Received, Routing, SEQ_AHEAD},
};

const NOW: u64 = 1_800_000_000_000_000;

fn clock() -> u64 {
    NOW
}

fuzz_target!(|input: &[u8]| {
    let mut me = Routing::with_clock("me", clock);
    let limit = NOW + SEQ_AHEAD.as_micros() as u64;
    let mut last_own = me.own_state().seq;
    // Bytes before the first 0xff are local operations; the rest is the peer's frame stream.
    let split = input.iter().position(|b| *b == 0xff).unwrap_or(input.len());
    let (ops, frames) = input.split_at(split);
    let mut ops = ops.iter().copied().cycle().take(ops.len() * 4);
    let mut buf = BytesMut::from(frames.get(1..).unwrap_or_default());
    while let Ok(Some(frame)) = frame::decode(&mut buf) {
        if let Some(op) = ops.next() {
            let peer = ["a", "b", "c", "me"][usize::from(op & 3)];
            let own = match op >> 2 & 3 {
                0 if peer != "me" => Some(me.link_up(peer, u32::from(op >> 4))),
                1 if peer != "me" => Some(me.link_down(peer)),
                2 => Some(me.add_local_key(peer)),
                3 => Some(me.remove_local_key(peer)),
                _ => None,
            };
            if let Some(own) = own {
                assert!(own.seq > last_own, "own advertisement did not grow");
                last_own = own.seq;
            }
        }
        let Frame::LinkState(state) = frame else { continue };
        let copy_of_me = state.origin == "me";
        let seq = state.seq;
        match me.receive(state) {
            Received::Refuted(own) => {
                assert!(copy_of_me && own.seq > seq);
                last_own = own.seq;
            }
            Received::RefuteLater => {
                assert!(copy_of_me);
                let own = me.refute_now();
                assert!(own.seq > seq);
                last_own = own.seq;
            }
            Received::New => assert!(!copy_of_me && seq <= limit),
            Received::Old | Received::Refused(_) => {}
        }
        assert!(me.own_state().seq >= last_own);
        for view in me.network() {
            if view.name == "me" {
                let own = me.own_state();
                assert_eq!((view.keys, view.links), (own.keys, own.links), "a copy replaced our own state");
            }
        }
        let _ = me.choose("a");
    }
});
