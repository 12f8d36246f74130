//! The maps shared by the programs. Userspace finds them by the names in `ebpf_common`.

use core::ptr::read_volatile;

use aya_ebpf::{
    bindings::{BPF_F_NO_PREALLOC, BPF_F_WRONLY},
    helpers::bpf_probe_read_kernel,
    macros::map,
    maps::{HashMap, LruHashMap, PerCpuArray, SockHash},
};
use ebpf_common::{
    ANY_IP, Counter, ENDPOINTS_MAX_ENTRIES, EndpointKey, ROUTER_SOCKETS_MAX_ENTRIES,
    SOCKS_MAX_ENTRIES, Sent, Shortcut, SockKey, v4_mapped,
};

/// Accelerated sockets. The kernel removes a socket from it when the socket closes.
#[map]
pub static SKIFF_SOCKS: SockHash<SockKey> = SockHash::with_max_entries(SOCKS_MAX_ENTRIES, 0);

/// Local endpoints whose connections are accelerated, written by the router.
#[map]
pub static SKIFF_ENDPOINTS: HashMap<EndpointKey, u32> =
    HashMap::with_max_entries(ENDPOINTS_MAX_ENTRIES, 0);

/// Senders diverted to the normal TCP path (see `Counter::MsgDiverted`). Written by the router
/// and by sk_msg (`Counter::SendersDiverted`), cleared by sock_ops when the sender closes and
/// when a new connection gets the same key.
#[map]
pub static SKIFF_DIVERTED: HashMap<SockKey, u32> = HashMap::with_max_entries(SOCKS_MAX_ENTRIES, 0);

/// What each workload socket has sent: created and removed by sock_ops, counted by sk_msg.
///
/// Both this map and the shortcuts are allocated per element: sk_msg holds pointers into their
/// values while another CPU may delete or replace the entry, and a preallocated map would hand
/// the freed element to another key at once (an RCU-freed one stays intact until the program
/// ends).
#[map]
pub static SKIFF_SENT: HashMap<SockKey, Sent> =
    HashMap::with_max_entries(SOCKS_MAX_ENTRIES, BPF_F_NO_PREALLOC);

/// Where each accelerated socket lives in kernel memory, for sk_msg to read how much it holds
/// unread: a workload socket (bounding a shortcut into it) and a router socket (bounding what
/// its workload redirects into it); written by sock_ops, removed when the socket closes.
/// Write-only from userspace: kernel addresses are not for reading out.
#[map]
pub static SKIFF_SOCK_ADDRS: HashMap<SockKey, u64> =
    HashMap::with_max_entries(SOCKS_MAX_ENTRIES, BPF_F_NO_PREALLOC | BPF_F_WRONLY);

/// Shortcuts the router offers, by sender; written by the router only.
#[map]
pub static SKIFF_SHORTCUTS: HashMap<SockKey, Shortcut> =
    HashMap::with_max_entries(SOCKS_MAX_ENTRIES, BPF_F_NO_PREALLOC);

/// Sockets the router is connecting to a backend, by socket cookie; written by the router.
#[map]
pub static SKIFF_ROUTER_SOCKETS: HashMap<u64, u8> =
    HashMap::with_max_entries(ROUTER_SOCKETS_MAX_ENTRIES, 0);

/// Router sockets whose connection to a backend is established, by key, until the backend's
/// end is established too (sock_ops removes the entry then). LRU: an end that never comes
/// (a backend outside the cgroup) ages out instead of filling the map.
#[map]
pub static SKIFF_ROUTER_ENDS: LruHashMap<SockKey, u8> =
    LruHashMap::with_max_entries(SOCKS_MAX_ENTRIES, 0);

/// Event counters; per-CPU because the bpf target has no 64-bit atomics.
#[map]
pub static SKIFF_COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(Counter::COUNT, 0);

/// Where `struct sock` keeps `sk_rmem_alloc` in the running kernel, in bytes; set by the router
/// from the kernel's BTF when it loads the programs. 0 (never a valid offset: the struct starts
/// with `sock_common`) means unknown.
#[unsafe(no_mangle)]
static SK_RMEM_ALLOC_OFFSET: u32 = 0;

