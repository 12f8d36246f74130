//! sock_ops: puts established TCP sockets that involve a registered endpoint into the sockhash.
//!
//! Both ends of a local connection pass through here when they live in the attached cgroup:
//! the connecting side (`ACTIVE_ESTABLISHED`, remote end is the endpoint) and the accepted side
//! (`PASSIVE_ESTABLISHED`, local end is the endpoint). With both in the map, sk_msg can move
//! bytes from one to the other.
//!
//! Only connections with the router at one end are taken, in the router's own network
//! namespace: for a listener, the router accepted the connection (it owns the listener's
//! port there), and the client reached this host (the listener's exact address, loopback, or
//! its own address); for a backend, the connecting socket is one the router registered
//! (`SKIFF_ROUTER_SOCKETS`) and the backend's end is that socket's peer (`SKIFF_ROUTER_ENDS`).
//! Anything else is counted (`SocksForeign`) and left to TCP.
//!
//! The workload end of each connection also gets an entry in the sent map, which sk_msg
//! keeps and the router's shortcuts rely on (see `ebpf_common::Shortcut`), and every taken
//! socket gets its kernel address recorded, where sk_msg reads how much it holds unread. The
//! program asks for the socket's state changes and removes its entries when it closes.

use aya_ebpf::{
    bindings::{
        BPF_ANY, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB,
        BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG, BPF_TCP_CLOSE,
    },
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_probe_read_kernel},
    macros::sock_ops,
    programs::SockOpsContext,
};
use ebpf_common::{Counter, EndpointKind, LOOPBACK_V6, Sent, SockKey, V4_MAPPED_PREFIX};

use core::ptr::read_volatile;

use crate::maps::{
    SKIFF_DIVERTED, SKIFF_ROUTER_ENDS, SKIFF_ROUTER_SOCKETS, SKIFF_SENT, SKIFF_SOCK_ADDRS,
    SKIFF_SOCKS, count, endpoint_kind, key_ip, read_ip6, remote_port, rmem_alloc_offset,
    router_netns,
};

/// The return value means nothing for these callbacks; 1 is what the kernel documents as "ok".
#[sock_ops]
pub fn skiff_sock_ops(ctx: SockOpsContext) -> u32 {
    if let Err(counter) = try_sock_ops(&ctx) {
        count(counter, 1);
    }
    1
}

