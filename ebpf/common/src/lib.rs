//! Map keys, values and names shared by skiff's eBPF programs and the router.
//!
//! Everything here is `repr(C)` and free of padding so that the kernel and userspace agree on
//! every byte. Addresses are stored as IPv6 (IPv4 as v4-mapped, `::ffff:a.b.c.d`) in network
//! byte order, so an IPv4 socket and a dual-stack socket that talks to an IPv4 peer produce the
//! same key. Ports are stored in host byte order.
#![no_std]

/// Name of the SOCKHASH that holds the accelerated sockets, keyed by [`SockKey`].
pub const SOCKS_MAP: &str = "SKIFF_SOCKS";
/// Name of the hash of endpoints whose connections are accelerated: [`EndpointKey`] ->
/// [`EndpointKind`] as `u32`.
pub const ENDPOINTS_MAP: &str = "SKIFF_ENDPOINTS";
/// Name of the per-CPU array of `u64` counters, indexed by [`Counter`].
pub const COUNTERS_MAP: &str = "SKIFF_COUNTERS";
/// Name of the hash of diverted senders: [`SockKey`] -> `u32` (unused). A socket in it sends on
/// the normal TCP path from then on, however its peer is found; see [`Counter::MsgDiverted`].
pub const DIVERTED_MAP: &str = "SKIFF_DIVERTED";

/// Name of the hash of what each workload socket has sent: [`SockKey`] -> [`Sent`]. sock_ops
/// creates the entry when the connection is established and removes it when the socket
/// closes; sk_msg keeps the count. A socket without an entry never gets a shortcut.
pub const SENT_MAP: &str = "SKIFF_SENT";
/// Name of the hash of workload sockets' kernel addresses ([`SockKey`] -> `u64`),
/// kept by sock_ops for sk_msg; write-only from userspace.
pub const SOCK_ADDRS_MAP: &str = "SKIFF_SOCK_ADDRS";
/// Name of the hash of shortcuts the router offers: sender's [`SockKey`] -> [`Shortcut`].
pub const SHORTCUTS_MAP: &str = "SKIFF_SHORTCUTS";

/// Name of the sk_msg program's global holding the byte offset of `sk_rmem_alloc` in the
/// running kernel's `struct sock` (a `u32`; 0 = unknown, then no shortcut is taken).
pub const SK_RMEM_ALLOC_OFFSET: &str = "SK_RMEM_ALLOC_OFFSET";

/// Name of the sk_msg program's global holding the most unread bytes a router socket may hold
/// before sk_msg diverts the workload that sends to it (a `u32`; 0 = unknown, then only the
/// router diverts, from userspace).
pub const QUEUE_LIMIT: &str = "QUEUE_LIMIT";

/// Names of the sk_msg program's globals holding the byte offsets, in the running kernel's
/// `struct tcp_sock`, of `snd_una`, `write_seq`, `copied_seq` and `rcv_nxt` (each a `u32`; 0 =
/// unknown, then a diverted sender never returns to redirection).
pub const TCP_SND_UNA_OFFSET: &str = "TCP_SND_UNA_OFFSET";
pub const TCP_WRITE_SEQ_OFFSET: &str = "TCP_WRITE_SEQ_OFFSET";
pub const TCP_COPIED_SEQ_OFFSET: &str = "TCP_COPIED_SEQ_OFFSET";
pub const TCP_RCV_NXT_OFFSET: &str = "TCP_RCV_NXT_OFFSET";

/// Names of the sk_msg program's globals holding the byte offsets of `sk_prot` in `struct
/// sock` and of `memory_allocated` and `sysctl_mem` in `struct proto` (each a `u32`; 0 =
/// unknown, then sk_msg does not look at TCP's memory).
pub const SK_PROT_OFFSET: &str = "SK_PROT_OFFSET";
pub const PROTO_MEMORY_ALLOCATED_OFFSET: &str = "PROTO_MEMORY_ALLOCATED_OFFSET";
pub const PROTO_SYSCTL_MEM_OFFSET: &str = "PROTO_SYSCTL_MEM_OFFSET";

