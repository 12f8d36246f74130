//! One multiplexed stream on a link, split into its sending and receiving halves.
//!
//! Flow control is per stream and counted in bytes. The sender holds credit (a semaphore) that
//! only the peer's `Window` frames refill; it never has more than that in flight, so a stream
//! whose consumer is slow stops its own producer and nobody else. The receiver hands credit back
//! as the application consumes data, in batches of a quarter window to keep `Window` frames rare.
//!
//! A stream's window grows while its reader keeps up ([`Grants`]): the credit loop spans both
//! routers and the link, and a window smaller than what the stream moves in that time caps
//! its speed. Growth is bounded per stream ([`MAX_WINDOW`]) and per link connection
//! ([`LINK_GROWTH`]), so a peer cannot make the router hold more than that for readers that
//! stop after keeping up.

use std::sync::{
    Arc,
    atomic::{AtomicI64, AtomicUsize, Ordering},
};

use bytes::Bytes;
use tokio::sync::{Semaphore, mpsc};

use super::{
    Link,
    frame::{Frame, ResetCode},
};

/// Credit each side grants the other when a stream opens, in bytes.
pub const INITIAL_WINDOW: u32 = 512 * 1024;
/// The most a stream's window grows to while its reader keeps up.
pub const MAX_WINDOW: u32 = 4 << 20;
/// Window growth the streams of one link connection may hold at once, beyond their initial
/// windows.
pub const LINK_GROWTH: usize = 32 << 20;
/// Largest `Data` frame payload; smaller than the window so a sender always makes progress.
pub const MAX_DATA: usize = 64 * 1024;

/// What arrives on a stream from the peer.
#[derive(Debug, PartialEq, Eq)]
pub enum Inbound {
    Data(Bytes),
    /// The peer will send no more data (half-close).
    Close,
    /// The stream is gone: the peer reset it, or the link died.
    Reset(ResetCode),
}

/// The link-side bookkeeping of one stream, held in the link's stream table.
#[derive(Debug)]
pub(super) struct Slot {
    pub inbound: mpsc::UnboundedSender<Inbound>,
    pub credit: Arc<Semaphore>,
    /// Bytes the peer may still send before we grant more; below zero is a protocol violation.
    pub recv_budget: Arc<AtomicI64>,
    /// The peer half-closed: Data after that is a protocol violation of the stream.
    pub peer_closed: std::sync::atomic::AtomicBool,
}

impl Slot {
    /// Ends the stream locally: the receiver sees `code`, a blocked sender wakes with an error.
    pub fn kill(&self, code: ResetCode) {
        let _ = self.inbound.send(Inbound::Reset(code));
        self.credit.close();
    }
}

/// Removes the stream from its link's table when both halves are gone.
#[derive(Debug)]
struct Registration {
    link: Arc<Link>,
    id: u32,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.link.forget_stream(self.id);
    }
}

/// The sending half of a stream.
#[derive(Debug)]
pub struct StreamTx {
    reg: Arc<Registration>,
    credit: Arc<Semaphore>,
}

/// The receiving half of a stream.
#[derive(Debug)]
pub struct StreamRx {
    reg: Arc<Registration>,
    inbound: mpsc::UnboundedReceiver<Inbound>,
    recv_budget: Arc<AtomicI64>,
    grants: Grants,
}

/// What a stream's receiver has granted back and how large its window has grown, with the
/// growth taken from its link connection's budget ([`LINK_GROWTH`]) and given back when the
/// stream goes.
#[derive(Debug)]
pub struct Grants {
    window: u32,
    /// Bytes consumed and not yet granted back.
    unacked: usize,
    /// Growth taken from `budget`.
    grown: usize,
    budget: Arc<AtomicUsize>,
}

impl Grants {
    fn new(budget: &Arc<AtomicUsize>) -> Self {
        Self {
            window: INITIAL_WINDOW,
            unacked: 0,
            grown: 0,
            budget: Arc::clone(budget),
        }
    }

    /// Says that `n` received bytes were consumed; returns the `Window` increment to send once
    /// a quarter window has been consumed since the last one. `caught_up` says whether the
    /// reader has written everything received so far: then the window doubles (up to
    /// [`MAX_WINDOW`], while the link's budget lasts), since it, not the reader, is what holds
    /// the stream back.
    pub fn consumed(&mut self, n: usize, caught_up: bool) -> Option<u32> {
        self.unacked += n;
        if self.unacked < self.window as usize / 4 {
            return None;
        }
        let mut increment = std::mem::take(&mut self.unacked);
        if caught_up && self.window < MAX_WINDOW {
            let more = self.window.min(MAX_WINDOW - self.window) as usize;
            let taken = self
                .budget
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |grown| {
                    (grown + more <= LINK_GROWTH).then_some(grown + more)
                })
                .is_ok();
            if taken {
                self.grown += more;
                self.window += u32::try_from(more).expect("at most MAX_WINDOW");
                increment += more;
            }
        }
        // Consumed bytes never exceed what was granted, so this stays below MAX_WINDOW twice.
        Some(u32::try_from(increment).expect("an increment stays below 2^32"))
    }
}

