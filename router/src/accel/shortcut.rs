//! Shortcuts: the router steps out of the byte path of a local hop.
//!
//! When a local client and a local backend talk through the router and both are redirected,
//! every byte still crosses the router: sk_msg moves it into the router's socket, the router
//! reads it and writes it to the other socket, and sk_msg moves it on. That is two copies and a
//! router thread per byte; the router cannot keep up with a client whose sends are one copy.
//! A shortcut lets the client's sk_msg move the bytes straight into the backend's socket (and
//! the backend's into the client's), so the router touches none of them.
//!
//! Order is what makes this delicate: bytes the router has read but not written yet, or that
//! still wait in the router's socket, must reach the far end before any byte that takes the
//! shortcut. So the switch happens in the sender's own sk_msg, which runs under the sender's
//! socket lock: sk_msg counts what the sender sends towards the router (`Sent::routed`), the
//! router publishes how much of it it has forwarded (`Shortcut::forwarded`), and sk_msg takes
//! the shortcut only while the two are equal. The router's writes land in the far socket's
//! queue before its write returns (they are redirected too), so when the counts match, every
//! earlier byte is already there. Leaving the shortcut needs no care: whatever takes the router
//! path afterwards is forwarded behind what the shortcut already delivered.
//!
//! Flow control: a shortcut delivers into the far socket's queue, which redirection never
//! bounds. Each offer carries a budget (`Shortcut::until`): what the far queue can still take
//! under the limit the router applies elsewhere ([`super::Backpressure::limit`]). Once it is
//! spent, the sender's messages go to the router again, where the usual flow control holds
//! them back; the router offers a new budget when it has caught up and the far queue has
//! room. No timer and no polling: a stream whose reader keeps up pays one offer (four system
//! calls) per budget, tens of MiB.
//!
//! The router offers only when it holds nothing of the stream (its read would block), when no
//! byte it wrote is still on the TCP path (its socket's send queue is empty and the far
//! socket's TCP queue is read), and when the far queue has at least a quarter of the limit
//! free. Both workloads must be counted (have a sent entry): only sock_ops makes those, for
//! sockets in the sockhash, and it removes them when the socket closes. A stream where either
//! is missing three looks in a row (they appear as the connection is established) is not
//! offered any more. An offer can still go unused when the sender's message raced it; that
//! message then took the router's path, which costs more than the next offer.

use std::{
    io,
    net::SocketAddr,
    os::fd::{AsRawFd as _, RawFd},
    sync::atomic::Ordering,
};

use ebpf_common::{Sent, Shortcut, SockKey};
use tokio::net::TcpStream;

use super::{Backpressure, sock_diag};

/// Looks in a row without both workloads counted after which a direction is given up.
const MAX_UNCOUNTED_LOOKS: u8 = 3;

/// The router's side of one direction's shortcut: offers it, and withdraws it on drop. Inert
/// when acceleration is off or the sockets are not both local.
#[derive(Debug)]
pub struct Bypass<'a> {
    state: Option<State<'a>>,
}

#[derive(Debug)]
struct State<'a> {
    shared: &'a Backpressure,
    /// The workload that sends to the router (the key sk_msg looks up).
    sender: SockKey,
    /// The workload at the far end, where the shortcut delivers.
    target: SockKey,
    /// The router's socket towards `target`, and `target`'s ends as sock_diag names them.
    via: RawFd,
    target_local: SocketAddr,
    target_remote: SocketAddr,
    /// `forwarded` at the last offer.
    offered: Option<u64>,
    uncounted: u8,
    /// What the sender had sent by the shortcut when last seen.
    by_shortcut: u64,
}

impl Backpressure {
    /// The shortcut for bytes the router reads from `from` and writes to `to`: from `from`'s
    /// peer straight to `to`'s peer.
    #[must_use]
    pub fn bypass(&self, from: &TcpStream, to: &TcpStream) -> Bypass<'_> {
        let state = (|| {
            let (sender, target) = (self.sock_key(from)?.peer(), self.sock_key(to)?.peer());
            Some(State {
                shared: self,
                sender,
                target,
                via: to.as_raw_fd(),
                target_local: to.peer_addr().ok()?,
                target_remote: to.local_addr().ok()?,
                offered: None,
                uncounted: 0,
                by_shortcut: 0,
            })
        })();
        Bypass { state }
    }
}

