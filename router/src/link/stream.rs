//! One multiplexed stream on a link, split into its sending and receiving halves.
//!
//! Flow control is per stream and counted in bytes. The sender holds credit (a semaphore) that
//! only the peer's `Window` frames refill; it never has more than that in flight, so a stream
//! whose consumer is slow stops its own producer and nobody else. The receiver hands credit back
//! as the application consumes data, in batches of a quarter window to keep `Window` frames rare.

use std::sync::{
    Arc,
    atomic::{AtomicI64, Ordering},
};

use bytes::Bytes;
use tokio::sync::{Semaphore, mpsc};

use super::{
    Link,
    frame::{Frame, ResetCode},
};

/// Credit each side grants the other when a stream opens, in bytes.
pub const INITIAL_WINDOW: u32 = 512 * 1024;
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
    unacked: usize,
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
            reg,
            inbound,
            recv_budget,
            unacked: 0,
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

    /// Says that `n` received bytes were consumed, granting the peer credit for that many.
    pub async fn consumed(&mut self, n: usize) {
        self.unacked += n;
        if self.unacked >= INITIAL_WINDOW as usize / 4 {
            let increment = u32::try_from(self.unacked).expect("unacked stays below the window");
            self.unacked = 0;
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
    /// Bytes consumed and not yet granted back.
    unacked: usize,
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
    let credit = Credit {
        credit: tx.credit.available_permits() as u64,
        budget: rx.recv_budget.load(Ordering::Acquire),
        unacked: rx.unacked,
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

    /// Says that `n` received bytes were consumed; returns the `Window` increment to send
    /// when a quarter window has been consumed since the last one.
    pub fn consumed(&mut self, n: usize) -> Option<u32> {
        self.unacked += n;
        if self.unacked < INITIAL_WINDOW as usize / 4 {
            return None;
        }
        let increment = u32::try_from(self.unacked).expect("unacked stays below the window");
        self.unacked = 0;
        self.budget += i64::from(increment);
        Some(increment)
    }
}
