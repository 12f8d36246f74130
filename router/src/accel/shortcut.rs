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
//! bounds. So sk_msg bounds it: each offer carries the limit the router applies elsewhere
//! ([`super::Backpressure::limit`]), and sk_msg takes the shortcut only while what the far
//! socket holds unread (its `sk_rmem_alloc`, read from the socket at the offset the router
//! found in the kernel's BTF, see [`super::btf`]) plus the message stays within it. A message
//! that does not fit goes to the router, where the usual flow control holds it back; the
//! router offers again when it has caught up and the far queue has room.
//!
//! Falling back to the router is safe but costly for a fast sender: it comes back only when
//! the router catches up between two of its sends, a race a sender that is twice as fast as
//! the router (one copy per byte against two) mostly wins. With the bound in the kernel that
//! happens only when the far reader really falls behind, not when a router thread is late.
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
    os::fd::{AsRawFd as _, BorrowedFd, RawFd},
    sync::atomic::Ordering,
};

use ebpf_common::{Sent, Shortcut, SockKey};

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
    /// `forwarded` of the offer in the map.
    offered: Option<u64>,
    /// Whether the router has read from the sender since that offer (see
    /// [`Bypass::fell_back`]).
    fallback_seen: bool,
    uncounted: u8,
    /// What the sender had sent by the shortcut when last seen.
    by_shortcut: u64,
}

impl Backpressure {
    /// The shortcut for bytes the router reads from socket `from` and writes to socket `to`:
    /// from `from`'s peer straight to `to`'s peer.
    #[must_use]
    pub fn bypass(&self, from: BorrowedFd<'_>, to: BorrowedFd<'_>) -> Bypass<'_> {
        let state = (|| {
            if !self.shortcuts_possible {
                return None;
            }
            let (sender, target) = (self.sock_key(from)?.peer(), self.sock_key(to)?.peer());
            Some(State {
                shared: self,
                sender,
                target,
                via: to.as_raw_fd(),
                target_local: super::socket_ends(to)?.1,
                target_remote: super::socket_ends(to)?.0,
                offered: None,
                fallback_seen: false,
                uncounted: 0,
                by_shortcut: 0,
            })
        })();
        Bypass { state }
    }
}

impl Bypass<'_> {
    /// Offers the sender the shortcut, if it may have it now: the router has forwarded
    /// `forwarded` bytes from it and holds none.
    pub fn offer(&mut self, forwarded: u64) {
        let Some(state) = &mut self.state else {
            return;
        };
        if let Err(reason) = state.offer(forwarded) {
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
        }
    }

    /// Whether bytes the router just read are the first since its latest offer: the sender has
    /// fallen back from the shortcut, which may have filled the far queue behind the router's
    /// pacing, so the pacing should look at that queue once before writing. Later reads need
    /// no look: a sender that went through the router cannot take the shortcut again until
    /// the next offer.
    pub fn fell_back(&mut self) -> bool {
        match &mut self.state {
            Some(state) if state.offered.is_some() && !state.fallback_seen => {
                state.fallback_seen = true;
                true
            }
            _ => false,
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
    /// `Ok(())` whether or not it offered (maybe later); `Err`: never again for this stream.
    fn offer(&mut self, forwarded: u64) -> Result<(), &'static str> {
        if self.offered == Some(forwarded) {
            return Ok(()); // nothing came through the router since: the offer stands
        }
        let (Ok(sent), true) = (self.sent(), self.shared.sent.get(&self.target, 0).is_ok()) else {
            self.uncounted += 1;
            if self.uncounted >= MAX_UNCOUNTED_LOOKS {
                return Err("a workload is not counted (outside the cgroup, or closed)");
            }
            return Ok(());
        };
        self.uncounted = 0;
        self.by_shortcut = sent.shortcut;
        // Bytes of ours still on the TCP path would arrive behind the shortcut's.
        if send_queue(self.via).map_err(|_| "cannot read the router's send queue")? > 0 {
            return Ok(());
        }
        let queue = sock_diag::queue(self.target_local, self.target_remote)
            .map_err(|_| "the far socket cannot be seen")?;
        if queue.tcp > 0 {
            return Ok(());
        }
        let limit = self.shared.limit();
        let room = limit.saturating_sub(queue.charged as usize);
        if room < limit / 4 {
            return Ok(());
        }
        let offer = Shortcut {
            to: self.target,
            forwarded,
            limit: limit as u64,
        };
        self.shared
            .shortcuts
            .lock()
            .expect("shortcuts lock")
            .insert(self.sender, offer, 0)
            .map_err(|_| "the shortcut map is full")?;
        self.offered = Some(forwarded);
        self.fallback_seen = false;
        self.shared
            .shortcuts_offered
            .fetch_add(1, Ordering::Relaxed);
        Ok(())
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
