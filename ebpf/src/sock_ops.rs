//! sock_ops: puts established TCP sockets that involve a registered endpoint into the sockhash.
//!
//! Both ends of a local connection pass through here when they live in the attached cgroup:
//! the connecting side (`ACTIVE_ESTABLISHED`, remote end is the endpoint) and the accepted side
//! (`PASSIVE_ESTABLISHED`, local end is the endpoint). With both in the map, sk_msg can move
//! bytes from one to the other.

use aya_ebpf::{
    bindings::{BPF_ANY, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB},
    helpers::bpf_get_netns_cookie,
    macros::sock_ops,
    programs::SockOpsContext,
};
use ebpf_common::{Counter, SockKey};

use core::ptr::read_volatile;

use crate::maps::{SKIFF_DIVERTED, SKIFF_SOCKS, count, is_endpoint, key_ip, read_ip6, remote_port};

/// The return value means nothing for these callbacks; 1 is what the kernel documents as "ok".
#[sock_ops]
pub fn skiff_sock_ops(ctx: SockOpsContext) -> u32 {
    if let Err(counter) = try_sock_ops(&ctx) {
        count(counter, 1);
    }
    1
}

fn try_sock_ops(ctx: &SockOpsContext) -> Result<(), Counter> {
    let passive = match ctx.op() {
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB => true,
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => false,
        _ => return Ok(()),
    };
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
    let (Some(local_ip), Some(remote_ip)) = (
        key_ip(family, local_ip4, local_ip6),
        key_ip(family, remote_ip4, remote_ip6),
    ) else {
        return Ok(());
    };
    let key = SockKey {
        // SAFETY: sock_ops may call bpf_get_netns_cookie with its own context.
        netns: unsafe { bpf_get_netns_cookie(ops.cast()) },
        local_ip,
        remote_ip,
        local_port,
        remote_port: remote_port(remote_port_raw),
    };
    let involves_endpoint = if passive {
        is_endpoint(key.local_ip, key.local_port)
    } else {
        is_endpoint(key.remote_ip, key.remote_port)
    };
    if !involves_endpoint {
        return Ok(());
    }
    // A new connection never inherits the diverted mark of an earlier one with the same key.
    let _ = SKIFF_DIVERTED.remove(key);
    // SAFETY: ops is the live bpf_sock_ops the kernel passed to this program.
    SKIFF_SOCKS
        .update(key, unsafe { &mut *ops }, u64::from(BPF_ANY))
        .map_err(|_| Counter::SocksInsertFailed)?;
    count(Counter::SocksInserted, 1);
    Ok(())
}