/// Name of the hash of sockets the router is connecting to a backend: socket cookie -> 1,
/// written by the router before connect() and removed after. Only such a socket, and the
/// backend's end of its connection, go into [`SOCKS_MAP`] for a backend endpoint.
pub const ROUTER_SOCKETS_MAP: &str = "SKIFF_ROUTER_SOCKETS";
/// Capacity of [`ROUTER_SOCKETS_MAP`]: connects in flight at once.
pub const ROUTER_SOCKETS_MAX_ENTRIES: u32 = 16_384;

/// Name of the sock_ops program that fills [`SOCKS_MAP`].
pub const SOCK_OPS_PROGRAM: &str = "skiff_sock_ops";
/// Name of the sk_msg program that redirects between sockets of [`SOCKS_MAP`].
pub const SK_MSG_PROGRAM: &str = "skiff_sk_msg";

/// Capacity of [`SOCKS_MAP`]: two entries per accelerated connection.
pub const SOCKS_MAX_ENTRIES: u32 = 65_536;
/// Capacity of [`ENDPOINTS_MAP`].
pub const ENDPOINTS_MAX_ENTRIES: u32 = 4_096;

/// One established TCP socket as both of its ends see it.
///
/// `netns` is the network namespace cookie: the same four-tuple in two namespaces is two
/// different connections.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SockKey {
    pub netns: u64,
    pub local_ip: [u32; 4],
    pub remote_ip: [u32; 4],
    pub local_port: u32,
    pub remote_port: u32,
}

impl SockKey {
    /// The key of the socket at the other end of the same connection.
    #[must_use]
    pub const fn peer(&self) -> Self {
        Self {
            netns: self.netns,
            local_ip: self.remote_ip,
            remote_ip: self.local_ip,
            local_port: self.remote_port,
            remote_port: self.local_port,
        }
    }
}

/// What one workload socket (a local client of a listener, a local backend) has sent since its
/// connection was established, as sk_msg saw it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Sent {
    /// Bytes sent towards the router (redirected into its socket, or on the TCP path).
    pub routed: u64,
    /// Bytes sent by the shortcut, straight into the far workload's socket.
    pub shortcut: u64,
}

/// A shortcut the router offers one sender: its messages may go straight into the receive
/// queue of `to` (the workload at the far end of the router's hop), skipping the router.
///
/// sk_msg takes it only while `Sent::routed == forwarded`, that is when every byte the sender
/// sent towards the router has been forwarded by the router (and so already sits in `to`'s
/// queue), and only while what `to` holds unread, with the message, stays within `limit`
/// bytes. Otherwise the message goes to the router as before.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shortcut {
    pub to: SockKey,
    pub forwarded: u64,
    pub limit: u64,
}

/// A local endpoint (address and port) whose connections the programs accelerate.
///
/// An all-zero `ip` matches every local address (a listener bound to `0.0.0.0` or `::`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct EndpointKey {
    pub ip: [u32; 4],
    pub port: u32,
}

/// Value of an [`ENDPOINTS_MAP`] entry: what kind of endpoint it is. sock_ops counts what the
/// workload end of a connection sends (see [`Sent`]): the connecting end for a listener, the
/// accepting end for a backend.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EndpointKind {
    /// A router listener: local clients connect to it.
    Listener = 1,
    /// A local backend the router connects to.
    Backend = 2,
}

/// The unspecified address: an [`EndpointKey`] with it matches any local address.
pub const ANY_IP: [u32; 4] = [0; 4];

/// Third word of a v4-mapped IPv6 address (`::ffff:0:0/96`) as it lies in memory.
pub const V4_MAPPED_PREFIX: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);

/// An IPv4 address, as it lies in memory (network byte order), in the v4-mapped form keys use.
#[must_use]
pub const fn v4_mapped(ip4_be: u32) -> [u32; 4] {
    [0, 0, V4_MAPPED_PREFIX, ip4_be]
}

