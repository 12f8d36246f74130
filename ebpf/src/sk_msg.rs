//! sk_msg: moves each message a sockhash socket sends straight into its peer's receive queue.
//!
//! `bpf_msg_redirect_hash` answers `SK_DROP` when the peer is not in the map (it closed, or it
//! lives outside the attached cgroup). Returning `SK_PASS` then sends the message on the normal
//! TCP path instead of dropping it: a miss costs speed, never data.
//!
//! A sender that has been diverted (its reader fell behind) takes the TCP path, whose flow
//! control bounds what waits in the reader's queue; redirection has none. A workload sender is
//! diverted here, at the message that would take the router socket it sends into past the
//! queue limit; the router also diverts from userspace, where it cannot read that socket's
//! charge, but only when it gets to run. Any sender, the router included, is also diverted
//! while TCP's memory, all sockets together, is past `tcp_mem`'s low mark: past it the kernel
//! may refuse a redirected message's charge (its per-socket share under pressure, or the hard
//! limit), and the sender's send() then fails with ENOMEM, where the TCP path makes it wait.
//!
//! A diverted sender returns to redirection once its TCP path is drained: everything it
//! wrote is acknowledged (`snd_una == write_seq`), the router has read everything that arrived
//! (`copied_seq == rcv_nxt`), the router's socket holds less than half the limit, and TCP's
//! memory is below the pressure threshold. The
//! reader drains redirected bytes before TCP ones, so returning earlier could let a redirected
//! message overtake a TCP one; with the TCP path empty there is nothing to overtake. The check
//! runs under the sender's socket lock, and only the sender adds to its own TCP path.
//!
//! A workload sender the router offers a shortcut (see `ebpf_common::Shortcut`) skips the
//! router altogether: its message goes straight into the far workload's socket. It may only
//! while the router has forwarded everything the sender sent towards it (so nothing is
//! overtaken) and while the far socket's unread bytes stay within the router's limit (so that
//! queue stays bounded). Any other message goes towards the router and is counted, which is
//! what the first condition compares.

use aya_ebpf::{
    bindings::{BPF_ANY, BPF_F_INGRESS, sk_action::SK_PASS},
    helpers::{bpf_get_netns_cookie, bpf_probe_read_kernel},
    macros::sk_msg,
    programs::SkMsgContext,
};
use ebpf_common::{Counter, Sent, SockKey};

use core::ptr::read_volatile;

use crate::maps::{
    SKIFF_DIVERTED, SKIFF_SENT, SKIFF_SHORTCUTS, SKIFF_SOCK_ADDRS, SKIFF_SOCKS, count, key_ip,
    memory_pressure, queue_limit, read_ip6, remote_port, rmem_alloc_offset, tcp_seq_offsets,
};

#[sk_msg]
pub fn skiff_sk_msg(ctx: SkMsgContext) -> u32 {
    let Some(key) = sock_key(&ctx) else {
        count(Counter::MsgMissed, 1);
        return SK_PASS;
    };
    let size = u64::from(ctx.size());
    let workload = if let Some(sent) = SKIFF_SENT.get_ptr_mut(key) {
        if take_shortcut(&ctx, key, sent, size) {
            return SK_PASS;
        }
        // SAFETY: a live value of an RCU-freed map; only this socket's sk_msg writes it, under
        // the socket's lock.
        unsafe { (*sent).routed += size };
        true
    } else {
        false
    };
    if SKIFF_DIVERTED.get_ptr(key).is_some() {
        if !may_return(key, key.peer(), size) {
            count(Counter::MsgDiverted, 1);
            return SK_PASS;
        }
        let _ = SKIFF_DIVERTED.remove(key);
        count(Counter::SendersReturned, 1);
    }
    // The router paces its own writes; a workload cannot be made to wait, only diverted (until
    // its TCP path is drained: its reader drains redirected bytes first, so switching back
    // earlier could reorder). Under TCP memory pressure any sender is diverted, the router's
    // too: its pacing bounds its peer's queue, not TCP's memory.
    let why = if workload && over_limit(key.peer(), size) {
        Some(Counter::SendersDiverted)
    } else if under_pressure(key) {
        Some(Counter::SendersUnderPressure)
    } else {
        None
    };
    if let Some(why) = why {
        let _ = SKIFF_DIVERTED.insert(key, 1, u64::from(BPF_ANY));
        count(why, 1);
        count(Counter::MsgDiverted, 1);
        return SK_PASS;
    }
    if SKIFF_SOCKS.redirect_msg(&ctx, key.peer(), u64::from(BPF_F_INGRESS)) == i64::from(SK_PASS) {
        count(Counter::MsgRedirected, 1);
        count(Counter::BytesRedirected, size);
    } else {
        count(Counter::MsgMissed, 1);
    }
    SK_PASS
}

