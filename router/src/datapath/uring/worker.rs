//! One io_uring worker: a thread with its own ring and buffers, moving the bytes of the
//! connections handed to it.
//!
//! Each connection is a pair of sockets and two directions. A direction has one multishot
//! recv on its source, which takes buffers from the worker's provided-buffer ring as data
//! arrives, and at most one sendmsg in flight on its destination, carrying every chunk that
//! has arrived (up to [`MAX_IOV`]) in one call. Chunks leave in the order they came; a chunk
//! goes back to the buffer ring once sent. A direction whose destination is slow stops
//! receiving at [`HIGH_WATER`] queued bytes (its recv is cancelled) and starts again below
//! [`LOW_WATER`], so a slow reader holds a bounded number of buffers; a direction that finds
//! the ring empty waits for a buffer to come back. End-of-stream half-closes the destination
//! (shutdown SHUT_WR); a failure closes both sockets with RST.

use std::{
    collections::VecDeque,
    io,
    os::fd::{AsRawFd as _, OwnedFd, RawFd},
    sync::mpsc,
};

use io_uring::{IoUring, cqueue, opcode, squeue, types};
use tokio::sync::oneshot;

use super::super::{Failure, Outcome, Side};
use super::bufring::BufRing;

/// Size of one provided buffer.
pub(super) const BUF_SIZE: u32 = 64 * 1024;
/// Buffers per worker (a power of two).
pub(super) const BUFS: u16 = 128;
/// Size of one provided buffer for what served link streams receive: one Data frame each.
pub(super) const STREAM_BUF_SIZE: u32 = 256 * 1024;
/// Those buffers per worker (a power of two).
pub(super) const STREAM_BUFS: u16 = 32;
/// Queued bytes at which a direction stops receiving.
const HIGH_WATER: usize = 4 * BUF_SIZE as usize;
/// Queued bytes below which a stopped direction receives again.
const LOW_WATER: usize = HIGH_WATER / 2;
/// Chunks one sendmsg carries at most.
pub(super) const MAX_IOV: usize = 16;
/// Submission queue entries; the completion queue is four times as deep.
const SQ_ENTRIES: u32 = 1024;

/// Work for a worker.
pub(super) enum Msg {
    /// Proxy between `a` (the client, downstream) and `b` (the backend, upstream).
    Proxy {
        a: OwnedFd,
        b: OwnedFd,
        done: oneshot::Sender<Outcome>,
    },
    /// Carry a link connection (see [`super::carrier`]).
    Carry {
        link: std::sync::Arc<crate::link::Link>,
        carried: crate::link::Carried,
    },
    /// Serve a stream of a link connection carried here.
    Relay(super::carrier::Relay),
    /// Cancel everything and end the thread.
    Stop,
}

// user_data: the connection's slot above, the operation in the low byte.
const WAKE: u64 = u64::MAX;
const OP_RECV: u64 = 0; // + direction
const OP_SEND: u64 = 2; // + direction
const OP_SHUT: u64 = 4; // + direction
const OP_CANCEL: u64 = 6;

pub(super) const fn user_data(slot: usize, op: u64) -> u64 {
    ((slot as u64) << 8) | op
}