/// [`SK_RMEM_ALLOC_OFFSET`], if known. Without it sk_msg takes no shortcut and sock_ops records
/// no socket address.
#[inline(always)]
pub fn rmem_alloc_offset() -> Option<u32> {
    // SAFETY: a plain read of a constant the loader patched; volatile so that the compiler does
    // not fold in the 0 it was built with.
    let offset = unsafe { read_volatile(&raw const SK_RMEM_ALLOC_OFFSET) };
    (offset != 0).then_some(offset)
}

/// The most unread bytes a router socket may hold before sk_msg diverts the workload sending
/// into it, set by the router when it loads the programs (the limit its own flow control
/// uses); 0 means unknown.
#[unsafe(no_mangle)]
static QUEUE_LIMIT: u32 = 0;

/// [`QUEUE_LIMIT`], if known.
#[inline(always)]
pub fn queue_limit() -> Option<u32> {
    // SAFETY: as for SK_RMEM_ALLOC_OFFSET.
    let limit = unsafe { read_volatile(&raw const QUEUE_LIMIT) };
    (limit != 0).then_some(limit)
}

/// Byte offsets of `snd_una`, `write_seq`, `copied_seq` and `rcv_nxt` in the running kernel's
/// `struct tcp_sock`, set by the router when it loads the programs; 0 means unknown.
#[unsafe(no_mangle)]
static TCP_SND_UNA_OFFSET: u32 = 0;
#[unsafe(no_mangle)]
static TCP_WRITE_SEQ_OFFSET: u32 = 0;
#[unsafe(no_mangle)]
static TCP_COPIED_SEQ_OFFSET: u32 = 0;
#[unsafe(no_mangle)]
static TCP_RCV_NXT_OFFSET: u32 = 0;

/// The four offsets above, if all are known: (snd_una, write_seq, copied_seq, rcv_nxt).
#[inline(always)]
pub fn tcp_seq_offsets() -> Option<(u32, u32, u32, u32)> {
    // SAFETY: as for SK_RMEM_ALLOC_OFFSET.
    let offsets = unsafe {
        (
            read_volatile(&raw const TCP_SND_UNA_OFFSET),
            read_volatile(&raw const TCP_WRITE_SEQ_OFFSET),
            read_volatile(&raw const TCP_COPIED_SEQ_OFFSET),
            read_volatile(&raw const TCP_RCV_NXT_OFFSET),
        )
    };
    (offsets.0 != 0 && offsets.1 != 0 && offsets.2 != 0 && offsets.3 != 0).then_some(offsets)
}

/// Byte offsets of `sk_prot` in `struct sock` and of `memory_allocated` and `sysctl_mem` in
/// `struct proto`, set by the router from the kernel's BTF when it loads the programs; 0
/// means unknown.
#[unsafe(no_mangle)]
static SK_PROT_OFFSET: u32 = 0;
#[unsafe(no_mangle)]
static PROTO_MEMORY_ALLOCATED_OFFSET: u32 = 0;
#[unsafe(no_mangle)]
static PROTO_SYSCTL_MEM_OFFSET: u32 = 0;

