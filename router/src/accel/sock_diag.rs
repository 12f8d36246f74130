//! How much another process's TCP socket holds in its receive queue, asked of the kernel over
//! sock_diag netlink (what `ss -m` shows as `skmem:(r…)`).
//!
//! The router needs this for the sockets at the other end of its accelerated connections: a
//! redirected message lands straight in the peer's receive queue, where only the peer's reads
//! free it (see [`super::backpressure`]). The kernel charges those bytes to the peer's
//! `sk_rmem_alloc`, which sock_diag reports; FIONREAD would too, but only on the peer's own
//! descriptor. Asking needs no privilege, as `ss` needs none.

use std::{
    cell::RefCell,
    io,
    net::{IpAddr, SocketAddr},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
};

/// `SOCK_DIAG_BY_FAMILY` from `linux/sock_diag.h`.
const SOCK_DIAG_BY_FAMILY: u16 = 20;
/// `INET_DIAG_SKMEMINFO` from `linux/inet_diag.h`: an array of `u32` indexed by `SK_MEMINFO_*`.
const INET_DIAG_SKMEMINFO: u16 = 7;
/// `SK_MEMINFO_RMEM_ALLOC`: bytes charged to the receive side.
const SK_MEMINFO_RMEM_ALLOC: usize = 0;
/// `INET_DIAG_NOCOOKIE`: match by address and port, whatever the socket's cookie.
const NO_COOKIE: [u32; 2] = [!0, !0];

/// `struct inet_diag_sockid`: ports and addresses in network byte order.
#[repr(C)]
#[derive(Clone, Copy)]
struct SockId {
    sport: [u8; 2],
    dport: [u8; 2],
    src: [u8; 16],
    dst: [u8; 16],
    interface: u32,
    cookie: [u32; 2],
}

/// `struct nlmsghdr` followed by `struct inet_diag_req_v2`.
#[repr(C)]
struct Request {
    len: u32,
    kind: u16,
    flags: u16,
    seq: u32,
    pid: u32,
    family: u8,
    protocol: u8,
    ext: u8,
    pad: u8,
    states: u32,
    id: SockId,
}

const _: () = assert!(size_of::<SockId>() == 48);
const _: () = assert!(size_of::<Request>() == 16 + 8 + 48);

/// Length of `struct nlmsghdr` and of `struct inet_diag_msg`, which precede the attributes.
const NLMSG_HEADER: usize = 16;
const DIAG_MSG: usize = 72;
/// Offset of `idiag_rqueue` in `struct inet_diag_msg`: after family, state, timer, retrans, the
/// 48-byte socket id and `idiag_expires`.
const DIAG_MSG_RQUEUE: usize = 4 + 48 + 4;

thread_local! {
    /// One sock_diag socket per thread, opened on first use.
    static SOCKET: RefCell<Option<OwnedFd>> = const { RefCell::new(None) };
    static SEQ: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
}

/// What waits unread in one TCP socket's receive queue.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Queue {
    /// Bytes charged to the receive side: everything unread, redirected messages included.
    pub charged: u32,
    /// Unread bytes that came by TCP (`rcv_nxt - copied_seq`; redirected messages skip it).
    pub tcp: u32,
}

/// Bytes charged to the receive queue of the TCP socket whose local end is `local` and whose
/// remote end is `remote`, in the caller's network namespace.
///
/// # Errors
/// As [`queue`].
pub fn receive_queue(local: SocketAddr, remote: SocketAddr) -> io::Result<u32> {
    queue(local, remote).map(|q| q.charged)
}

/// The receive queue of the TCP socket whose local end is `local` and whose remote end is
/// `remote`, in the caller's network namespace.
///
/// # Errors
/// `NotFound` when no such socket exists (it closed, or it lives on another host); any other
/// error of the netlink exchange.
pub fn queue(local: SocketAddr, remote: SocketAddr) -> io::Result<Queue> {
    SOCKET.with(|cell| {
        let mut cell = cell.borrow_mut();
        if cell.is_none() {
            *cell = Some(open()?);
        }
        let fd = cell.as_ref().expect("opened above");
        let seq = SEQ.with(|s| {
            s.set(s.get().wrapping_add(1));
            s.get()
        });
        let request = request(local, remote, seq);
        // SAFETY: `request` is a live, fully initialised repr(C) value of the length given.
        let sent = unsafe {
            libc::send(
                fd.as_raw_fd(),
                (&raw const request).cast(),
                size_of::<Request>(),
                0,
            )
        };
        if sent < 0 {
            return Err(io::Error::last_os_error());
        }
        // The kernel answers an exact request while handling the send, so the reply is
        // already queued: reading never blocks.
        let mut reply = [0u8; 1024];
        loop {
            // SAFETY: `reply` is writable for its whole length.
            let n = unsafe {
                libc::recv(
                    fd.as_raw_fd(),
                    reply.as_mut_ptr().cast(),
                    reply.len(),
                    libc::MSG_DONTWAIT,
                )
            };
            let n = usize::try_from(n).map_err(|_| io::Error::last_os_error())?;
            // None: a stale reply to an earlier, abandoned request; read on.
            if let Some(queued) = parse(&reply[..n], seq)? {
                return Ok(queued);
            }
        }
    })
}

