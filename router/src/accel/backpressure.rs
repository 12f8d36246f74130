//! Flow control for accelerated sockets.
//!
//! sk_msg redirection moves a message into the peer socket's receive queue without looking at
//! the peer's receive buffer: the kernel (6.18 here) charges the bytes to the peer and stops
//! only at the global TCP memory limit, where the sender gets ENOMEM (sk_msg diverts senders
//! before that, past `tcp_mem`'s low mark: see ebpf/src/sk_msg.rs). Measured on this machine:
//! a local client pushing into an accelerated router whose backend does not read left 2 GB in
//! the backend's queue within four seconds. TCP's flow control is gone from both local legs,
//! so the router puts a bound back on each direction it takes part in:
//!
//! The bound is the one TCP itself applies to a receive queue: the maximum of `tcp_rmem` (per
//! network namespace; 6 MiB by default, 32 MiB on this machine), kept between 4 and 64 MiB.
//!
//! - Bytes the router writes ([`Outflow`]): before writing, the router asks sock_diag how much
//!   the peer has not read yet, and waits while that exceeds the bound. It asks once per
//!   `bound - queued` bytes written, so a reader that keeps up costs one query per bound.
//! - Bytes the router reads ([`Inflow`]): the router cannot slow a sender down, but it sees its
//!   own queue (FIONREAD). When that exceeds the bound it diverts the sender: it writes the
//!   sender's key into the diverted map, and sk_msg passes that sender's messages on the normal
//!   TCP path from then on, where TCP's flow control holds it back. Diverting is for good, since
//!   the router drains redirected bytes before TCP ones and switching back could reorder them;
//!   a stream that outruns its reader once keeps TCP's speed on that leg afterwards.
//!
//! Per stream and direction the kernel then holds about one bound of redirected bytes, plus one
//! TCP receive buffer once a sender is diverted.
//!
//! A smaller bound costs speed: on this machine, with 4 MiB, iperf3 through an accelerated hop
//! was diverted within a second of every run (the client fills the router's queue faster than
//! one router thread copies it out whenever the scheduler runs the client for a while) and
//! reached 10-11 Gbit/s; with 32 MiB, 13-18 Gbit/s.

use std::{
    future::Future,
    io,
    net::SocketAddr,
    os::fd::{AsRawFd as _, BorrowedFd, RawFd},
    sync::{
        Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use aya::maps::{HashMap, MapData};
use ebpf_common::{Sent, Shortcut, SockKey};

use super::sock_diag;

/// Least and most unread bytes an accelerated socket may hold before the router holds back (its
/// own writes) or diverts the sender (its reads); between them, tcp_rmem's maximum.
const MIN_QUEUE_LIMIT: usize = 4 << 20;
const MAX_QUEUE_LIMIT: usize = 64 << 20;

/// How often, at most and at least, a router that waits on its downstream looks at the queue
/// of the socket it reads (see [`next_look`]).
const MIN_WATCH_INTERVAL: Duration = Duration::from_millis(2);
const MAX_WATCH_INTERVAL: Duration = Duration::from_millis(50);

/// How long a read of a redirected socket waits to be woken before the router looks whether
/// bytes are there anyway (see [`Inflow::read_stuck`]).
const STUCK_AFTER: Duration = Duration::from_millis(20);

/// Longest pause between two looks at a full peer queue.
const MAX_PAUSE: Duration = Duration::from_millis(8);

/// Shared by every accelerated connection of a router: the diverted map and the counters.
pub struct Backpressure {
    limit: usize,
    /// The router's network namespace cookie, read from its first accelerated socket: every
    /// socket the router makes lives in that namespace, so one getsockopt serves them all.
    /// (`None` when the kernel cannot say: then no socket is guarded.)
    netns: std::sync::OnceLock<Option<u64>>,
    diverted: Mutex<HashMap<MapData, SockKey, u32>>,
    /// What workload sockets have sent (kept by the programs; read here) and the shortcuts
    /// offered to them (see [`super::shortcut`]).
    pub(super) sent: HashMap<MapData, SockKey, Sent>,
    pub(super) shortcuts: Mutex<HashMap<MapData, SockKey, Shortcut>>,
    /// Whether sk_msg can bound a shortcut (it knows where to read the far socket's queue).
    pub(super) shortcuts_possible: bool,
    pub(super) shortcuts_offered: AtomicU64,
    pub(super) shortcuts_given_up: AtomicU64,
    senders_diverted: AtomicU64,
    divert_failures: AtomicU64,
    writes_paused: AtomicU64,
    reads_unstuck: AtomicU64,
}

impl std::fmt::Debug for Backpressure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Backpressure").finish_non_exhaustive()
    }
}