impl Drop for Grants {
    fn drop(&mut self) {
        self.budget.fetch_sub(self.grown, Ordering::AcqRel);
    }
}

/// Makes the two halves of stream `id` on `link`, and the slot the link keeps for it.
pub(super) fn new_stream(
    link: &Arc<Link>,
    id: u32,
    send_credit: u32,
) -> (StreamTx, StreamRx, Slot) {
    let (inbound_tx, inbound) = mpsc::unbounded_channel();
    let credit = Arc::new(Semaphore::new(send_credit as usize));
    let recv_budget = Arc::new(AtomicI64::new(i64::from(INITIAL_WINDOW)));
    let reg = Arc::new(Registration {
        link: Arc::clone(link),
        id,
    });
    let slot = Slot {
        inbound: inbound_tx,
        credit: Arc::clone(&credit),
        recv_budget: Arc::clone(&recv_budget),
        peer_closed: std::sync::atomic::AtomicBool::new(false),
    };
    (
        StreamTx {
            reg: Arc::clone(&reg),
            credit,
        },
        StreamRx {
            grants: Grants::new(&link.window_growth),
            reg,
            inbound,
            recv_budget,
        },
        slot,
    )
}

/// The link died or the stream was reset while sending.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("stream is gone")]
pub struct Gone;

impl StreamTx {
    /// The stream's id on its link.
    #[must_use]
    pub fn id(&self) -> u32 {
        self.reg.id
    }

    /// The link this stream runs on.
    #[must_use]
    pub fn link(&self) -> &Arc<Link> {
        &self.reg.link
    }

    /// Sends `data`, waiting for credit; splits it into frames of at most [`MAX_DATA`].
    ///
    /// # Errors
    /// When the stream was reset or its link died.
    pub async fn send(&self, mut data: Bytes) -> Result<(), Gone> {
        while !data.is_empty() {
            let chunk = data.split_to(data.len().min(MAX_DATA));
            let n = u32::try_from(chunk.len()).expect("chunks are at most MAX_DATA");
            self.credit
                .acquire_many(n)
                .await
                .map_err(|_| Gone)?
                .forget();
            self.reg
                .link
                .send(Frame::Data {
                    stream: self.reg.id,
                    data: chunk,
                })
                .await
                .map_err(|_| Gone)?;
        }
        Ok(())
    }

    /// Half-closes: tells the peer no more data follows.
    pub async fn close(&self) {
        let _ = self
            .reg
            .link
            .send(Frame::Close {
                stream: self.reg.id,
            })
            .await;
    }

    /// Resets the stream at the peer.
    pub async fn reset(&self, code: ResetCode, reason: &str) {
        self.credit.close();
        let _ = self
            .reg
            .link
            .send(Frame::Reset {
                stream: self.reg.id,
                code,
                reason: reason.to_owned(),
            })
            .await;
    }
}

impl StreamRx {
    /// The next thing the peer sent; a dead link reads as a reset.
    pub async fn recv(&mut self) -> Inbound {
        self.inbound
            .recv()
            .await
            .unwrap_or(Inbound::Reset(ResetCode::LinkLost))
    }

    /// What the peer sent, if it is already here; never waits. A dead link reads as a reset.
    pub fn try_recv(&mut self) -> Option<Inbound> {
        match self.inbound.try_recv() {
            Ok(inbound) => Some(inbound),
            Err(mpsc::error::TryRecvError::Empty) => None,
            Err(mpsc::error::TryRecvError::Disconnected) => {
                Some(Inbound::Reset(ResetCode::LinkLost))
            }
        }
    }

    /// Says that `n` received bytes were consumed, granting the peer credit for that many (and
    /// more, while the reader keeps up: see [`Grants`]).
    pub async fn consumed(&mut self, n: usize) {
        let caught_up = self.inbound.is_empty();
        if let Some(increment) = self.grants.consumed(n, caught_up) {
            self.recv_budget
                .fetch_add(i64::from(increment), Ordering::AcqRel);
            let _ = self
                .reg
                .link
                .send(Frame::Window {
                    stream: self.reg.id,
                    increment,
                })
                .await;
        }
    }
}

/// A stream's flow control held by one thread that drives the stream without tasks (an
/// io_uring worker), after it took the stream over from its two halves ([`take_over`]).
///
/// The rules are the halves' own: the peer may send `budget` bytes before more are granted,
/// and credit goes back in batches of a quarter window; this side may send `credit` bytes.
#[derive(Debug)]
pub struct Credit {
    /// Bytes this side may still send.
    credit: u64,
    /// Bytes the peer may still send before more are granted.
    budget: i64,
    grants: Grants,
}

