//! cgroup/connect4 and cgroup/connect6: refuse (EPERM) a connect() to a protected listener
//! unless the caller's namespace may reach it.
//!
//! A caller's namespace is found by walking up its cgroup ancestors (at most
//! `MAX_CGROUP_DEPTH` levels) until one is a registered namespace root, so a cgroup created
//! under a root belongs to it at once, with nothing to update. Destinations are looked up
//! where the kernel delivers them (`ebpf_common::connect_destination`): unspecified addresses
//! and all of 127.0.0.0/8 fold into loopback, and loopback counts only for callers in the
//! router's own network namespace (elsewhere it is that namespace's own host). Userspace
//! registers a wildcard listener under every local address, and again as addresses come.

use core::ptr::read_volatile;

use aya_ebpf::{
    helpers::{
        bpf_get_current_ancestor_cgroup_id, bpf_get_current_cgroup_id, bpf_get_netns_cookie,
    },
    macros::{cgroup_sock_addr, map},
    maps::{HashMap, PerCpuArray, RingBuf},
    programs::SockAddrContext,
};
use ebpf_common::{
    AllowKey, DenyEvent, EndpointKey, ISOLATION_MAX_ENTRIES, IsolationCounter, MAX_CGROUP_DEPTH,
    NO_NAMESPACE, connect_destination, v4_mapped,
};

use crate::maps::{read_ip6, router_netns};

#[map]
static SKIFF_PROTECTED: HashMap<EndpointKey, u32> =
    HashMap::with_max_entries(ISOLATION_MAX_ENTRIES, 0);

#[map]
static SKIFF_NAMESPACES: HashMap<u64, u32> = HashMap::with_max_entries(ISOLATION_MAX_ENTRIES, 0);

#[map]
static SKIFF_ALLOWED: HashMap<AllowKey, u8> = HashMap::with_max_entries(ISOLATION_MAX_ENTRIES, 0);

#[map]
static SKIFF_DENY_EVENTS: RingBuf = RingBuf::with_byte_size(64 * 1024, 0);

#[map]
static SKIFF_ISOLATION_COUNTERS: PerCpuArray<u64> =
    PerCpuArray::with_max_entries(IsolationCounter::COUNT, 0);

/// The verdicts cgroup_sock_addr programs return.
const ALLOW: i32 = 1;
const DENY: i32 = 0;

#[cgroup_sock_addr(connect4)]
pub fn skiff_connect4(ctx: SockAddrContext) -> i32 {
    // SAFETY: connect4 programs may read user_ip4 and user_port.
    let (ip4, port) = unsafe {
        (
            read_volatile(&raw const (*ctx.sock_addr).user_ip4),
            read_volatile(&raw const (*ctx.sock_addr).user_port),
        )
    };
    verdict(&ctx, v4_mapped(ip4), port)
}

#[cgroup_sock_addr(connect6)]
pub fn skiff_connect6(ctx: SockAddrContext) -> i32 {
    // SAFETY: connect6 programs may read user_ip6 and user_port.
    let (ip6, port) = unsafe {
        (
            read_ip6(&raw const (*ctx.sock_addr).user_ip6),
            read_volatile(&raw const (*ctx.sock_addr).user_port),
        )
    };
    verdict(&ctx, ip6, port)
}

fn verdict(ctx: &SockAddrContext, ip: [u32; 4], raw_port: u32) -> i32 {
    let port = u32::from(u16::from_be(raw_port as u16));
    let (ip, loopback) = connect_destination(ip);
    // Without the router's cookie, loopback counts in every namespace.
    if loopback && let Some(router_netns) = router_netns() {
        // SAFETY: connect hooks may call bpf_get_netns_cookie with their own context.
        if unsafe { bpf_get_netns_cookie(ctx.sock_addr.cast()) } != router_netns {
            return ALLOW;
        }
    }
    // SAFETY: plain lookups; the values are Copy and read at once.
    let Some(listener) = (unsafe { SKIFF_PROTECTED.get(EndpointKey { ip, port }) }).copied() else {
        return ALLOW;
    };
    let namespace = caller_namespace();
    let allowed = AllowKey {
        listener,
        namespace,
    };
    // SAFETY: as above.
    if unsafe { SKIFF_ALLOWED.get(allowed) }.is_some() {
        count(IsolationCounter::Allowed);
        return ALLOW;
    }
    count(IsolationCounter::Denied);
    // SAFETY: bpf_get_current_cgroup_id has no preconditions.
    let cgroup = unsafe { bpf_get_current_cgroup_id() };
    let event = DenyEvent {
        cgroup,
        namespace,
        listener,
        ip,
        port,
        _pad: 0,
    };
    if SKIFF_DENY_EVENTS.output::<DenyEvent>(&event, 0).is_err() {
        count(IsolationCounter::EventsLost);
    }
    DENY
}

/// The namespace of the nearest registered ancestor of the caller's cgroup.
#[inline(always)]
fn caller_namespace() -> u32 {
    // The deepest ancestor is the cgroup itself; walk towards the root.
    let mut level = MAX_CGROUP_DEPTH;
    while level >= 0 {
        // SAFETY: any level is accepted; beyond the cgroup's depth the helper returns 0.
        let id = unsafe { bpf_get_current_ancestor_cgroup_id(level) };
        if id != 0 {
            // SAFETY: plain lookup, value copied at once.
            if let Some(namespace) = unsafe { SKIFF_NAMESPACES.get(id) } {
                return *namespace;
            }
        }
        level -= 1;
    }
    NO_NAMESPACE
}

#[inline(always)]
fn count(counter: IsolationCounter) {
    if let Some(value) = SKIFF_ISOLATION_COUNTERS.get_ptr_mut(counter as u32) {
        // SAFETY: this CPU's slot of a live map value; programs do not preempt each other.
        unsafe { *value += 1 };
    }
}