/// Counts of what [`Backpressure`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Senders diverted to the TCP path because the router's queue grew past the limit.
    pub senders_diverted: u64,
    /// Diverts the map refused (full); those senders stay redirected and unbounded.
    pub divert_failures: u64,
    /// Times the router paused writing because a peer's queue was full.
    pub writes_paused: u64,
    /// Reads made past a readiness the kernel never signalled: bytes waited on a redirected
    /// socket while the router's read waited to be woken (see [`Inflow::read_stuck`]).
    pub reads_unstuck: u64,
    /// Shortcuts offered (a long stream gets one each time the router catches up after its
    /// sender fell back to it).
    pub shortcuts_offered: u64,
    /// Stream directions that never got a shortcut because a workload is not counted (it is
    /// outside the cgroup, or was not in the sockhash).
    pub shortcuts_given_up: u64,
}

impl Backpressure {
    pub(super) fn new(
        diverted: HashMap<MapData, SockKey, u32>,
        sent: HashMap<MapData, SockKey, Sent>,
        shortcuts: HashMap<MapData, SockKey, Shortcut>,
        shortcuts_possible: bool,
    ) -> Self {
        Self {
            limit: queue_limit(),
            netns: std::sync::OnceLock::new(),
            diverted: Mutex::new(diverted),
            sent,
            shortcuts: Mutex::new(shortcuts),
            shortcuts_possible,
            shortcuts_offered: AtomicU64::new(0),
            shortcuts_given_up: AtomicU64::new(0),
            senders_diverted: AtomicU64::new(0),
            divert_failures: AtomicU64::new(0),
            writes_paused: AtomicU64::new(0),
            reads_unstuck: AtomicU64::new(0),
        }
    }

    /// Unread bytes a redirected socket may hold before the router acts.
    #[must_use]
    pub const fn limit(&self) -> usize {
        self.limit
    }

    /// What has happened so far.
    #[must_use]
    pub fn stats(&self) -> Stats {
        Stats {
            senders_diverted: self.senders_diverted.load(Ordering::Relaxed),
            divert_failures: self.divert_failures.load(Ordering::Relaxed),
            writes_paused: self.writes_paused.load(Ordering::Relaxed),
            reads_unstuck: self.reads_unstuck.load(Ordering::Relaxed),
            shortcuts_offered: self.shortcuts_offered.load(Ordering::Relaxed),
            shortcuts_given_up: self.shortcuts_given_up.load(Ordering::Relaxed),
        }
    }

    /// Number of workload sockets whose sends the programs count (entries of the sent map;
    /// sock_ops removes each when its socket closes).
    ///
    /// # Errors
    /// When the map cannot be read.
    pub fn counted_len(&self) -> Result<usize, aya::maps::MapError> {
        self.sent.keys().try_fold(0, |n, key| key.map(|_| n + 1))
    }

