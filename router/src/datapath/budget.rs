//! The kernel memory the sockets of relayed streams may pin, shared out among them.
//!
//! TCP's memory is one pool for the whole machine (`net.ipv4.tcp_mem`). Past its pressure
//! mark, the kernel lets a socket grow only while it holds less than an even share of the
//! pool, so the one socket that holds the most, a link connection carrying every stream, is
//! the one whose segments are dropped, and every stream on it waits out retransmission
//! timeouts. A thousand relayed sockets, each autotuning its receive buffer, reach that mark
//! on their own (docs/performance.md, "Many streams at once").
//!
//! So the router gives the sockets of relayed streams a budget: a quarter of what TCP may
//! use before the kernel starts to economise (`tcp_mem`'s first figure). While the budget
//! divided among the live streams is more than a stream can use (twice its largest window),
//! sockets autotune as usual; beyond that, each socket relayed from then on gets its share
//! as a fixed receive buffer, and never less than [`FLOOR`].

use std::{
    io,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
};

/// What a socket may pin when the budget is spread thin: a few records' worth.
pub const FLOOR: usize = 128 * 1024;
/// A share at least this large leaves the socket autotuning: twice a stream's largest window,
/// which is all the socket's queue can usefully hold.
pub const UNCAPPED: usize = 2 * crate::link::stream::MAX_WINDOW as usize;
/// The budget when `tcp_mem` cannot be read.
const FALLBACK: usize = 128 * 1024 * 1024;

/// The budget and the streams that share it.
#[derive(Debug)]
pub struct ReceiveBudget {
    bytes: usize,
    live: Arc<AtomicUsize>,
}

impl Default for ReceiveBudget {
    fn default() -> Self {
        Self::new(from_tcp_mem().unwrap_or(FALLBACK))
    }
}

/// A relayed stream's place in the budget, given up when dropped.
#[derive(Debug)]
pub struct Share(Arc<AtomicUsize>);

impl Drop for Share {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl ReceiveBudget {
    #[must_use]
    pub fn new(bytes: usize) -> Self {
        Self {
            bytes,
            live: Arc::default(),
        }
    }

    /// The budget in bytes.
    #[must_use]
    pub const fn bytes(&self) -> usize {
        self.bytes
    }

    /// Counts one more relayed stream, and caps `socket`'s receive buffer at its share when
    /// the share is below [`UNCAPPED`]. A socket the kernel refuses to cap still relays.
    pub fn enter(&self, socket: socket2::SockRef<'_>) -> Share {
        let live = self.live.fetch_add(1, Ordering::Relaxed) + 1;
        if let Some(cap) = cap(self.bytes, live) {
            // The kernel doubles what it is given, for its own bookkeeping: ask for half.
            if let Err(e) = socket.set_recv_buffer_size(cap / 2) {
                tracing::debug!(error = %e, "could not cap a relayed socket's receive buffer");
            }
        }
        Share(Arc::clone(&self.live))
    }
}

/// The receive buffer (as the kernel counts it) for a socket relayed while `live` streams
/// share `budget` bytes, or `None` to leave it autotuning.
#[must_use]
pub const fn cap(budget: usize, live: usize) -> Option<usize> {
    let share = budget / if live == 0 { 1 } else { live };
    if share >= UNCAPPED {
        None
    } else if share < FLOOR {
        Some(FLOOR)
    } else {
        Some(share)
    }
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
    fn few_streams_autotune_and_many_share_the_budget_down_to_the_floor() {
        let budget = 256 * 1024 * 1024;
        assert_eq!(cap(budget, 1), None);
        assert_eq!(cap(budget, 0), None);
        assert_eq!(cap(budget, budget / UNCAPPED), None);
        assert_eq!(
            cap(budget, budget / UNCAPPED + 1),
            Some(budget / (budget / UNCAPPED + 1))
        );
        assert_eq!(cap(budget, 1000), Some(budget / 1000));
        assert_eq!(cap(budget, 1_000_000), Some(FLOOR));
    }

    #[test]
    fn a_socket_relayed_beyond_the_budget_gets_its_share_and_the_share_is_given_back() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let sockets: Vec<std::net::TcpStream> = (0..3)
            .map(|_| std::net::TcpStream::connect(listener.local_addr().expect("addr")))
            .collect::<Result<_, _>>()
            .expect("connect");
        let recv_buffer =
            |s: &std::net::TcpStream| socket2::SockRef::from(s).recv_buffer_size().expect("get");
        let autotuned = recv_buffer(&sockets[2]);
        // Two streams already share a budget of three floors: the third gets one and a half.
        let budget = ReceiveBudget::new(3 * FLOOR);
        let first = budget.enter(socket2::SockRef::from(&sockets[0]));
        let second = budget.enter(socket2::SockRef::from(&sockets[1]));
        assert_eq!(
            recv_buffer(&sockets[0]),
            3 * FLOOR,
            "one stream: its whole budget"
        );
        assert_eq!(recv_buffer(&sockets[1]), 3 * FLOOR / 2);
        drop((first, second));
        assert_eq!(budget.live.load(Ordering::Relaxed), 0);
        // With the shares given back, a large budget leaves the socket as it was.
        let _third = ReceiveBudget::new(64 * UNCAPPED).enter(socket2::SockRef::from(&sockets[2]));
        assert_eq!(recv_buffer(&sockets[2]), autotuned);
    }
}