/// Whether the memory of socket `sk`'s protocol (TCP's, all sockets together, in pages) is
/// past its low mark (`tcp_mem`'s first value, below which the kernel never moderates). Past
/// it the kernel may refuse a redirected message's charge, and the sender sees ENOMEM where
/// the TCP path would make it wait. `false` when anything needed is unknown.
#[inline(always)]
pub fn memory_pressure(sk: u64) -> bool {
    // SAFETY: as for SK_RMEM_ALLOC_OFFSET.
    let (prot, allocated, sysctl) = unsafe {
        (
            read_volatile(&raw const SK_PROT_OFFSET),
            read_volatile(&raw const PROTO_MEMORY_ALLOCATED_OFFSET),
            read_volatile(&raw const PROTO_SYSCTL_MEM_OFFSET),
        )
    };
    if prot == 0 || allocated == 0 || sysctl == 0 {
        return false;
    }
    // SAFETY: reads of kernel memory through the fault-tolerant helper.
    let read = |addr: u64| unsafe { bpf_probe_read_kernel(addr as *const u64) }.ok();
    let Some(proto) = read(sk + u64::from(prot)) else {
        return false;
    };
    let (Some(pages), Some(limits)) = (
        read(proto + u64::from(allocated)).and_then(read),
        read(proto + u64::from(sysctl)),
    ) else {
        return false;
    };
    // The count is a signed `atomic_long_t`, and it goes below zero while the CPUs' forward
    // allocations hold more than the whole (the kernel reads it as at least 0): read as
    // unsigned, a count just under zero would be past any mark.
    let pages = pages as i64;
    // `sysctl_mem` is `long[3]`: the low mark, the pressure threshold, the hard limit.
    read(limits).is_some_and(|low| pages > low as i64)
}

/// The router's network namespace cookie, set by the router when it loads the programs;
/// 0 means unknown. sock_ops leaves sockets of other namespaces alone; the connect hooks count
/// loopback only in this one.
#[unsafe(no_mangle)]
static ROUTER_NETNS: u64 = 0;

/// [`ROUTER_NETNS`], if known.
#[inline(always)]
pub fn router_netns() -> Option<u64> {
    // SAFETY: as for SK_RMEM_ALLOC_OFFSET.
    let netns = unsafe { read_volatile(&raw const ROUTER_NETNS) };
    (netns != 0).then_some(netns)
}

/// Adds `n` to `counter` on this CPU.
#[inline(always)]
pub fn count(counter: Counter, n: u64) {
    if let Some(value) = SKIFF_COUNTERS.get_ptr_mut(counter as u32) {
        // SAFETY: the pointer is this CPU's slot of a live map value, and BPF programs do not
        // preempt each other on one CPU.
        unsafe { *value += n };
    }
}

/// The kind of endpoint `ip:port` is (an `EndpointKind` as `u32`), and whether it is registered
/// at that address (`true`) or at any address (`false`); `None` if it is not registered.
#[inline(always)]
pub fn endpoint_kind(ip: [u32; 4], port: u32) -> Option<(u32, bool)> {
    let (value, exact) = match SKIFF_ENDPOINTS.get_ptr(EndpointKey { ip, port }) {
        Some(value) => (value, true),
        None => (
            SKIFF_ENDPOINTS.get_ptr(EndpointKey { ip: ANY_IP, port })?,
            false,
        ),
    };
    // SAFETY: the pointer is a live value of the map, valid for this program's run.
    Some((unsafe { read_volatile(value) }, exact))
}

/// An address as keys store it: IPv4 in its v4-mapped form, IPv6 as is.
#[inline(always)]
pub fn key_ip(family: u32, ip4: u32, ip6: [u32; 4]) -> Option<[u32; 4]> {
    match family {
        AF_INET => Some(v4_mapped(ip4)),
        AF_INET6 => Some(ip6),
        _ => None,
    }
}

/// The remote port as `bpf_sock_ops` and `sk_msg_md` carry it: the big-endian `u16` shifted into
/// the upper half of the word on little-endian machines.
#[inline(always)]
pub fn remote_port(raw: u32) -> u32 {
    u32::from(u16::from_be((raw >> 16) as u16))
}

/// Reads a context's `[u32; 4]` IPv6 address one word at a time, each with its own load.
///
/// # Safety
/// `ip6` must point into the live program context.
#[inline(always)]
pub unsafe fn read_ip6(ip6: *const [u32; 4]) -> [u32; 4] {
    let words = ip6.cast::<u32>();
    // SAFETY: the caller guarantees `ip6` points at four readable words of the context.
    unsafe {
        [
            read_volatile(words),
            read_volatile(words.add(1)),
            read_volatile(words.add(2)),
            read_volatile(words.add(3)),
        ]
    }
}

const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;