    /// Watches what the peer of socket `fd` sends to the router. The guard must not outlive
    /// the socket.
    #[must_use]
    pub fn inflow(&self, fd: BorrowedFd<'_>) -> Inflow<'_> {
        let sender = self.sock_key(fd).map(|key| key.peer());
        Inflow {
            guard: sender.map(|sender| (self, sender)),
            fd: fd.as_raw_fd(),
            diverted: false,
            plain: false,
        }
    }

    /// Paces what the router writes to the peer of socket `fd`.
    #[must_use]
    pub fn outflow(&self, fd: BorrowedFd<'_>) -> Outflow<'_> {
        let ends = super::socket_ends(fd);
        Outflow {
            guard: ends.map(|(local, peer)| (self, local, peer)),
            budget: self.limit,
        }
    }

    /// The key sock_ops gave socket `fd` in the sockhash.
    pub(super) fn sock_key(&self, fd: BorrowedFd<'_>) -> Option<SockKey> {
        let (local, peer) = super::socket_ends(fd)?;
        let netns = (*self
            .netns
            .get_or_init(|| super::netns_cookie(fd.as_raw_fd()).ok()))?;
        let (local_key, peer_key) = (super::endpoint_key(local), super::endpoint_key(peer));
        Some(SockKey {
            netns,
            local_ip: local_key.ip,
            remote_ip: peer_key.ip,
            local_port: local_key.port,
            remote_port: peer_key.port,
        })
    }

    fn divert(&self, sender: SockKey) -> bool {
        let mut diverted = self.diverted.lock().expect("diverted map lock");
        // sk_msg diverts a sender at the limit itself, and counts it.
        if diverted.get(&sender, 0).is_ok() {
            return true;
        }
        match diverted.insert(sender, 1, 0) {
            Ok(()) => {
                self.senders_diverted.fetch_add(1, Ordering::Relaxed);
                true
            }
            Err(e) => {
                self.divert_failures.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %e, "failed to divert a sender; its queue stays unbounded");
                false
            }
        }
    }

    fn forget(&self, sender: &SockKey) {
        let _ = self
            .diverted
            .lock()
            .expect("diverted map lock")
            .remove(sender);
    }
}

/// The router's view of one accelerated socket it reads: diverts the sender when the socket's
/// queue grows past the limit. Inert when acceleration is off.
#[derive(Debug)]
pub struct Inflow<'a> {
    guard: Option<(&'a Backpressure, SockKey)>,
    fd: RawFd,
    diverted: bool,
    /// The router reads the socket itself (plain TCP): bytes a lost wakeup left may be read
    /// straight from it ([`Inflow::read_stuck`]).
    plain: bool,
}

impl Inflow<'_> {
    /// A guard that does nothing (acceleration off, or not a socket the router accelerates).
    #[must_use]
    pub const fn inert() -> Self {
        Self {
            guard: None,
            fd: -1,
            diverted: false,
            plain: false,
        }
    }

    /// Looks at the socket's queue; call after each read.
    pub fn check(&mut self) {
        self.look();
    }

    /// Says the router reads the socket itself, as plain TCP (no TLS above it).
    #[must_use]
    pub const fn reading_plain_tcp(mut self) -> Self {
        self.plain = true;
        self
    }

    /// How long a read of the socket may wait to be woken before [`Inflow::read_stuck`] looks
    /// whether bytes are there after all; `None` when the socket is not redirected or not
    /// read as plain TCP.
    #[must_use]
    pub fn stuck_after(&self) -> Option<Duration> {
        self.guard.filter(|_| self.plain).map(|_| STUCK_AFTER)
    }