/// Indexes into [`COUNTERS_MAP`].
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// Sockets sock_ops put into the sockhash.
    SocksInserted = 0,
    /// Sockets sock_ops wanted to insert but the kernel refused (map full, unsupported state).
    SocksInsertFailed = 1,
    /// Messages sk_msg redirected to the peer socket.
    MsgRedirected = 2,
    /// Bytes in those messages.
    BytesRedirected = 3,
    /// Messages whose peer was not in the sockhash: passed on the normal path.
    MsgMissed = 4,
    /// Messages from a diverted sender, passed on the normal path.
    ///
    /// A redirected message lands in the peer's receive queue with no regard for the peer's
    /// receive buffer: a sender that outruns its reader would queue without bound. The router
    /// diverts such a sender (it reads its own queue), and from then on TCP's flow control
    /// holds the sender back. Diverting is for good: the reader drains redirected bytes before
    /// TCP's, so switching back could reorder the stream.
    MsgDiverted = 5,
    /// Messages sk_msg moved by a router's shortcut, straight between two local workloads.
    MsgShortcut = 6,
    /// Bytes in those messages.
    BytesShortcut = 7,
    /// Messages of a sender with a shortcut that the router had caught up with, sent to the
    /// router because the far reader had fallen behind: its unread bytes and the message
    /// would pass the shortcut's limit.
    ShortcutOverBudget = 8,
    /// Messages of a sender with a shortcut, sent to the router because it had not forwarded
    /// all of the sender's earlier bytes yet: the sender is on the router's path and comes
    /// back when an offer catches it up.
    ShortcutBehind = 9,
    /// Established sockets of a registered endpoint left out of the sockhash because the
    /// router is at neither end (another namespace, another process's connection to a
    /// backend, or a destination that is not this host).
    SocksForeign = 10,
    /// Workload senders sk_msg diverted itself: the router's socket already held the queue
    /// limit unread (`QUEUE_LIMIT`), so a redirected message would have passed it. The router
    /// diverts from userspace too, but only when it runs; this bound holds whenever it does not.
    SendersDiverted = 11,
    /// Diverted workload senders sk_msg took back onto redirection: everything they sent on
    /// the TCP path was acknowledged and read by the router, and the router's socket held less
    /// than half the queue limit, so no redirected byte can overtake a TCP one.
    SendersReturned = 12,
    /// Senders sk_msg diverted because TCP's memory was past `tcp_mem`'s low mark, where a
    /// redirected message's charge may fail with ENOMEM (the router's senders too).
    SendersUnderPressure = 13,
}

impl Counter {
    /// Every counter, in index order.
    pub const ALL: [Self; 14] = [
        Self::SocksInserted,
        Self::SocksInsertFailed,
        Self::MsgRedirected,
        Self::BytesRedirected,
        Self::MsgMissed,
        Self::MsgDiverted,
        Self::MsgShortcut,
        Self::BytesShortcut,
        Self::ShortcutOverBudget,
        Self::ShortcutBehind,
        Self::SocksForeign,
        Self::SendersDiverted,
        Self::SendersReturned,
        Self::SendersUnderPressure,
    ];
    /// Number of entries in [`COUNTERS_MAP`].
    pub const COUNT: u32 = Self::ALL.len() as u32;

    /// A snake_case name for logs and metric labels.
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::SocksInserted => "socks_inserted",
            Self::SocksInsertFailed => "socks_insert_failed",
            Self::MsgRedirected => "msg_redirected",
            Self::BytesRedirected => "bytes_redirected",
            Self::MsgMissed => "msg_missed",
            Self::MsgDiverted => "msg_diverted",
            Self::MsgShortcut => "msg_shortcut",
            Self::BytesShortcut => "bytes_shortcut",
            Self::ShortcutOverBudget => "shortcut_over_budget",
            Self::ShortcutBehind => "shortcut_behind",
            Self::SocksForeign => "socks_foreign",
            Self::SendersDiverted => "senders_diverted",
            Self::SendersReturned => "senders_returned",
            Self::SendersUnderPressure => "senders_under_pressure",
        }
    }
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: both are repr(C), Copy, made only of integers, and have no padding
    // (checked by the size assertions below).
    unsafe impl aya::Pod for super::SockKey {}
    unsafe impl aya::Pod for super::EndpointKey {}
    unsafe impl aya::Pod for super::Sent {}
    unsafe impl aya::Pod for super::Shortcut {}
}