/// Bytes of one buffer waiting to be sent.
#[derive(Clone, Copy, Debug)]
struct Chunk {
    bid: u16,
    off: u32,
    len: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Recv {
    Idle,
    Armed,
    Cancelling,
}

/// The sendmsg arguments of a direction; boxed, so the kernel's pointers into it stay valid.
pub(super) struct SendArgs {
    pub(super) hdr: libc::msghdr,
    pub(super) iov: [libc::iovec; MAX_IOV],
}

struct Dir {
    queue: VecDeque<Chunk>,
    queued: usize,
    recv: Recv,
    /// The buffer ring was empty when this direction last received.
    starved: bool,
    eof: bool,
    sending: bool,
    shutting: bool,
    shut: bool,
    bytes: u64,
    send: Box<SendArgs>,
}

impl Dir {
    fn new() -> Self {
        Self {
            queue: VecDeque::new(),
            queued: 0,
            recv: Recv::Idle,
            starved: false,
            eof: false,
            sending: false,
            shutting: false,
            shut: false,
            bytes: 0,
            // SAFETY: msghdr and iovec are plain C structs; all-zero is their empty value.
            send: Box::new(unsafe { std::mem::zeroed() }),
        }
    }
}

struct Pair {
    fds: [OwnedFd; 2],
    dirs: [Dir; 2],
    /// When the first byte of the answer (direction 1) reached the client.
    first_response: Option<std::time::Instant>,
    /// Operations submitted and not yet completed for good.
    inflight: u32,
    failed: Option<Failure>,
    done: Option<oneshot::Sender<Outcome>>,
}

/// The side a direction reads from and the side it writes to: direction 0 is client to
/// backend, direction 1 backend to client.
const fn sides(dir: usize) -> (Side, Side) {
    if dir == 0 {
        (Side::Downstream, Side::Upstream)
    } else {
        (Side::Upstream, Side::Downstream)
    }
}

/// Asks a ring builder for some setup flags.
type SetupFlags = fn(&mut io_uring::Builder);

/// Sets up a ring with the most useful flags this kernel takes; `ring_flags` says which.
///
/// # Errors
/// What `io_uring_setup` returns for the last attempt.
pub(super) fn setup(ring_flags: &mut String) -> io::Result<IoUring> {
    let attempts: [(&str, SetupFlags); 3] = [
        ("single issuer, deferred task running", |b| {
            b.setup_single_issuer().setup_defer_taskrun();
        }),
        ("cooperative task running", |b| {
            b.setup_coop_taskrun();
        }),
        ("no setup flags", |_| {}),
    ];
    let mut last = None;
    for (label, flags) in attempts {
        let mut builder = IoUring::builder();
        builder.setup_cqsize(SQ_ENTRIES * 4);
        flags(&mut builder);
        match builder.build(SQ_ENTRIES) {
            Ok(ring) => {
                label.clone_into(ring_flags);
                return Ok(ring);
            }
            // Older kernels refuse flags they do not know with EINVAL: try fewer.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => last = Some(e),
            Err(e) => return Err(e),
        }
    }
    Err(last.unwrap_or_else(|| io::Error::from_raw_os_error(libc::EINVAL)))
}

pub(super) struct Worker {
    ring: IoUring,
    pub(super) bufs: BufRing,
    /// Buffers served streams receive into (group 1), and whether any went back since the
    /// tail was last published.
    pub(super) stream_bufs: BufRing,
    pub(super) stream_returned: bool,
    pairs: Vec<Option<Pair>>,
    free: Vec<usize>,
    /// Directions that found the buffer ring empty, oldest first.
    starved: VecDeque<(usize, usize)>,
    /// Link connections carried here (see [`super::carrier`]), and free slots among them.
    pub(super) links: Vec<Option<super::carrier::Conn>>,
    pub(super) free_links: Vec<usize>,
    /// Served streams that found the buffer ring empty, by (link slot, stream slot).
    pub(super) starved_streams: VecDeque<(usize, usize)>,
    /// Links whose batch is to be sealed and sent after the completions at hand.
    pub(super) send_due: Vec<usize>,
    /// Link connections and streams taken so far (shared with `skiff status`).
    pub(super) carried_total: u64,
    pub(super) served_total: u64,
    /// Buffers pushed back since the tail was last published.
    returned: bool,
    pending: Vec<squeue::Entry>,
    wake: OwnedFd,
    wake_buf: Box<u64>,
    wake_armed: bool,
    /// Set by whoever writes the wake eventfd for a link, cleared before the worker looks:
    /// many frames queued at once wake the worker once.
    woken: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// Receives that found a buffer ring empty, counted for `skiff status` (shared by all
    /// workers of the router).
    starved_receives: std::sync::Arc<std::sync::atomic::AtomicU64>,
    jobs: mpsc::Receiver<Msg>,
    pub(super) stopping: bool,
}

impl Worker {
    /// A worker on `ring`, woken through eventfd `wake` when `jobs` has work. Checks that the
    /// kernel runs what the worker needs (a multishot recv with provided buffers) first.
    ///
    /// # Errors
    /// When the buffer ring cannot be registered or the check fails.
    pub(super) fn new(
        ring: IoUring,
        wake: OwnedFd,
        woken: std::sync::Arc<std::sync::atomic::AtomicBool>,
        starved_receives: std::sync::Arc<std::sync::atomic::AtomicU64>,
        jobs: mpsc::Receiver<Msg>,
    ) -> io::Result<Self> {
        let bufs = BufRing::new(&ring, 0, BUFS, BUF_SIZE).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("provided buffer rings (Linux 5.19+) are unavailable: {e}"),
            )
        })?;
        let stream_bufs = BufRing::new(&ring, 1, STREAM_BUFS, STREAM_BUF_SIZE)?;
        let mut worker = Self {
            ring,
            bufs,
            stream_bufs,
            stream_returned: false,
            pairs: Vec::new(),
            free: Vec::new(),
            starved: VecDeque::new(),
            links: Vec::new(),
            free_links: Vec::new(),
            starved_streams: VecDeque::new(),
            send_due: Vec::new(),
            carried_total: 0,
            served_total: 0,
            returned: false,
            pending: Vec::new(),
            wake,
            wake_buf: Box::new(0),
            wake_armed: false,
            woken,
            starved_receives,
            jobs,
            stopping: false,
        };
        worker.self_test().map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("multishot recv with provided buffers (Linux 6.0+) failed: {e}"),
            )
        })?;
        Ok(worker)
    }

    /// Receives one byte over a socket pair with a multishot recv, then its end-of-stream.
    fn self_test(&mut self) -> io::Result<()> {
        let (a, b) = std::os::unix::net::UnixStream::pair()?;
        let recv = opcode::RecvMulti::new(types::Fd(a.as_raw_fd()), self.bufs.group())
            .build()
            .user_data(1);
        // SAFETY: the entry names a buffer group, not memory of ours.
        unsafe { self.ring.submission().push(&recv) }
            .map_err(|_| io::Error::other("submission queue full"))?;
        self.ring.submit()?;
        io::Write::write_all(&mut &b, b"x")?;
        drop(b);
        let mut got = 0;
        loop {
            self.ring.submit_and_wait(1)?;
            let cqes: Vec<(i32, u32)> = self
                .ring
                .completion()
                .map(|c| (c.result(), c.flags()))
                .collect();
            for (result, flags) in cqes {
                if result < 0 {
                    return Err(io::Error::from_raw_os_error(-result));
                }
                if let Some(bid) = cqueue::buffer_select(flags) {
                    got += result;
                    self.bufs.taken();
                    self.bufs.push(bid);
                    self.bufs.publish();
                }
                if !cqueue::more(flags) {
                    return if got == 1 {
                        Ok(())
                    } else {
                        Err(io::Error::other(format!("{got} bytes instead of 1")))
                    };
                }
            }
        }
    }

    /// Runs until told to stop; every connection still open then is closed.
    pub(super) fn run(mut self) {
        self.arm_wake();
        loop {
            if let Err(e) = self.flush() {
                tracing::error!(error = %e, "io_uring submission failed; the worker stops");
                break;
            }
            if self.stopping
                && !self.wake_armed
                && self.pairs.iter().all(Option::is_none)
                && self.links_done()
            {
                break;
            }
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) => {
                    tracing::error!(error = %e, "io_uring wait failed; the worker stops");
                    break;
                }
            }
            let cqes: Vec<(u64, i32, u32)> = self
                .ring
                .completion()
                .map(|c| (c.user_data(), c.result(), c.flags()))
                .collect();
            for (user_data, result, flags) in cqes {
                self.complete(user_data, result, flags);
            }
            if self.returned {
                self.returned = false;
                self.bufs.publish();
            }
            if !self.starved.is_empty() {
                self.feed_starved();
            }
            if self.stream_returned {
                self.stream_returned = false;
                self.stream_bufs.publish();
            }
            if !self.starved_streams.is_empty() {
                self.feed_starved_streams();
            }
            self.send_due_links();
        }
        self.bufs.unregister(&self.ring);
        self.stream_bufs.unregister(&self.ring);
    }

    pub(super) fn push(&mut self, entry: squeue::Entry) {
        self.pending.push(entry);
    }

    /// Moves the entries made since the last call into the submission queue, submitting
    /// whenever it is full.
    fn flush(&mut self) -> io::Result<()> {
        let mut done = 0;
        while done < self.pending.len() {
            {
                let mut sq = self.ring.submission();
                for entry in &self.pending[done..] {
                    // SAFETY: every entry points only at memory that lives until its
                    // completion: boxed send arguments of a live pair, the worker's wake
                    // buffer, or buffers of the worker's ring.
                    if unsafe { sq.push(entry) }.is_err() {
                        break;
                    }
                    done += 1;
                }
            }
            if done < self.pending.len() {
                self.ring.submit()?;
            }
        }
        self.pending.clear();
        Ok(())
    }

    fn arm_wake(&mut self) {
        let read = opcode::Read::new(
            types::Fd(self.wake.as_raw_fd()),
            std::ptr::from_mut::<u64>(&mut self.wake_buf).cast::<u8>(),
            8,
        )
        .build()
        .user_data(WAKE);
        self.push(read);
        self.wake_armed = true;
    }

    fn complete(&mut self, user_data: u64, result: i32, flags: u32) {
        if user_data == WAKE {
            self.wake_armed = false;
            self.woken
                .store(false, std::sync::atomic::Ordering::Release);
            self.take_jobs();
            self.wake_links();
            if !self.stopping {
                self.arm_wake();
            }
            return;
        }
        if user_data & 0xff >= super::carrier::FIRST_OP && user_data != WAKE - 1 {
            return self.complete_carried(user_data, result, flags);
        }
        if cqueue::buffer_select(flags).is_some() {
            self.bufs.taken();
        }
        let slot = usize::try_from(user_data >> 8).expect("slots fit usize");
        if self.pairs.get(slot).is_none_or(Option::is_none) {
            // A buffer taken for a connection already gone still goes back.
            if let Some(bid) = cqueue::buffer_select(flags) {
                self.give_back(bid);
            }
            return;
        }
        let op = user_data & 0xff;
        match op {
            0 | 1 => self.on_recv(slot, (op - OP_RECV) as usize, result, flags),
            2 | 3 => self.on_send(slot, (op - OP_SEND) as usize, result),
            4 | 5 => self.on_shutdown(slot, (op - OP_SHUT) as usize, result),
            _ => self.pair(slot).inflight -= 1, // OP_CANCEL
        }
        self.finish_if_done(slot);
    }

    fn pair(&mut self, slot: usize) -> &mut Pair {
        self.pairs[slot].as_mut().expect("a live slot")
    }

    fn take_jobs(&mut self) {
        loop {
            match self.jobs.try_recv() {
                Ok(Msg::Proxy { a, b, done }) => self.start(a, b, done),
                Ok(Msg::Carry { link, carried }) => self.carry(link, carried),
                Ok(Msg::Relay(relay)) => self.relay(relay),
                Ok(Msg::Stop) | Err(mpsc::TryRecvError::Disconnected) => {
                    self.stop();
                    return;
                }
                Err(mpsc::TryRecvError::Empty) => return,
            }
        }
    }

    fn start(&mut self, a: OwnedFd, b: OwnedFd, done: oneshot::Sender<Outcome>) {
        if self.stopping {
            return;
        }
        for fd in [&a, &b] {
            // io_uring waits for readiness itself; a blocking socket keeps it from returning
            // EAGAIN.
            set_blocking(fd.as_raw_fd());
        }
        let pair = Pair {
            fds: [a, b],
            dirs: [Dir::new(), Dir::new()],
            first_response: None,
            inflight: 0,
            failed: None,
            done: Some(done),
        };
        let slot = if let Some(slot) = self.free.pop() {
            self.pairs[slot] = Some(pair);
            slot
        } else {
            self.pairs.push(Some(pair));
            self.pairs.len() - 1
        };
        self.arm_recv(slot, 0);
        self.arm_recv(slot, 1);
    }

    /// Cancels every operation; the loop ends once all have completed.
    fn stop(&mut self) {
        self.stopping = true;
        self.stop_links();
        let cancel = opcode::AsyncCancel2::new(types::CancelBuilder::any())
            .build()
            .user_data(WAKE - 1);
        self.push(cancel);
        for slot in 0..self.pairs.len() {
            if self.pairs[slot].is_some() {
                self.fail(
                    slot,
                    Failure::io(
                        Side::Downstream,
                        &io::Error::other("the router is stopping"),
                    ),
                );
                self.finish_if_done(slot);
            }
        }
    }

    fn arm_recv(&mut self, slot: usize, dir: usize) {
        let group = self.bufs.group();
        let pair = self.pair(slot);
        let from = pair.fds[dir].as_raw_fd();
        pair.dirs[dir].recv = Recv::Armed;
        pair.inflight += 1;
        let recv = opcode::RecvMulti::new(types::Fd(from), group)
            .build()
            .user_data(user_data(slot, OP_RECV + dir as u64));
        self.push(recv);
    }

    /// Receives again when the direction may: not ended, not failed, not starved, and with
    /// room in its queue.
    fn rearm_if_room(&mut self, slot: usize, dir: usize) {
        let pair = self.pairs[slot].as_ref().expect("a live slot");
        let d = &pair.dirs[dir];
        if pair.failed.is_none()
            && !self.stopping
            && d.recv == Recv::Idle
            && !d.eof
            && !d.starved
            && d.queued < LOW_WATER
        {
            self.arm_recv(slot, dir);
        }
    }

    fn on_recv(&mut self, slot: usize, dir: usize, result: i32, flags: u32) {
        let more = cqueue::more(flags);
        let pair = self.pair(slot);
        if !more {
            pair.inflight -= 1;
            pair.dirs[dir].recv = Recv::Idle;
        }
        if let Some(bid) = cqueue::buffer_select(flags) {
            let len = u32::try_from(result).unwrap_or(0);
            if pair.failed.is_some() || len == 0 {
                self.give_back(bid);
            } else {
                let d = &mut pair.dirs[dir];
                d.queue.push_back(Chunk { bid, off: 0, len });
                d.queued += len as usize;
                let cancel = d.queued >= HIGH_WATER && d.recv == Recv::Armed;
                if cancel {
                    d.recv = Recv::Cancelling;
                    pair.inflight += 1;
                    let target = user_data(slot, OP_RECV + dir as u64);
                    let entry = opcode::AsyncCancel::new(target)
                        .build()
                        .user_data(user_data(slot, OP_CANCEL));
                    self.push(entry);
                }
                self.send_next(slot, dir);
            }
        } else if result == 0 {
            pair.dirs[dir].eof = true;
            self.send_next(slot, dir);
        } else if result < 0 {
            match -result {
                libc::ENOBUFS => {
                    pair.dirs[dir].starved = true;
                    self.starved.push_back((slot, dir));
                    self.count_starved();
                }
                // Cancelled for back-pressure; received again once the queue drains.
                libc::ECANCELED => {}
                errno => {
                    let from = sides(dir).0;
                    self.fail(
                        slot,
                        Failure::io(from, &io::Error::from_raw_os_error(errno)),
                    );
                    return;
                }
            }
        }
        if !more {
            self.rearm_if_room(slot, dir);
        }
    }

    /// Sends what the direction has queued (one sendmsg at a time), or half-closes its
    /// destination once its source has ended and everything is sent.
    fn send_next(&mut self, slot: usize, dir: usize) {
        let pair = self.pairs[slot].as_mut().expect("a live slot");
        if pair.failed.is_some() {
            return;
        }
        let to = pair.fds[1 - dir].as_raw_fd();
        let d = &mut pair.dirs[dir];
        if d.sending || d.shutting {
            return;
        }
        if d.queue.is_empty() {
            if d.eof {
                d.shutting = true;
                pair.inflight += 1;
                let entry = opcode::Shutdown::new(types::Fd(to), libc::SHUT_WR)
                    .build()
                    .user_data(user_data(slot, OP_SHUT + dir as u64));
                self.push(entry);
            }
            return;
        }
        let mut n = 0;
        for chunk in d.queue.iter().take(MAX_IOV) {
            // SAFETY: the chunk lies inside buffer `bid`, which stays ours until it is sent.
            let base = unsafe { self.bufs.buf(chunk.bid).add(chunk.off as usize) };
            d.send.iov[n] = libc::iovec {
                iov_base: base.cast(),
                iov_len: chunk.len as usize,
            };
            n += 1;
        }
        d.send.hdr.msg_iov = d.send.iov.as_mut_ptr();
        d.send.hdr.msg_iovlen = n;
        d.sending = true;
        pair.inflight += 1;
        let entry = opcode::SendMsg::new(types::Fd(to), &raw const d.send.hdr)
            .flags(libc::MSG_NOSIGNAL as u32)
            .build()
            .user_data(user_data(slot, OP_SEND + dir as u64));
        self.push(entry);
    }

    fn on_send(&mut self, slot: usize, dir: usize, result: i32) {
        let pair = self.pair(slot);
        pair.inflight -= 1;
        pair.dirs[dir].sending = false;
        let Ok(mut sent) = usize::try_from(result) else {
            let to = sides(dir).1;
            self.fail(
                slot,
                Failure::io(to, &io::Error::from_raw_os_error(-result)),
            );
            return;
        };
        if dir == 1 && sent > 0 && pair.first_response.is_none() {
            pair.first_response = Some(std::time::Instant::now());
        }
        let d = &mut pair.dirs[dir];
        d.bytes += sent as u64;
        d.queued -= sent;
        let mut freed = Vec::new();
        while sent > 0 {
            let front = d.queue.front_mut().expect("sent no more than was queued");
            let len = front.len as usize;
            if len <= sent {
                sent -= len;
                freed.push(front.bid);
                d.queue.pop_front();
            } else {
                front.off += u32::try_from(sent).expect("less than a buffer");
                front.len -= u32::try_from(sent).expect("less than a buffer");
                sent = 0;
            }
        }
        for bid in freed {
            self.give_back(bid);
        }
        self.send_next(slot, dir);
        self.rearm_if_room(slot, dir);
    }

    fn on_shutdown(&mut self, slot: usize, dir: usize, result: i32) {
        let pair = self.pair(slot);
        pair.inflight -= 1;
        pair.dirs[dir].shut = true;
        // The peer may be gone already (ENOTCONN): its end of the stream still arrived.
        if result < 0 && -result != libc::ENOTCONN {
            let to = sides(dir).1;
            self.fail(
                slot,
                Failure::io(to, &io::Error::from_raw_os_error(-result)),
            );
        }
    }

    /// Ends the connection with a failure: both sockets will close with RST, and every
    /// operation on them is cancelled.
    fn fail(&mut self, slot: usize, failure: Failure) {
        let pair = self.pair(slot);
        if pair.failed.is_some() {
            return;
        }
        pair.failed = Some(failure);
        let fds = [pair.fds[0].as_raw_fd(), pair.fds[1].as_raw_fd()];
        pair.inflight += 2;
        for fd in fds {
            set_zero_linger(fd);
            let cancel = opcode::AsyncCancel2::new(types::CancelBuilder::fd(types::Fd(fd)).all())
                .build()
                .user_data(user_data(slot, OP_CANCEL));
            self.push(cancel);
        }
    }

    /// Closes the connection and reports how it ended once nothing is in flight on it and it
    /// has failed or both directions have ended.
    fn finish_if_done(&mut self, slot: usize) {
        let pair = self.pair(slot);
        let ended = pair.dirs.iter().all(|d| d.shut);
        if pair.inflight > 0 || (pair.failed.is_none() && !ended) {
            return;
        }
        let pair = self.pairs[slot].take().expect("a live slot");
        self.free.push(slot);
        for d in &pair.dirs {
            for chunk in &d.queue {
                self.give_back(chunk.bid);
            }
        }
        let outcome = Outcome {
            bytes_out: pair.dirs[0].bytes,
            bytes_in: pair.dirs[1].bytes,
            failed: pair.failed,
            first_response: pair.first_response,
        };
        if let Some(done) = pair.done {
            let _ = done.send(outcome);
        }
        // The sockets close here (with RST after a failure).
    }

    /// Hands a served stream's receive buffer back to its ring.
    pub(super) fn give_back_stream(&mut self, bid: u16) {
        self.stream_bufs.push(bid);
        self.stream_returned = true;
    }

    pub(super) fn give_back(&mut self, bid: u16) {
        self.bufs.push(bid);
        self.returned = true;
    }

    /// Counts one receive that found a buffer ring empty.
    pub(super) fn count_starved(&self) {
        self.starved_receives
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// Lets directions that found the ring empty receive again, oldest first and no more of
    /// them than the ring has buffers: the others would find it empty again.
    fn feed_starved(&mut self) {
        let mut room = self.bufs.lent();
        while room > 0
            && let Some((slot, dir)) = self.starved.pop_front()
        {
            if let Some(pair) = self.pairs.get_mut(slot).and_then(Option::as_mut) {
                pair.dirs[dir].starved = false;
                self.rearm_if_room(slot, dir);
                room -= 1;
            }
        }
    }
}

pub(super) fn set_blocking(fd: RawFd) {
    // SAFETY: fcntl on a descriptor the caller owns.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        if flags >= 0 {
            libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_NONBLOCK);
        }
    }
}

pub(super) fn set_zero_linger(fd: RawFd) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt reads `linger`, which outlives the call.
    unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&raw const linger).cast(),
            size_of::<libc::linger>() as libc::socklen_t,
        );
    }
}