    /// Reads into `buf` what waits on the socket although no wakeup said so. A redirected
    /// socket can lose its wakeup: when the reader drains the redirected queue and reads on
    /// into the TCP queue behind it, the reactor may be left waiting for an edge that never
    /// comes from a sender that sends nothing more (seen on 6.18: a diverted client held still,
    /// 3.9 MB left unread on the TCP path for good, the router waiting to be woken).
    /// `None` when nothing waits, or the socket is not redirected.
    ///
    /// Only for a plain TCP socket the caller reads itself: the bytes bypass any layer above.
    pub fn read_stuck(&mut self, buf: &mut bytes::BytesMut) -> Option<io::Result<usize>> {
        let (backpressure, _) = self.guard.filter(|_| self.plain)?;
        // FIONREAD cannot tell: on a redirected socket it counts the redirected queue only
        // (tcp_bpf_ioctl), not what waits on the TCP path. One non-blocking recv can.
        if buf.capacity() == buf.len() {
            buf.reserve(crate::datapath::BUFFER_SIZE);
        }
        let spare = buf.spare_capacity_mut();
        // SAFETY: recv writes at most `spare.len()` bytes into memory `buf` owns.
        let n = unsafe {
            libc::recv(
                self.fd,
                spare.as_mut_ptr().cast(),
                spare.len(),
                libc::MSG_DONTWAIT,
            )
        };
        match usize::try_from(n) {
            Ok(n) => {
                // SAFETY: the kernel initialised those `n` bytes.
                unsafe { buf.set_len(buf.len() + n) };
                backpressure.reads_unstuck.fetch_add(1, Ordering::Relaxed);
                Some(Ok(n))
            }
            Err(_) => match io::Error::last_os_error() {
                e if e.kind() == io::ErrorKind::WouldBlock => None,
                e => Some(Err(e)),
            },
        }
    }

    /// Looks at the socket's queue, diverts the sender when it is over the limit, and returns
    /// what it holds.
    fn look(&mut self) -> usize {
        let Some((backpressure, sender)) = self.guard else {
            return 0;
        };
        let queued = unread(self.fd).unwrap_or(0);
        if self.diverted || queued <= backpressure.limit {
            return queued;
        }
        self.diverted = true;
        if !backpressure.divert(sender) {
            self.guard = None;
        }
        queued
    }

    /// Runs `wait` (the router waiting on its downstream), looking at the queue meanwhile:
    /// often while it grows towards the limit, rarely while it does not, so that thousands of
    /// streams waiting on slow peers do not wake the router every few milliseconds.
    pub async fn watch<F: Future>(&mut self, wait: F) -> F::Output {
        tokio::pin!(wait);
        let mut interval = MIN_WATCH_INTERVAL;
        let mut last = None;
        while let (Some((backpressure, _)), false) = (self.guard, self.diverted) {
            tokio::select! {
                biased;
                out = &mut wait => return out,
                () = tokio::time::sleep(interval) => {
                    let queued = self.look();
                    interval = next_look(backpressure.limit, last, queued, interval);
                    last = Some(queued);
                }
            }
        }
        wait.await
    }
}

impl Drop for Inflow<'_> {
    fn drop(&mut self) {
        if let (Some((backpressure, sender)), true) = (self.guard, self.diverted) {
            backpressure.forget(&sender);
        }
    }
}

/// The router's pacing of writes to one accelerated socket's peer. Inert when acceleration is
/// off, and once the peer cannot be found (it is not local, or it closed).
#[derive(Debug)]
pub struct Outflow<'a> {
    guard: Option<(&'a Backpressure, SocketAddr, SocketAddr)>,
    /// Bytes that may be written before the peer's queue is looked at again.
    budget: usize,
}

impl Outflow<'_> {
    /// A guard that does nothing.
    #[must_use]
    pub const fn inert() -> Self {
        Self {
            guard: None,
            budget: 0,
        }
    }

    /// Looks at the peer's queue before the next write: something else (a shortcut) may have
    /// filled it since the last look.
    pub fn look_again(&mut self) {
        self.budget = 0;
    }

    /// Waits until `n` more bytes may be written.
    pub async fn reserve(&mut self, n: usize) {
        let Some((backpressure, local, peer)) = self.guard else {
            return;
        };
        if let Some(left) = self.budget.checked_sub(n) {
            self.budget = left;
            return;
        }
        let mut pause = Duration::from_millis(1);
        let mut paused = false;
        loop {
            let queued = match sock_diag::receive_queue(peer, local) {
                Ok(queued) => queued as usize,
                Err(e) => {
                    if e.kind() != io::ErrorKind::NotFound {
                        tracing::debug!(%peer, error = %e, "cannot see the peer's queue; not pacing");
                    }
                    self.guard = None;
                    return;
                }
            };
            // Once paused, resume at half the limit, so each pause buys a useful stretch.
            let limit = backpressure.limit;
            let resume_at = if paused { limit / 2 } else { limit };
            if queued < resume_at {
                self.budget = (limit - queued).saturating_sub(n);
                return;
            }
            if !paused {
                paused = true;
                backpressure.writes_paused.fetch_add(1, Ordering::Relaxed);
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(MAX_PAUSE);
        }
    }
}