/// The two halves of a stream, taken over by a [`Credit`]: they keep the stream registered
/// with its link until dropped.
#[derive(Debug)]
pub struct Halves {
    _tx: StreamTx,
    _rx: StreamRx,
}

/// Takes a stream over from its halves: its credit, the budget the peer has left, and what
/// the peer sent that nobody read yet, in order. A sender blocked on the halves' credit wakes
/// with an error from now on; everything the link receives for the stream afterwards must go
/// to the new owner, not to the halves' queue.
pub fn take_over(tx: StreamTx, mut rx: StreamRx) -> (Credit, Vec<Inbound>, Halves) {
    let mut pending = Vec::new();
    while let Ok(inbound) = rx.inbound.try_recv() {
        pending.push(inbound);
    }
    let grants = Grants::new(&rx.grants.budget);
    let credit = Credit {
        credit: tx.credit.available_permits() as u64,
        budget: rx.recv_budget.load(Ordering::Acquire),
        grants: std::mem::replace(&mut rx.grants, grants),
    };
    tx.credit.close();
    (credit, pending, Halves { _tx: tx, _rx: rx })
}

impl Credit {
    /// Bytes this side may send now.
    #[must_use]
    pub const fn available(&self) -> u64 {
        self.credit
    }

    /// Spends `n` bytes of credit on data sent.
    pub fn spend(&mut self, n: usize) {
        self.credit = self.credit.saturating_sub(n as u64);
    }

    /// Adds the peer's `Window` increment.
    ///
    /// # Errors
    /// When it takes the credit past 2^31-1 bytes (docs/protocol.md): the link must end.
    pub fn grant(&mut self, increment: u32) -> Result<(), &'static str> {
        let credit = self.credit + u64::from(increment);
        if credit > super::MAX_CREDIT as u64 {
            return Err("window grows credit beyond 2^31-1 bytes");
        }
        self.credit = credit;
        Ok(())
    }

    /// Takes in `len` bytes of the peer's data; `false` when they go beyond its budget.
    pub fn receive(&mut self, len: usize) -> bool {
        let len = i64::try_from(len).unwrap_or(i64::MAX);
        self.budget -= len;
        self.budget >= 0
    }

    /// Says that `n` received bytes were consumed (`caught_up`: nothing received is left to
    /// write); returns the `Window` increment to send, as [`Grants::consumed`] decides.
    pub fn consumed(&mut self, n: usize, caught_up: bool) -> Option<u32> {
        let increment = self.grants.consumed(n, caught_up)?;
        self.budget += i64::from(increment);
        Some(increment)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const QUARTER: usize = INITIAL_WINDOW as usize / 4;

    /// A reader that keeps up doubles its window at each grant, up to MAX_WINDOW; one that
    /// falls behind grants back only what it consumed.
    #[test]
    fn a_window_grows_while_its_reader_keeps_up_and_not_past_the_cap() {
        let budget = Arc::new(AtomicUsize::new(0));
        let mut grants = Grants::new(&budget);
        assert_eq!(grants.consumed(QUARTER - 1, true), None, "below a quarter");
        assert_eq!(
            grants.consumed(1, false),
            Some(QUARTER as u32),
            "behind: no growth"
        );
        assert_eq!(grants.window, INITIAL_WINDOW);
        let mut windows = Vec::new();
        for _ in 0..5 {
            let quarter = grants.window as usize / 4;
            grants.consumed(quarter, true).expect("a grant");
            windows.push(grants.window >> 10);
        }
        assert_eq!(windows, [1024, 2048, 4096, 4096, 4096], "KiB");
        assert_eq!(
            budget.load(Ordering::Acquire),
            (MAX_WINDOW - INITIAL_WINDOW) as usize
        );
        drop(grants);
        assert_eq!(
            budget.load(Ordering::Acquire),
            0,
            "growth goes back with the stream"
        );
    }

    /// The streams of one link connection together grow no further than LINK_GROWTH.
    #[test]
    fn a_link_connections_streams_share_one_growth_budget() {
        let budget = Arc::new(AtomicUsize::new(0));
        let mut streams: Vec<Grants> = (0..64).map(|_| Grants::new(&budget)).collect();
        for _ in 0..4 {
            for grants in &mut streams {
                let quarter = grants.window as usize / 4;
                grants.consumed(quarter, true);
            }
        }
        let grown: usize = streams.iter().map(|g| g.grown).sum();
        assert_eq!(grown, budget.load(Ordering::Acquire));
        assert!(grown <= LINK_GROWTH, "{grown}");
        assert!(
            grown + INITIAL_WINDOW as usize > LINK_GROWTH,
            "the budget was used: {grown}"
        );
    }
}
