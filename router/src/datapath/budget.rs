//! The kernel memory the sockets of relayed streams may pin, shared out among them.
//!
//! TCP's memory is one pool for the whole machine (`net.ipv4.tcp_mem`). Past its pressure
//! mark, the kernel lets a socket grow only while it holds less than an even share of the
//! pool: segments of the sockets that hold more are pruned and dropped, and their senders wait
//! out retransmission timeouts. A thousand relayed sockets, each autotuning its receive buffer
//! towards `tcp_rmem`'s largest (32 MiB here), go a long way towards that mark on their own
//! (docs/performance.md, "1,000 streams: who holds TCP's memory").
//!
//! So the sockets of relayed streams share a budget: a quarter of what TCP may use before the
//! kernel starts to economise (`tcp_mem`'s first figure). A socket relayed gets half of what
//! is left of the budget as a fixed receive buffer, never more than a stream can use
//! ([`CEILING`], twice its largest window) and never less than [`FLOOR`], and gives it back
//! when its stream ends. The first few dozen streams get the ceiling; once the budget is spent,
//! streams get the floor, so the sockets hold at most the budget plus a floor per stream.
//! Where `net.core.rmem_max` is too small to set a share (distributions ship 208 KiB), the
//! socket autotunes instead.

use std::{
    io,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
};

/// What a socket gets when the budget is spent: two loopback segments' worth.
pub const FLOOR: usize = 128 * 1024;
/// The most a socket gets: twice a stream's largest window, which is all the socket's queue
/// can usefully hold.
pub const CEILING: usize = 2 * crate::link::stream::MAX_WINDOW as usize;
/// The budget when `tcp_mem` cannot be read.
const FALLBACK: usize = 128 * 1024 * 1024;

/// The budget and how much of it the live streams hold.
#[derive(Debug)]
pub struct ReceiveBudget {
    bytes: usize,
    /// The largest receive buffer `SO_RCVBUF` can give (twice `net.core.rmem_max`).
    settable: usize,
    allotted: Arc<AtomicUsize>,
}

impl Default for ReceiveBudget {
    fn default() -> Self {
        let settable = std::fs::read_to_string("/proc/sys/net/core/rmem_max")
            .ok()
            .and_then(|max| max.trim().parse::<usize>().ok())
            .map_or(0, |max| max.saturating_mul(2));
        Self::new(from_tcp_mem().unwrap_or(FALLBACK), settable)
    }
}

/// What a relayed stream holds of the budget, given back when dropped.
#[derive(Debug)]
pub struct Share {
    bytes: usize,
    allotted: Arc<AtomicUsize>,
}

impl Drop for Share {
    fn drop(&mut self) {
        self.allotted.fetch_sub(self.bytes, Ordering::Relaxed);
    }
}

impl ReceiveBudget {
    #[must_use]
    pub fn new(bytes: usize, settable: usize) -> Self {
        Self {
            bytes,
            settable,
            allotted: Arc::default(),
        }
    }

    /// The budget in bytes.
    #[must_use]
    pub const fn bytes(&self) -> usize {
        self.bytes
    }

    /// What the live streams hold of it, in bytes.
    #[must_use]
    pub fn allotted(&self) -> usize {
        self.allotted.load(Ordering::Relaxed)
    }

    /// Allots `socket` its share and sets it as the socket's receive buffer, when it can be
    /// set. A socket the kernel refuses to cap still relays.
    pub fn enter(&self, socket: socket2::SockRef<'_>) -> Share {
        let mut bytes = FLOOR;
        let _ = self
            .allotted
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |allotted| {
                bytes = share(self.bytes.saturating_sub(allotted));
                Some(allotted.saturating_add(bytes))
            });
        if bytes <= self.settable {
            // The kernel doubles what it is given, for its own bookkeeping: ask for half.
            if let Err(e) = socket.set_recv_buffer_size(bytes / 2) {
                tracing::debug!(error = %e, "could not cap a relayed socket's receive buffer");
            }
        }
        Share {
            bytes,
            allotted: Arc::clone(&self.allotted),
        }
    }
}

/// The receive buffer (as the kernel counts it) for a socket relayed while `left` bytes of
/// the budget are not allotted.
#[must_use]
pub fn share(left: usize) -> usize {
    (left / 2).clamp(FLOOR, CEILING)
}

/// A quarter of `tcp_mem`'s first figure (pages below which TCP's memory is not under
/// pressure), in bytes.
fn from_tcp_mem() -> io::Result<usize> {
    let text = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_mem")?;
    let pages: usize = text
        .split_whitespace()
        .next()
        .and_then(|p| p.parse().ok())
        .ok_or_else(|| io::Error::other(format!("unexpected tcp_mem: {text:?}")))?;
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    let page = usize::try_from(page).unwrap_or(4096);
    Ok(pages.saturating_mul(page) / 4)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stream_gets_half_of_what_is_left_between_the_floor_and_the_ceiling() {
        assert_eq!(share(usize::MAX), CEILING);
        assert_eq!(share(2 * CEILING), CEILING);
        assert_eq!(share(3 * FLOOR), 3 * FLOOR / 2);
        assert_eq!(share(FLOOR), FLOOR);
        assert_eq!(share(0), FLOOR);
    }

    #[test]
    fn sockets_hold_the_budget_plus_a_floor_each_and_give_it_back() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let sockets: Vec<std::net::TcpStream> = (0..4)
            .map(|_| std::net::TcpStream::connect(listener.local_addr().expect("addr")))
            .collect::<Result<_, _>>()
            .expect("connect");
        let recv_buffer =
            |s: &std::net::TcpStream| socket2::SockRef::from(s).recv_buffer_size().expect("get");
        // A budget of six floors: half (three floors), then half the rest, then the floor.
        let budget = ReceiveBudget::new(6 * FLOOR, 6 * FLOOR);
        let shares: Vec<Share> = sockets[..3]
            .iter()
            .map(|s| budget.enter(socket2::SockRef::from(s)))
            .collect();
        let got: Vec<usize> = sockets[..3].iter().map(recv_buffer).collect();
        assert_eq!(got, [3 * FLOOR, 3 * FLOOR / 2, FLOOR]);
        assert_eq!(
            budget.allotted.load(Ordering::Relaxed),
            5 * FLOOR + FLOOR / 2
        );
        drop(shares);
        assert_eq!(budget.allotted.load(Ordering::Relaxed), 0);
        // With the shares given back, the next stream has half the budget again.
        let _fourth = budget.enter(socket2::SockRef::from(&sockets[3]));
        assert_eq!(recv_buffer(&sockets[3]), 3 * FLOOR);
        // A share larger than rmem_max allows leaves the socket autotuning.
        let autotuned = ReceiveBudget::new(6 * FLOOR, FLOOR);
        let before = recv_buffer(&sockets[0]);
        let _fifth = autotuned.enter(socket2::SockRef::from(&sockets[0]));
        assert_eq!(recv_buffer(&sockets[0]), before);
    }
}