/// Unread bytes a redirected socket may hold before the router, or sk_msg, acts: the maximum
/// of `tcp_rmem` in this network namespace, kept within 4-64 MiB.
#[must_use]
pub fn queue_limit() -> usize {
    std::fs::read_to_string("/proc/sys/net/ipv4/tcp_rmem")
        .ok()
        .and_then(|rmem| rmem.split_whitespace().nth(2)?.parse().ok())
        .unwrap_or(MIN_QUEUE_LIMIT)
        .clamp(MIN_QUEUE_LIMIT, MAX_QUEUE_LIMIT)
}

/// When to look at a queue again, given what it held at the last look (`last`, `interval`
/// ago) and now (`queued`): soon enough that, growing as fast as it just did, it cannot pass
/// `limit` before the next look by more than a quarter of the limit; twice as late as before
/// when it did not grow. Always within 2-50 ms: a sender that wakes from silence at loopback
/// speed (some GB/s) may overshoot by what it sends in 50 ms.
fn next_look(limit: usize, last: Option<usize>, queued: usize, interval: Duration) -> Duration {
    let grown = last.map_or(0, |last| queued.saturating_sub(last));
    let next = if grown == 0 {
        interval * 2
    } else {
        let room = (limit + limit / 4).saturating_sub(queued);
        interval.mul_f64(room as f64 / grown as f64)
    };
    next.clamp(MIN_WATCH_INTERVAL, MAX_WATCH_INTERVAL)
}

/// Bytes waiting to be read on `fd` (FIONREAD; with redirection it counts the redirected ones).
fn unread(fd: RawFd) -> io::Result<usize> {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int through the pointer, which is valid for it.
    if unsafe { libc::ioctl(fd, libc::FIONREAD, &raw mut n) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(usize::try_from(n).unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMIT: usize = 32 << 20;
    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn a_queue_that_does_not_grow_is_looked_at_less_and_less() {
        let mut interval = MIN_WATCH_INTERVAL;
        let mut seen = Vec::new();
        for _ in 0..8 {
            interval = next_look(LIMIT, Some(1000), 1000, interval);
            seen.push(interval.as_millis());
        }
        assert_eq!(seen, [4, 8, 16, 32, 50, 50, 50, 50]);
        // The first look has nothing to compare with: it backs off too.
        assert_eq!(next_look(LIMIT, None, 5 << 20, 2 * MS), 4 * MS);
    }

    #[test]
    fn a_growing_queue_is_looked_at_before_it_can_pass_the_limit() {
        // 1 MiB in 10 ms with 29 MiB of room (to limit + limit/4 = 40 MiB from 11 MiB):
        // 290 ms at that rate, so the next look is at the 50 ms cap.
        assert_eq!(
            next_look(LIMIT, Some(10 << 20), 11 << 20, 10 * MS),
            MAX_WATCH_INTERVAL
        );
        // 8 MiB in 10 ms with 8 MiB of room left: 10 ms.
        assert_eq!(next_look(LIMIT, Some(24 << 20), 32 << 20, 10 * MS), 10 * MS);
        // 30 MiB in 10 ms with 10 MiB of room: a third of the interval.
        assert_eq!(next_look(LIMIT, Some(0), 30 << 20, 9 * MS), 3 * MS);
        // Faster than that: as soon as allowed.
        assert_eq!(
            next_look(LIMIT, Some(0), 38 << 20, 10 * MS),
            MIN_WATCH_INTERVAL
        );
    }
}
