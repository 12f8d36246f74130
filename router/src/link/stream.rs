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