impl Bypass<'_> {
    /// A bypass that never offers anything.
    #[must_use]
    pub const fn inert() -> Self {
        Self { state: None }
    }

    /// Offers the sender the shortcut: the router has forwarded `forwarded` bytes from it and
    /// holds none. Returns whether a new offer was made (the far queue may then fill without
    /// the router writing: its own pacing should look again before it writes).
    pub fn offer(&mut self, forwarded: u64) -> bool {
        let Some(state) = &mut self.state else {
            return false;
        };
        match state.offer(forwarded) {
            Ok(offered) => offered,
            Err(reason) => {
                // A workload that closes ends the offers of a stream that had them; only a
                // stream that never got one counts as given up.
                if state.offered.is_none() {
                    tracing::debug!(reason, "no shortcut for this stream");
                    state
                        .shared
                        .shortcuts_given_up
                        .fetch_add(1, Ordering::Relaxed);
                }
                state.withdraw();
                self.state = None;
                false
            }
        }
    }

    /// Bytes the sender has sent by the shortcut (as of now, or of the last look if its
    /// socket has closed since).
    pub fn bytes(&mut self) -> u64 {
        let Some(state) = &mut self.state else {
            return 0;
        };
        if let Ok(sent) = state.sent() {
            state.by_shortcut = sent.shortcut;
        }
        state.by_shortcut
    }
}

impl State<'_> {
    /// `Ok(false)`: no offer now, maybe later. `Err`: never again for this stream.
    fn offer(&mut self, forwarded: u64) -> Result<bool, &'static str> {
        if self.offered == Some(forwarded) {
            return Ok(false); // nothing came through the router since: the offer stands
        }
        let (Ok(sent), true) = (self.sent(), self.shared.sent.get(&self.target, 0).is_ok()) else {
            self.uncounted += 1;
            if self.uncounted >= MAX_UNCOUNTED_LOOKS {
                return Err("a workload is not counted (outside the cgroup, or closed)");
            }
            return Ok(false);
        };
        self.uncounted = 0;
        self.by_shortcut = sent.shortcut;
        // Bytes of ours still on the TCP path would arrive behind the shortcut's.
        if send_queue(self.via).map_err(|_| "cannot read the router's send queue")? > 0 {
            return Ok(false);
        }
        let queue = sock_diag::queue(self.target_local, self.target_remote)
            .map_err(|_| "the far socket cannot be seen")?;
        if queue.tcp > 0 {
            return Ok(false);
        }
        let limit = self.shared.limit();
        let room = limit.saturating_sub(queue.charged as usize);
        if room < limit / 4 {
            return Ok(false);
        }
        let offer = Shortcut {
            to: self.target,
            forwarded,
            until: sent.shortcut + room as u64,
        };
        self.shared
            .shortcuts
            .lock()
            .expect("shortcuts lock")
            .insert(self.sender, offer, 0)
            .map_err(|_| "the shortcut map is full")?;
        self.offered = Some(forwarded);
        self.shared
            .shortcuts_offered
            .fetch_add(1, Ordering::Relaxed);
        Ok(true)
    }

    fn sent(&self) -> Result<Sent, aya::maps::MapError> {
        self.shared.sent.get(&self.sender, 0)
    }

    fn withdraw(&self) {
        if self.offered.is_some() {
            let _ = self
                .shared
                .shortcuts
                .lock()
                .expect("shortcuts lock")
                .remove(&self.sender);
        }
    }
}

impl Drop for Bypass<'_> {
    fn drop(&mut self) {
        if let Some(state) = &self.state {
            state.withdraw();
        }
    }
}

/// Bytes in `fd`'s send queue not yet acknowledged by the peer (SIOCOUTQ).
fn send_queue(fd: RawFd) -> io::Result<usize> {
    let mut n: libc::c_int = 0;
    // SAFETY: SIOCOUTQ writes one int through the pointer, which is valid for it.
    if unsafe { libc::ioctl(fd, libc::TIOCOUTQ, &raw mut n) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(usize::try_from(n).unwrap_or(0))
}