const _: () = assert!(size_of::<SockKey>() == 8 + 16 + 16 + 4 + 4);
const _: () = assert!(size_of::<EndpointKey>() == 16 + 4);
const _: () = assert!(size_of::<Sent>() == 8 + 8);
const _: () = assert!(size_of::<Shortcut>() == size_of::<SockKey>() + 8 + 8);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_swaps_ends_and_keeps_namespace() {
        let key = SockKey {
            netns: 7,
            local_ip: v4_mapped(1),
            remote_ip: v4_mapped(2),
            local_port: 80,
            remote_port: 40_000,
        };
        let peer = key.peer();
        assert_eq!(peer.netns, 7);
        assert_eq!((peer.local_ip, peer.local_port), (key.remote_ip, 40_000));
        assert_eq!((peer.remote_ip, peer.remote_port), (key.local_ip, 80));
        assert_eq!(peer.peer(), key);
    }

    #[test]
    fn v4_mapped_matches_ipv6_octets() {
        extern crate std;
        let v4 = std::net::Ipv4Addr::new(127, 0, 0, 1);
        let mapped = v4.to_ipv6_mapped().octets();
        let words = v4_mapped(u32::from_ne_bytes(v4.octets()));
        let mut bytes = [0u8; 16];
        for (chunk, word) in bytes.chunks_exact_mut(4).zip(words) {
            chunk.copy_from_slice(&word.to_ne_bytes());
        }
        assert_eq!(bytes, mapped);
    }
}

/// Name of the hash of protected listener addresses: [`EndpointKey`] -> listener id.
pub const PROTECTED_MAP: &str = "SKIFF_PROTECTED";
/// Name of the hash of namespace roots: cgroup id -> namespace id.
pub const NAMESPACES_MAP: &str = "SKIFF_NAMESPACES";
/// Name of the hash of allowed pairs: [`AllowKey`] -> 1.
pub const ALLOWED_MAP: &str = "SKIFF_ALLOWED";
/// Name of the ring buffer of [`DenyEvent`]s.
pub const DENY_EVENTS_MAP: &str = "SKIFF_DENY_EVENTS";
/// Name of the per-CPU array of isolation counters, indexed by [`IsolationCounter`].
pub const ISOLATION_COUNTERS_MAP: &str = "SKIFF_ISOLATION_COUNTERS";
/// Name of the connect4 program.
pub const CONNECT4_PROGRAM: &str = "skiff_connect4";
/// Name of the connect6 program.
pub const CONNECT6_PROGRAM: &str = "skiff_connect6";

/// Name of the connect hooks' global holding the router's network namespace cookie (a `u64`;
/// 0 = unknown, then loopback destinations count in every namespace).
pub const ROUTER_NETNS: &str = "ROUTER_NETNS";

/// `::1`, as stored in keys.
pub const LOOPBACK_V6: [u32; 4] = [0, 0, 0, u32::from_ne_bytes([0, 0, 0, 1])];