/// Moves the message by the sender's shortcut if the router offers one that may be taken now.
#[inline(always)]
fn take_shortcut(ctx: &SkMsgContext, key: SockKey, sent: *mut Sent, size: u64) -> bool {
    let Some(shortcut) = SKIFF_SHORTCUTS.get_ptr(key) else {
        return false;
    };
    // SAFETY: live values of RCU-freed maps (see maps.rs); the router replaces a shortcut
    // whole, so each field read here is one the router wrote.
    let (routed, by_shortcut, forwarded, limit, to) = unsafe {
        (
            (*sent).routed,
            (*sent).shortcut,
            (*shortcut).forwarded,
            (*shortcut).limit,
            (*shortcut).to,
        )
    };
    if routed != forwarded {
        count(Counter::ShortcutBehind, 1);
        return false;
    }
    let Some(unread) = unread(to) else {
        return false;
    };
    if u64::from(unread) + size > limit {
        count(Counter::ShortcutOverBudget, 1);
        return false;
    }
    if SKIFF_SOCKS.redirect_msg(ctx, to, u64::from(BPF_F_INGRESS)) != i64::from(SK_PASS) {
        return false;
    }
    // SAFETY: as above; only this socket's sk_msg writes `sent`.
    unsafe { (*sent).shortcut = by_shortcut + size };
    count(Counter::MsgShortcut, 1);
    count(Counter::BytesShortcut, size);
    true
}

/// Whether `size` more bytes would take socket `to`, which sock_ops located, past the queue
/// limit. `false` when either is unknown: then only the router's own check bounds the queue.
#[inline(always)]
fn over_limit(to: SockKey, size: u64) -> bool {
    match (queue_limit(), unread(to)) {
        (Some(limit), Some(unread)) => u64::from(unread) + size > u64::from(limit),
        _ => false,
    }
}

/// Whether diverted sender `from` may send into `to` by redirection again: both sockets'
/// TCP path is drained and `to` has room for half the limit (see the module documentation).
/// `false` when anything needed is unknown.
#[inline(always)]
fn may_return(from: SockKey, to: SockKey, size: u64) -> bool {
    let (Some(limit), Some((snd_una, write_seq, copied_seq, rcv_nxt))) =
        (queue_limit(), tcp_seq_offsets())
    else {
        return false;
    };
    let Some(unread) = unread(to) else {
        return false;
    };
    if u64::from(unread) + size > u64::from(limit / 2) || under_pressure(to) {
        return false;
    }
    let (Some(sender), Some(router)) = (address(from), address(to)) else {
        return false;
    };
    let field = |addr: u64, offset: u32| -> Option<u32> {
        // SAFETY: a read of kernel memory through the fault-tolerant helper.
        unsafe { bpf_probe_read_kernel((addr + u64::from(offset)) as *const u32) }.ok()
    };
    let acknowledged =
        field(sender, snd_una).is_some_and(|una| Some(una) == field(sender, write_seq));
    let read =
        field(router, copied_seq).is_some_and(|copied| Some(copied) == field(router, rcv_nxt));
    acknowledged && read
}

/// Whether TCP's memory is under pressure, read through socket `key`, which sock_ops located.
#[inline(always)]
fn under_pressure(key: SockKey) -> bool {
    address(key).is_some_and(memory_pressure)
}

/// Where sock_ops recorded socket `key` in kernel memory.
#[inline(always)]
fn address(key: SockKey) -> Option<u64> {
    // SAFETY: a live value of an RCU-freed map, copied at once.
    Some(unsafe { read_volatile(SKIFF_SOCK_ADDRS.get_ptr(key)?) })
}

/// Bytes charged to the receive side of socket `key` (its `sk_rmem_alloc`): what its
/// reader has not read yet, redirected messages included. `None` if sock_ops did not record
/// the socket or the offset is unknown.
///
/// No helper open to sk_msg reads another socket's fields (a sockhash lookup hands out a
/// reference sk_msg may not release), so the value is read from the socket's memory, at the
/// address sock_ops recorded. sock_ops removes the address when the socket closes; a read
/// that races the close may see memory being freed, which the read helper survives, and the
/// value then decides one message of a stream that is ending.
#[inline(always)]
fn unread(key: SockKey) -> Option<u32> {
    let offset = rmem_alloc_offset()?;
    let addr = address(key)?;
    // SAFETY: a read of kernel memory through the fault-tolerant helper.
    unsafe { bpf_probe_read_kernel((addr + u64::from(offset)) as *const u32) }.ok()
}

fn sock_key(ctx: &SkMsgContext) -> Option<SockKey> {
    let md = ctx.msg;
    // Every context field is read with its own load: the verifier rejects a load through a
    // context pointer the compiler has offset and kept around (`dereference of modified ctx ptr`).
    // SAFETY: md is the live sk_msg_md the kernel passed in; sk_msg may read all of these.
    let (family, local_ip4, remote_ip4, local_ip6, remote_ip6, local_port, remote_port_raw) = unsafe {
        (
            read_volatile(&raw const (*md).family),
            read_volatile(&raw const (*md).local_ip4),
            read_volatile(&raw const (*md).remote_ip4),
            read_ip6(&raw const (*md).local_ip6),
            read_ip6(&raw const (*md).remote_ip6),
            read_volatile(&raw const (*md).local_port),
            read_volatile(&raw const (*md).remote_port),
        )
    };
    Some(SockKey {
        // SAFETY: sk_msg may call bpf_get_netns_cookie with its own context.
        netns: unsafe { bpf_get_netns_cookie(md.cast()) },
        local_ip: key_ip(family, local_ip4, local_ip6)?,
        remote_ip: key_ip(family, remote_ip4, remote_ip6)?,
        local_port,
        remote_port: remote_port(remote_port_raw),
    })
}