fn open() -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2) call; the result is checked before use.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
            libc::NETLINK_SOCK_DIAG,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn request(local: SocketAddr, remote: SocketAddr, seq: u32) -> Request {
    // An IPv4 query also finds a dual-stack socket talking to an IPv4 peer, and the kernel
    // answers an IPv6 query with v4-mapped addresses from its IPv4 tables.
    let v4 = local.ip().to_canonical().is_ipv4() && remote.ip().to_canonical().is_ipv4();
    let bytes = |ip: IpAddr| -> [u8; 16] {
        let mut out = [0u8; 16];
        match ip.to_canonical() {
            IpAddr::V4(a) if v4 => out[..4].copy_from_slice(&a.octets()),
            IpAddr::V4(a) => out = a.to_ipv6_mapped().octets(),
            IpAddr::V6(a) => out = a.octets(),
        }
        out
    };
    let (src, dst) = (bytes(local.ip()), bytes(remote.ip()));
    Request {
        len: size_of::<Request>() as u32,
        kind: SOCK_DIAG_BY_FAMILY,
        flags: libc::NLM_F_REQUEST as u16,
        seq,
        pid: 0,
        family: if v4 { libc::AF_INET } else { libc::AF_INET6 } as u8,
        protocol: libc::IPPROTO_TCP as u8,
        ext: 1 << (INET_DIAG_SKMEMINFO - 1),
        pad: 0,
        states: !0,
        id: SockId {
            sport: local.port().to_be_bytes(),
            dport: remote.port().to_be_bytes(),
            src,
            dst,
            interface: 0,
            cookie: NO_COOKIE,
        },
    }
}

/// The receive queue from one reply, `None` if the reply answers another request.
fn parse(reply: &[u8], seq: u32) -> io::Result<Option<Queue>> {
    let u16_at = |at: usize| {
        reply
            .get(at..at + 2)
            .map(|b| u16::from_ne_bytes([b[0], b[1]]))
    };
    let u32_at = |at: usize| {
        reply
            .get(at..at + 4)
            .map(|b| u32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
    };
    let truncated = || io::Error::new(io::ErrorKind::InvalidData, "truncated sock_diag reply");
    let len = u32_at(0).ok_or_else(truncated)? as usize;
    let kind = u16_at(4).ok_or_else(truncated)?;
    if u32_at(8).ok_or_else(truncated)? != seq {
        return Ok(None);
    }
    let reply = reply.get(..len).ok_or_else(truncated)?;
    if i32::from(kind) == libc::NLMSG_ERROR {
        // struct nlmsgerr: a negative errno, then the request's header.
        let errno = u32_at(NLMSG_HEADER).ok_or_else(truncated)? as i32;
        return Err(io::Error::from_raw_os_error(-errno));
    }
    if kind != SOCK_DIAG_BY_FAMILY {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("unexpected sock_diag reply type {kind}"),
        ));
    }
    let tcp = u32_at(NLMSG_HEADER + DIAG_MSG_RQUEUE).ok_or_else(truncated)?;
    // Attributes follow the header and inet_diag_msg, each padded to four bytes.
    let mut at = NLMSG_HEADER + DIAG_MSG;
    while at + 4 <= reply.len() {
        let attr_len = usize::from(u16_at(at).ok_or_else(truncated)?);
        let attr_kind = u16_at(at + 2).ok_or_else(truncated)?;
        if attr_len < 4 {
            break;
        }
        if attr_kind == INET_DIAG_SKMEMINFO {
            let charged = u32_at(at + 4 + 4 * SK_MEMINFO_RMEM_ALLOC).ok_or_else(truncated)?;
            return Ok(Some(Queue { charged, tcp }));
        }
        at += attr_len.next_multiple_of(4);
    }
    Err(io::Error::new(
        io::ErrorKind::InvalidData,
        "sock_diag reply without memory information",
    ))
}

#[cfg(test)]
mod tests {
    use std::io::{Read as _, Write as _};

    use super::*;

    /// A real socket pair on loopback: the kernel's answer grows with unread bytes and shrinks
    /// when they are read.
    #[test]
    fn reports_unread_bytes_of_the_peer_socket() {
        for host in ["127.0.0.1:0", "[::1]:0"] {
            let listener = std::net::TcpListener::bind(host).expect("bind loopback");
            let mut client = std::net::TcpStream::connect(listener.local_addr().expect("addr"))
                .expect("connect");
            let (mut server, _) = listener.accept().expect("accept");
            let (local, remote) = (
                server.local_addr().expect("addr"),
                server.peer_addr().expect("addr"),
            );
            assert_eq!(receive_queue(local, remote).expect("idle socket"), 0);
            client.write_all(&[7u8; 100_000]).expect("write");
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
            let mut queued = 0;
            while queued < 100_000 && std::time::Instant::now() < deadline {
                queued = receive_queue(local, remote).expect("busy socket");
            }
            assert!(queued >= 100_000, "{host}: {queued} bytes charged");
            // Bytes that came by TCP: the unread count is exact.
            assert_eq!(queue(local, remote).expect("busy socket").tcp, 100_000);
            let mut buf = vec![0u8; 100_000];
            server.read_exact(&mut buf).expect("read");
            let drained = queue(local, remote).expect("drained socket");
            assert_eq!((drained.charged, drained.tcp), (0, 0));
        }
    }

    #[test]
    fn a_missing_socket_is_not_found() {
        let local: SocketAddr = "127.0.0.1:1".parse().expect("addr");
        let remote: SocketAddr = "127.0.0.1:2".parse().expect("addr");
        let err = receive_queue(local, remote).expect_err("no such socket");
        assert_eq!(err.kind(), io::ErrorKind::NotFound, "{err}");
    }
}