/// Where a connect() to `ip` (IPv6 or v4-mapped, network byte order) arrives, as the key to
/// look up, and whether the destination is this host's loopback, which reaches only the
/// caller's own network namespace. The kernel connects to loopback for an unspecified
/// destination (`0.0.0.0`, `::`, `::ffff:0.0.0.0`), and a listener bound to the wildcard
/// answers on every 127.0.0.0/8 address, so all of these fold into `127.0.0.1` or `::1`.
#[inline(always)]
#[must_use]
pub fn connect_destination(ip: [u32; 4]) -> ([u32; 4], bool) {
    let mapped = ip[0] == 0 && ip[1] == 0 && ip[2] == V4_MAPPED_PREFIX;
    if mapped {
        let first = ip[3].to_ne_bytes()[0];
        if first == 127 || ip[3] == 0 {
            return (v4_mapped(u32::from_ne_bytes([127, 0, 0, 1])), true);
        }
        return (ip, false);
    }
    if ip == [0; 4] || ip == LOOPBACK_V6 {
        return (LOOPBACK_V6, true);
    }
    (ip, false)
}

#[cfg(test)]
mod destination_tests {
    use super::*;

    fn key(ip: &str) -> [u32; 4] {
        extern crate std;
        let v6 = match ip.parse::<std::net::IpAddr>().expect("ip") {
            std::net::IpAddr::V4(v4) => v4.to_ipv6_mapped(),
            std::net::IpAddr::V6(v6) => v6,
        };
        let mut out = [0u32; 4];
        for (word, chunk) in out.iter_mut().zip(v6.octets().chunks_exact(4)) {
            *word = u32::from_ne_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
        }
        out
    }

    /// The review's bypass: `0.0.0.0`, `[::]` and `::ffff:0.0.0.0` reach the loopback
    /// listener, so they must be looked up as loopback.
    #[test]
    fn unspecified_and_loopback_destinations_fold_into_loopback() {
        let v4 = (key("127.0.0.1"), true);
        let v6 = (key("::1"), true);
        for ip in [
            "0.0.0.0",
            "::ffff:0.0.0.0",
            "127.0.0.1",
            "127.9.9.9",
            "::ffff:127.0.0.5",
        ] {
            assert_eq!(connect_destination(key(ip)), v4, "{ip}");
        }
        for ip in ["::", "::1"] {
            assert_eq!(connect_destination(key(ip)), v6, "{ip}");
        }
        for ip in ["10.0.0.1", "::ffff:10.0.0.1", "fd00::1", "128.0.0.1", "::2"] {
            assert_eq!(connect_destination(key(ip)), (key(ip), false), "{ip}");
        }
    }
}

/// Capacity of the protected, namespace and allowed maps.
pub const ISOLATION_MAX_ENTRIES: u32 = 16_384;
/// How many cgroup levels above the caller the programs look for a namespace root.
pub const MAX_CGROUP_DEPTH: i32 = 16;
/// Namespace id of callers in no registered namespace.
pub const NO_NAMESPACE: u32 = 0;

/// A (protected listener, caller namespace) pair that may connect.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct AllowKey {
    pub listener: u32,
    pub namespace: u32,
}

/// One refused connect(), as sent to userspace.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DenyEvent {
    /// The caller's cgroup id.
    pub cgroup: u64,
    /// The caller's namespace id ([`NO_NAMESPACE`] if none).
    pub namespace: u32,
    /// The protected listener's id.
    pub listener: u32,
    /// Destination address (v4-mapped for IPv4) and port, as in [`EndpointKey`].
    pub ip: [u32; 4],
    pub port: u32,
    pub _pad: u32,
}

/// Indexes into [`ISOLATION_COUNTERS_MAP`].
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IsolationCounter {
    /// connect() calls to a protected listener that were allowed.
    Allowed = 0,
    /// connect() calls refused with EPERM.
    Denied = 1,
    /// Deny events lost because the ring buffer was full.
    EventsLost = 2,
}

impl IsolationCounter {
    /// Number of entries in [`ISOLATION_COUNTERS_MAP`].
    pub const COUNT: u32 = 3;
}

#[cfg(feature = "user")]
mod user_isolation {
    // SAFETY: repr(C), Copy, integers only, no padding (checked below).
    unsafe impl aya::Pod for super::AllowKey {}
}

const _: () = assert!(size_of::<AllowKey>() == 8);
const _: () = assert!(size_of::<DenyEvent>() == 8 + 4 + 4 + 16 + 4 + 4);