fn try_sock_ops(ctx: &SockOpsContext) -> Result<(), Counter> {
    match ctx.op() {
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB => established(ctx, true),
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => established(ctx, false),
        BPF_SOCK_OPS_STATE_CB => {
            // SAFETY: ops is the live bpf_sock_ops; a state callback carries the new state in
            // args[1]. One load of its own, as for every context field (see sk_msg.rs).
            let new_state =
                unsafe { read_volatile(&raw const (*ctx.ops).__bindgen_anon_1.args[1]) };
            if new_state == BPF_TCP_CLOSE
                && let Some(key) = sock_key(ctx)
            {
                let _ = SKIFF_SENT.remove(key);
                let _ = SKIFF_SOCK_ADDRS.remove(key);
                // sk_msg may have diverted it; the mark goes with the sender.
                let _ = SKIFF_DIVERTED.remove(key);
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

fn established(ctx: &SockOpsContext, passive: bool) -> Result<(), Counter> {
    let Some(key) = sock_key(ctx) else {
        return Ok(());
    };
    let kind = if passive {
        endpoint_kind(key.local_ip, key.local_port)
    } else {
        endpoint_kind(key.remote_ip, key.remote_port)
    };
    let Some((kind, exact)) = kind else {
        return Ok(());
    };
    if !routers_own(ctx, &key, kind, exact, passive) {
        return Err(Counter::SocksForeign);
    }
    // A new connection never inherits the diverted mark of an earlier one with the same key.
    let _ = SKIFF_DIVERTED.remove(key);
    // SAFETY: ops is the live bpf_sock_ops the kernel passed to this program.
    SKIFF_SOCKS
        .update(key, unsafe { &mut *ctx.ops }, u64::from(BPF_ANY))
        .map_err(|_| Counter::SocksInsertFailed)?;
    count(Counter::SocksInserted, 1);
    // The workload end (a client connecting to a listener, a backend accepting the router's
    // connection) gets a fresh count of what it sends; the router's own sockets need none.
    let workload = if passive {
        kind == EndpointKind::Backend as u32
    } else {
        kind == EndpointKind::Listener as u32
    };
    let counted = workload
        && SKIFF_SENT
            .insert(key, Sent::default(), u64::from(BPF_ANY))
            .is_ok();
    let located = rmem_alloc_offset().is_some();
    if !counted && !located {
        return Ok(());
    }
    // Entries made here go when the socket closes, which only the state callback tells;
    // without it (map full, or no callbacks) the socket gets no shortcut and no bound in sk_msg.
    let flags = ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG;
    if ctx.set_cb_flags(flags as i32).is_err() {
        if counted {
            let _ = SKIFF_SENT.remove(key);
        }
        return Ok(());
    }
    // sk_msg reads the socket's receive-queue charge there: a workload's, to bound shortcuts
    // into it; a router socket's, to bound what its workload redirects into it.
    if located && let Some(addr) = socket_address(ctx) {
        let _ = SKIFF_SOCK_ADDRS.insert(key, addr, u64::from(BPF_ANY));
    }
    Ok(())
}

/// Whether the router is at one end of this connection, in its own network namespace.
fn routers_own(ctx: &SockOpsContext, key: &SockKey, kind: u32, exact: bool, passive: bool) -> bool {
    if router_netns().is_some_and(|netns| netns != key.netns) {
        return false;
    }
    match (kind == EndpointKind::Listener as u32, passive) {
        // The router accepted it: no one else can listen on the router's port here.
        (true, true) => true,
        // A client of a listener registered at any address: it must have reached this host,
        // not some other host's same port.
        (true, false) => exact || key.remote_ip == key.local_ip || is_loopback(key.remote_ip),
        // The router connecting to a backend: a socket it registered before connect().
        (false, false) => {
            // SAFETY: sock_ops may call bpf_get_socket_cookie with its own context.
            let cookie = unsafe { bpf_get_socket_cookie(ctx.ops.cast()) };
            // SAFETY: a plain lookup; the value is not kept.
            if unsafe { SKIFF_ROUTER_SOCKETS.get(cookie) }.is_none() {
                return false;
            }
            // The backend's end is established after this one (it needs this end's ACK).
            SKIFF_ROUTER_ENDS.insert(key, 1, u64::from(BPF_ANY)).is_ok()
        }
        // The backend accepting: only from a router socket established just before.
        (false, true) => {
            let peer = key.peer();
            // SAFETY: a plain lookup; the value is not kept.
            let known = unsafe { SKIFF_ROUTER_ENDS.get(peer) }.is_some();
            if known {
                let _ = SKIFF_ROUTER_ENDS.remove(peer);
            }
            known
        }
    }
}

/// 127.0.0.0/8 (v4-mapped) or ::1.
#[inline(always)]
fn is_loopback(ip: [u32; 4]) -> bool {
    let mapped = ip[0] == 0 && ip[1] == 0 && ip[2] == V4_MAPPED_PREFIX;
    (mapped && ip[3].to_ne_bytes()[0] == 127) || ip == LOOPBACK_V6
}

/// The address of the context's socket as a plain number. The verifier allows no arithmetic
/// on socket pointers, but a copy made by the read helper is just a number to it.
fn socket_address(ctx: &SockOpsContext) -> Option<u64> {
    // SAFETY: ops is the live bpf_sock_ops; `sk` is one of its fields, read with its own load.
    let sk = unsafe { read_volatile(&raw const (*ctx.ops).__bindgen_anon_2.sk) };
    // SAFETY: reads the pointer's own bytes (on this program's stack) through the helper.
    let addr = unsafe { bpf_probe_read_kernel(&raw const sk) }.ok()? as u64;
    (addr != 0).then_some(addr)
}

fn sock_key(ctx: &SockOpsContext) -> Option<SockKey> {
    let ops = ctx.ops;
    // Each context field gets its own load; see sk_msg.rs for why.
    // SAFETY: ops is the live bpf_sock_ops the kernel passed in; sock_ops may read all of these.
    let (family, local_ip4, remote_ip4, local_ip6, remote_ip6, local_port, remote_port_raw) = unsafe {
        (
            read_volatile(&raw const (*ops).family),
            read_volatile(&raw const (*ops).local_ip4),
            read_volatile(&raw const (*ops).remote_ip4),
            read_ip6(&raw const (*ops).local_ip6),
            read_ip6(&raw const (*ops).remote_ip6),
            read_volatile(&raw const (*ops).local_port),
            read_volatile(&raw const (*ops).remote_port),
        )
    };
    Some(SockKey {
        // SAFETY: sock_ops may call bpf_get_netns_cookie with its own context.
        netns: unsafe { bpf_get_netns_cookie(ops.cast()) },
        local_ip: key_ip(family, local_ip4, local_ip6)?,
        remote_ip: key_ip(family, remote_ip4, remote_ip6)?,
        local_port,
        remote_port: remote_port(remote_port_raw),
    })
}
