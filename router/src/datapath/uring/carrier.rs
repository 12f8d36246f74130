//! Link connections on an io_uring worker, and the streams whose sockets the worker serves
//! itself: no byte of theirs crosses a thread.
//!
//! A carried link connection has one receive in flight, into the record layer's buffer (256 KiB
//! and more at a time); when it completes, the records are opened where they lie, frames are
//! decoded from the plaintext, and each Data frame for a stream served here is queued on that
//! stream's socket as a slice of the same buffer (no copy) and sent from there. Frames for other
//! streams, and what the router must act on (streams the peer opens, advertisements), go
//! through [`link::receive`] and the link task's reports, as on tokio.
//!
//! The sending side gathers a batch: frames the link's users queued, and what the served
//! streams' sockets received into the worker's provided buffers, each a Data frame for its
//! stream. When the previous send has completed, the batch is sealed into records in one
//! buffer and sent with one call. A socket is received from only while its stream has credit
//! and the batch has room, so a slow link holds back its streams' sockets, not the worker.
//!
//! A served stream ends as a relay on tokio does: end of stream from the socket becomes Close
//! on the link, Close from the peer a half-close of the socket, a failure RST on the socket and
//! Reset on the link, with the side that failed in its [`Outcome`].

use std::{
    collections::{HashMap, VecDeque},
    io,
    os::fd::{AsRawFd as _, OwnedFd},
    sync::Arc,
};

use bytes::{Bytes, BytesMut};
use io_uring::{cqueue, opcode, types};
use tokio::sync::{OwnedSemaphorePermit, mpsc, oneshot};

use super::worker::{
    MAX_IOV, STREAM_BUF_SIZE, SendArgs, Worker, set_blocking, set_zero_linger,
    user_data as pair_user_data,
};
use crate::{
    datapath::{Cause, Failure, Outcome, Side},
    link::{
        self, Action, Carried, Link, Queued, Report,
        frame::{self, Frame, ResetCode},
        stream::{self, Credit, Halves, Inbound},
        transport::{Reader, Writer},
    },
};

/// Plaintext gathered into one send at most, as on tokio.
const WRITE_BATCH: usize = 256 * 1024;
/// Plaintext a connection's batch may hold before its streams' sockets wait: what the
/// provided buffers of one batch and the frames queued meanwhile may add up to.
const BATCH_ROOM: usize = 1024 * 1024;
/// Pongs one batch carries at most: a peer that pings without reading gets no more, while
/// one that reads is answered however full the batch is with data.
const MAX_PONGS: u32 = 32;

// Operations, in the low byte of user_data; the link's slot is in bits 8-31 and a served
// stream's in bits 32-63. Proxied pairs use the values below 16.
pub(super) const FIRST_OP: u64 = 0x10;
const OP_LINK_RECV: u64 = 0x10;
const OP_LINK_SEND: u64 = 0x11;
const OP_LINK_CANCEL: u64 = 0x12;
const OP_STREAM_RECV: u64 = 0x18;
const OP_STREAM_SEND: u64 = 0x19;
const OP_STREAM_SHUT: u64 = 0x1a;
const OP_STREAM_CANCEL: u64 = 0x1b;

const fn user_data(link: usize, stream: usize, op: u64) -> u64 {
    ((stream as u64) << 32) | pair_user_data(link, op)
}

/// A stream this worker serves: its socket, its flow control, and the two directions.
pub(super) struct Served {
    id: u32,
    fd: OwnedFd,
    /// Which side the socket is (the client of a listener, or a backend).
    side: Side,
    credit: Credit,
    /// Keep the stream registered with its link until it ends.
    _halves: Halves,
    /// A receive from the socket is in flight.
    receiving: bool,
    /// Waiting for room in the link's batch, or for a provided buffer.
    waiting: bool,
    /// The socket's end of stream arrived (and Close was queued).
    eof: bool,
    bytes_out: u64,
    /// Payloads from the peer waiting to be written to the socket.
    queue: VecDeque<Bytes>,
    sending: bool,
    /// The peer sent Close: the socket is half-closed once the queue is written.
    peer_closed: bool,
    shutting: bool,
    shut: bool,
    bytes_in: u64,
    send: Box<SendArgs>,
    inflight: u32,
    failed: Option<Failure>,
    /// When the answer's first byte passed: read from a backend, or written to a client.
    first_response: Option<std::time::Instant>,
    done: Option<oneshot::Sender<Outcome>>,
}

/// A piece of a link connection's batch.
enum Part {
    /// Encoded frames in the batch's head buffer.
    Head(std::ops::Range<usize>),
    /// A Data payload the link's users queued.
    Payload(Bytes),
    /// A Data payload in a provided buffer.
    Buf { bid: u16, len: u32 },
}

/// One link connection this worker carries.
pub(super) struct Conn {
    link: Arc<Link>,
    fd: OwnedFd,
    reader: Reader,
    writer: Writer,
    frames: mpsc::Receiver<Queued>,
    reports: mpsc::UnboundedSender<Report>,
    receiving: bool,
    /// Sealed records being sent, and how much of them the kernel took.
    out: Vec<u8>,
    out_sent: usize,
    sending: bool,
    /// The next batch: encoded heads, the parts in order, their plaintext size, and the room
    /// the queued frames among them hold.
    head: BytesMut,
    parts: Vec<Part>,
    batched: usize,
    permits: Vec<OwnedSemaphorePermit>,
    /// Served streams, by stream id and by slot.
    ids: HashMap<u32, usize>,
    served: Vec<Option<Served>>,
    free: Vec<usize>,
    /// Served streams waiting for room in the batch.
    blocked: Vec<usize>,
    /// Listed in the worker's `send_due`: its batch is sealed and sent once the completions
    /// at hand are handled, so that what they add goes out in one send.
    send_due: bool,
    /// Pongs in the batch.
    pongs: u32,
    inflight: u32,
    failed: Option<link::Error>,
}

/// A stream to serve on a carried link: its socket and its halves.
pub(super) struct Relay {
    pub link: Arc<Link>,
    pub fd: OwnedFd,
    pub side: Side,
    pub tx: stream::StreamTx,
    pub rx: stream::StreamRx,
    pub done: oneshot::Sender<Outcome>,
}

impl Worker {
    /// Takes a link connection over from its task.
    pub(super) fn carry(&mut self, link: Arc<Link>, carried: Carried) {
        let Carried {
            transport,
            frames,
            reports,
        } = carried;
        if self.stopping {
            let _ = reports.send(Report::Ended(link::Error::Shut(
                "the router is stopping".into(),
            )));
            return;
        }
        set_blocking(transport.fd.as_raw_fd());
        let conn = Conn {
            link,
            fd: transport.fd,
            reader: transport.reader,
            writer: transport.writer,
            frames,
            reports,
            receiving: false,
            out: Vec::with_capacity(WRITE_BATCH + WRITE_BATCH / 8),
            out_sent: 0,
            sending: false,
            head: BytesMut::with_capacity(16 * 1024),
            parts: Vec::new(),
            batched: 0,
            permits: Vec::new(),
            ids: HashMap::new(),
            served: Vec::new(),
            free: Vec::new(),
            blocked: Vec::new(),
            send_due: false,
            pongs: 0,
            inflight: 0,
            failed: None,
        };
        let slot = if let Some(slot) = self.free_links.pop() {
            self.links[slot] = Some(conn);
            slot
        } else {
            self.links.push(Some(conn));
            self.links.len() - 1
        };
        self.carried_total += 1;
        // Frames that arrived with the handshake are opened already.
        self.take_frames(slot);
        self.link_receive(slot);
        self.pull_frames(slot);
        self.send_soon(slot);
    }

    /// Serves a stream's socket here, taking the stream over from its halves.
    pub(super) fn relay(&mut self, relay: Relay) {
        let Relay {
            link,
            fd,
            side,
            tx,
            rx,
            done,
        } = relay;
        let slot = self.links.iter().position(|c| {
            c.as_ref()
                .is_some_and(|c| c.failed.is_none() && Arc::ptr_eq(&c.link, &link))
        });
        let Some(slot) = slot else {
            set_zero_linger(fd.as_raw_fd());
            let _ = done.send(Outcome {
                failed: Some(LINK_LOST),
                ..Outcome::default()
            });
            return;
        };
        set_blocking(fd.as_raw_fd());
        let id = tx.id();
        let (credit, pending, halves) = stream::take_over(tx, rx);
        let served = Served {
            id,
            fd,
            side,
            credit,
            _halves: halves,
            receiving: false,
            waiting: false,
            eof: false,
            bytes_out: 0,
            queue: VecDeque::new(),
            sending: false,
            peer_closed: false,
            shutting: false,
            shut: false,
            bytes_in: 0,
            // SAFETY: msghdr and iovec are plain C structs; all-zero is their empty value.
            send: Box::new(unsafe { std::mem::zeroed() }),
            inflight: 0,
            failed: None,
            first_response: None,
            done: Some(done),
        };
        let conn = self.conn(slot);
        let index = if let Some(index) = conn.free.pop() {
            conn.served[index] = Some(served);
            index
        } else {
            conn.served.push(Some(served));
            conn.served.len() - 1
        };
        conn.ids.insert(id, index);
        self.served_total += 1;
        for inbound in pending {
            match inbound {
                Inbound::Data(data) => self.served_mut(slot, index).queue.push_back(data),
                Inbound::Close => self.served_mut(slot, index).peer_closed = true,
                Inbound::Reset(code) => self.fail_served(slot, index, reset(code)),
            }
        }
        self.stream_write(slot, index);
        self.stream_receive(slot, index);
        self.finish_served(slot, index);
    }

    fn conn(&mut self, slot: usize) -> &mut Conn {
        self.links[slot].as_mut().expect("a live link slot")
    }

    fn served_mut(&mut self, slot: usize, index: usize) -> &mut Served {
        self.conn(slot).served[index]
            .as_mut()
            .expect("a live stream slot")
    }

    fn live_served(&mut self, slot: usize, index: usize) -> Option<&mut Served> {
        self.links
            .get_mut(slot)?
            .as_mut()?
            .served
            .get_mut(index)?
            .as_mut()
    }

    /// Handles a completion of a carried link's operation.
    pub(super) fn complete_carried(&mut self, user_data: u64, result: i32, flags: u32) {
        let slot = usize::try_from((user_data >> 8) & 0xff_ffff).expect("slots fit usize");
        let index = usize::try_from(user_data >> 32).expect("slots fit usize");
        let op = user_data & 0xff;
        if cqueue::buffer_select(flags).is_some() {
            self.stream_bufs.taken();
        }
        if self.links.get(slot).is_none_or(Option::is_none) {
            if let Some(bid) = cqueue::buffer_select(flags) {
                self.give_back_stream(bid);
            }
            return;
        }
        match op {
            OP_LINK_RECV => self.on_link_receive(slot, result),
            OP_LINK_SEND => self.on_link_send(slot, result),
            OP_LINK_CANCEL => self.conn(slot).inflight -= 1,
            _ => {
                if self.live_served(slot, index).is_none() {
                    if let Some(bid) = cqueue::buffer_select(flags) {
                        self.give_back_stream(bid);
                    }
                    return;
                }
                match op {
                    OP_STREAM_RECV => self.on_stream_receive(slot, index, result, flags),
                    OP_STREAM_SEND => self.on_stream_write(slot, index, result),
                    OP_STREAM_SHUT => self.on_stream_shutdown(slot, index, result),
                    _ => self.served_mut(slot, index).inflight -= 1, // OP_STREAM_CANCEL
                }
                self.finish_served(slot, index);
            }
        }
        self.finish_link(slot);
    }

    /// Wakes every carried link: takes what their users queued, and ends those shut here.
    pub(super) fn wake_links(&mut self) {
        for slot in 0..self.links.len() {
            let Some(conn) = self.links[slot].as_ref() else {
                continue;
            };
            if conn.failed.is_none()
                && let Some(reason) = conn.link.take_shut_reason()
            {
                self.fail_link(slot, link::Error::Shut(reason));
            } else {
                self.pull_frames(slot);
                self.send_soon(slot);
            }
            self.finish_link(slot);
        }
    }

    /// Ends every carried link (the router is stopping).
    pub(super) fn stop_links(&mut self) {
        for slot in 0..self.links.len() {
            if self.links[slot].is_some() {
                self.fail_link(slot, link::Error::Shut("the router is stopping".into()));
                self.finish_link(slot);
            }
        }
    }

    /// Whether no link connection is carried here any more.
    pub(super) fn links_done(&self) -> bool {
        self.links.iter().all(Option::is_none)
    }

    /// Lets served streams that found the buffer ring empty receive again, oldest first and
    /// no more of them than the ring has buffers: the others would find it empty again.
    pub(super) fn feed_starved_streams(&mut self) {
        let mut room = self.stream_bufs.lent();
        while room > 0
            && let Some((slot, index)) = self.starved_streams.pop_front()
        {
            if let Some(served) = self.live_served(slot, index) {
                served.waiting = false;
                self.stream_receive(slot, index);
                room -= 1;
            }
        }
    }

    // The link connection's receiving side.

    fn link_receive(&mut self, slot: usize) {
        let stopping = self.stopping;
        let conn = self.conn(slot);
        if conn.receiving || conn.failed.is_some() || conn.reader.closed() || stopping {
            return;
        }
        let (ptr, len) = conn.reader.space();
        let len = u32::try_from(len).unwrap_or(u32::MAX);
        conn.receiving = true;
        conn.inflight += 1;
        let entry = opcode::Recv::new(types::Fd(conn.fd.as_raw_fd()), ptr, len)
            .build()
            .user_data(user_data(slot, 0, OP_LINK_RECV));
        self.push(entry);
    }

    fn on_link_receive(&mut self, slot: usize, result: i32) {
        let conn = self.conn(slot);
        conn.inflight -= 1;
        conn.receiving = false;
        if conn.failed.is_some() {
            return;
        }
        let n = match usize::try_from(result) {
            Ok(0) => return self.fail_link(slot, link::Error::Closed),
            Ok(n) => n,
            Err(_) => {
                let error = io::Error::from_raw_os_error(-result);
                return self.fail_link(slot, link::Error::Io(error));
            }
        };
        conn.link.heard();
        conn.link
            .stats
            .bytes_in
            .fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
        // SAFETY: the receive wrote `n` bytes where the reader's last space() pointed, and the
        // reader was not touched while it was in flight.
        let opened = unsafe { conn.reader.filled(n) };
        let closed = match opened {
            Ok(closed) => closed,
            Err(e) => return self.fail_link(slot, link::Error::Record(e)),
        };
        self.take_frames(slot);
        if closed && self.conn(slot).failed.is_none() {
            self.fail_link(slot, link::Error::Closed);
        }
        self.link_receive(slot);
        self.send_soon(slot);
    }

    /// Dispatches every whole frame received.
    fn take_frames(&mut self, slot: usize) {
        loop {
            let conn = self.conn(slot);
            if conn.failed.is_some() {
                return;
            }
            match conn.reader.frame() {
                Ok(Some(frame)) => self.on_frame(slot, frame),
                Ok(None) => return,
                Err(e) => return self.fail_link(slot, link::Error::Frame(e)),
            }
        }
    }

    fn on_frame(&mut self, slot: usize, frame: Frame) {
        let served = self.conn(slot).ids.get(&frame.stream()).copied();
        if let Some(index) = served {
            return self.on_served_frame(slot, index, frame);
        }
        let conn = self.conn(slot);
        let action = link::receive(&conn.link, frame);
        match action {
            Ok(Action::Done) => {}
            Ok(Action::Reply(Frame::Pong { nonce })) => {
                if conn.pongs < MAX_PONGS {
                    conn.pongs += 1;
                    self.batch_frame(slot, Frame::Pong { nonce });
                }
            }
            Ok(Action::Reply(frame)) => self.batch_frame(slot, frame),
            Ok(Action::Open(open, tx, rx)) => {
                let window = Frame::Window {
                    stream: tx.id(),
                    increment: stream::INITIAL_WINDOW,
                };
                self.batch_frame(slot, window);
                let _ = self.conn(slot).reports.send(Report::Open(open, tx, rx));
            }
            Ok(Action::LinkState(state)) => {
                let _ = conn.reports.send(Report::LinkState(state));
            }
            Err(e) => self.fail_link(slot, e),
        }
    }

    /// A frame for a stream served here.
    fn on_served_frame(&mut self, slot: usize, index: usize, frame: Frame) {
        let served = self.served_mut(slot, index);
        if served.failed.is_some() {
            // Reset already, by either side: what was in flight is dropped, as on tokio.
            if matches!(frame, Frame::Open { .. }) {
                self.fail_link(slot, link::Error::Protocol("stream id reused while open"));
            }
            return;
        }
        match frame {
            Frame::Data { data, .. } => {
                let violated = if served.peer_closed {
                    Some("data after the peer's own close")
                } else if !served.credit.receive(data.len()) {
                    Some("sent beyond credit")
                } else {
                    None
                };
                if let Some(reason) = violated {
                    let id = served.id;
                    self.batch_frame(
                        slot,
                        Frame::Reset {
                            stream: id,
                            code: ResetCode::Internal,
                            reason: reason.into(),
                        },
                    );
                    // The peer broke the stream's rules: the link side failed.
                    self.fail_served(slot, index, reset(ResetCode::Internal));
                } else {
                    served.queue.push_back(data);
                    self.stream_write(slot, index);
                }
            }
            Frame::Window { increment, .. } => {
                if let Err(rule) = served.credit.grant(increment) {
                    return self.fail_link(slot, link::Error::Protocol(rule));
                }
                self.stream_receive(slot, index);
            }
            Frame::Close { .. } => {
                served.peer_closed = true;
                self.stream_write(slot, index);
            }
            Frame::Reset { code, .. } => {
                // Its id is free for the peer again once the stream ends here.
                self.fail_served(slot, index, reset(code));
            }
            Frame::Open { .. } => {
                return self.fail_link(slot, link::Error::Protocol("stream id reused while open"));
            }
            _ => {}
        }
        self.finish_served(slot, index);
    }

    // The link connection's sending side.

    /// Adds a frame to the link's batch.
    fn batch_frame(&mut self, slot: usize, frame: Frame) {
        let conn = self.conn(slot);
        let len = frame.encoded_len();
        let start = conn.head.len();
        let payload = frame.encode_head(&mut conn.head);
        add_head(&mut conn.parts, start..conn.head.len());
        if let Some(data) = payload.filter(|d| !d.is_empty()) {
            conn.parts.push(Part::Payload(data));
        }
        conn.batched += len;
    }

    /// Takes what the link's users queued, while the batch has room.
    fn pull_frames(&mut self, slot: usize) {
        loop {
            let conn = self.conn(slot);
            if conn.failed.is_some() || conn.batched >= BATCH_ROOM {
                return;
            }
            let Ok(queued) = conn.frames.try_recv() else {
                return;
            };
            conn.permits.push(queued.room);
            self.batch_frame(slot, queued.frame);
        }
    }

    /// Has the link's batch sealed and sent once the completions at hand are handled.
    fn send_soon(&mut self, slot: usize) {
        let conn = self.conn(slot);
        if !conn.send_due {
            conn.send_due = true;
            self.send_due.push(slot);
        }
    }

    /// Seals and sends the batches of the links that have something due.
    pub(super) fn send_due_links(&mut self) {
        let due = std::mem::take(&mut self.send_due);
        for slot in due {
            if let Some(conn) = self.links.get_mut(slot).and_then(Option::as_mut) {
                conn.send_due = false;
                self.link_send(slot);
                self.finish_link(slot);
            }
        }
    }

    /// Seals the batch and sends it, unless a send is in flight.
    fn link_send(&mut self, slot: usize) {
        let conn = self.conn(slot);
        if conn.sending || conn.failed.is_some() {
            return;
        }
        if conn.parts.is_empty() {
            self.pull_frames(slot);
        }
        let conn = self.links[slot].as_mut().expect("a live link slot");
        if conn.parts.is_empty() {
            return;
        }
        let slices: Vec<&[u8]> = conn
            .parts
            .iter()
            .map(|part| match part {
                Part::Head(range) => &conn.head[range.clone()],
                Part::Payload(data) => &data[..],
                // SAFETY: the buffer holds `len` bytes a receive wrote, and stays the
                // worker's until given back below.
                Part::Buf { bid, len } => unsafe {
                    std::slice::from_raw_parts(self.stream_bufs.buf(*bid), *len as usize)
                },
            })
            .collect();
        conn.out.clear();
        conn.out_sent = 0;
        let sealed = conn.writer.seal(&slices, &mut conn.out);
        drop(slices);
        let plaintext = conn.batched;
        conn.head.clear();
        conn.batched = 0;
        conn.pongs = 0;
        conn.permits.clear();
        let parts = std::mem::take(&mut conn.parts);
        for part in parts {
            if let Part::Buf { bid, .. } = part {
                self.give_back_stream(bid);
            }
        }
        if let Err(e) = sealed {
            return self.fail_link(slot, link::Error::Record(e));
        }
        let conn = self.conn(slot);
        conn.link
            .stats
            .bytes_out
            .fetch_add(plaintext as u64, std::sync::atomic::Ordering::Relaxed);
        self.submit_out(slot);
        // The batch has room again: its streams may receive.
        let blocked = std::mem::take(&mut self.conn(slot).blocked);
        for index in blocked {
            if let Some(served) = self.live_served(slot, index) {
                served.waiting = false;
                self.stream_receive(slot, index);
            }
        }
        self.pull_frames(slot);
    }

    /// Sends what is left of the sealed records.
    fn submit_out(&mut self, slot: usize) {
        let conn = self.conn(slot);
        let rest = &conn.out[conn.out_sent..];
        let len = u32::try_from(rest.len()).expect("a batch is far below 4 GiB");
        let entry = opcode::Send::new(types::Fd(conn.fd.as_raw_fd()), rest.as_ptr(), len)
            .flags(libc::MSG_NOSIGNAL)
            .build()
            .user_data(user_data(slot, 0, OP_LINK_SEND));
        conn.sending = true;
        conn.inflight += 1;
        conn.link.sending(true);
        self.push(entry);
    }

    fn on_link_send(&mut self, slot: usize, result: i32) {
        let conn = self.conn(slot);
        conn.inflight -= 1;
        conn.sending = false;
        conn.link.sending(false);
        if conn.failed.is_some() {
            return;
        }
        let Ok(sent) = usize::try_from(result) else {
            let error = io::Error::from_raw_os_error(-result);
            return self.fail_link(slot, link::Error::Io(error));
        };
        conn.out_sent += sent;
        if conn.out_sent < conn.out.len() {
            return self.submit_out(slot);
        }
        self.send_soon(slot);
    }

    // Served streams: socket to link.

    /// Receives from the socket when the stream has credit and the batch has room.
    fn stream_receive(&mut self, slot: usize, index: usize) {
        let group = self.stream_bufs.group();
        let stopping = self.stopping;
        let conn = self.links[slot].as_mut().expect("a live link slot");
        let congested = conn.batched >= BATCH_ROOM || conn.failed.is_some();
        let served = conn.served[index].as_mut().expect("a live stream slot");
        if served.receiving
            || served.waiting
            || served.eof
            || served.failed.is_some()
            || stopping
            || served.credit.available() == 0
        {
            return;
        }
        if congested {
            served.waiting = true;
            conn.blocked.push(index);
            return;
        }
        let len = served.credit.available().min(u64::from(STREAM_BUF_SIZE));
        let len = u32::try_from(len).expect("at most one buffer");
        served.receiving = true;
        served.inflight += 1;
        let entry = opcode::Recv::new(types::Fd(served.fd.as_raw_fd()), std::ptr::null_mut(), len)
            .buf_group(group)
            .build()
            .flags(io_uring::squeue::Flags::BUFFER_SELECT)
            .user_data(user_data(slot, index, OP_STREAM_RECV));
        self.push(entry);
    }

    fn on_stream_receive(&mut self, slot: usize, index: usize, result: i32, flags: u32) {
        let served = self.served_mut(slot, index);
        served.inflight -= 1;
        served.receiving = false;
        let (id, side) = (served.id, served.side);
        if let Some(bid) = cqueue::buffer_select(flags) {
            let len = u32::try_from(result).unwrap_or(0);
            if served.failed.is_some() || len == 0 {
                self.give_back_stream(bid);
                return;
            }
            served.credit.spend(len as usize);
            served.bytes_out += u64::from(len);
            if side == Side::Upstream {
                served
                    .first_response
                    .get_or_insert_with(std::time::Instant::now);
            }
            let conn = self.conn(slot);
            let start = conn.head.len();
            frame::encode_data_header(id, len as usize, &mut conn.head);
            add_head(&mut conn.parts, start..conn.head.len());
            conn.parts.push(Part::Buf { bid, len });
            conn.batched += frame::HEADER_LEN + len as usize;
            self.send_soon(slot);
            self.stream_receive(slot, index);
            return;
        }
        match result {
            0 => {
                served.eof = true;
                if served.failed.is_none() {
                    self.batch_frame(slot, Frame::Close { stream: id });
                    self.send_soon(slot);
                }
            }
            e if -e == libc::ENOBUFS => {
                served.waiting = true;
                self.starved_streams.push_back((slot, index));
                self.count_starved();
            }
            e if -e == libc::ECANCELED => {}
            e => {
                let error = io::Error::from_raw_os_error(-e);
                self.fail_served(slot, index, Failure::io(side, &error));
            }
        }
    }

    // Served streams: link to socket.

    /// Writes what the peer sent to the socket (one sendmsg at a time), or half-closes the
    /// socket once the peer has closed and everything is written.
    fn stream_write(&mut self, slot: usize, index: usize) {
        let served = self.served_mut(slot, index);
        if served.sending || served.shutting || served.failed.is_some() {
            return;
        }
        let fd = served.fd.as_raw_fd();
        if served.queue.is_empty() {
            if served.peer_closed && !served.shut {
                served.shutting = true;
                served.inflight += 1;
                let entry = opcode::Shutdown::new(types::Fd(fd), libc::SHUT_WR)
                    .build()
                    .user_data(user_data(slot, index, OP_STREAM_SHUT));
                self.push(entry);
            }
            return;
        }
        let mut n = 0;
        for data in served.queue.iter().take(MAX_IOV) {
            served.send.iov[n] = libc::iovec {
                iov_base: data.as_ptr().cast_mut().cast(),
                iov_len: data.len(),
            };
            n += 1;
        }
        served.send.hdr.msg_iov = served.send.iov.as_mut_ptr();
        served.send.hdr.msg_iovlen = n;
        served.sending = true;
        served.inflight += 1;
        let entry = opcode::SendMsg::new(types::Fd(fd), &raw const served.send.hdr)
            .flags(libc::MSG_NOSIGNAL as u32)
            .build()
            .user_data(user_data(slot, index, OP_STREAM_SEND));
        self.push(entry);
    }

    fn on_stream_write(&mut self, slot: usize, index: usize, result: i32) {
        let served = self.served_mut(slot, index);
        served.inflight -= 1;
        served.sending = false;
        if served.failed.is_some() {
            return;
        }
        let Ok(mut sent) = usize::try_from(result) else {
            let error = io::Error::from_raw_os_error(-result);
            let side = served.side;
            return self.fail_served(slot, index, Failure::io(side, &error));
        };
        served.bytes_in += sent as u64;
        if served.side != Side::Upstream && sent > 0 {
            served
                .first_response
                .get_or_insert_with(std::time::Instant::now);
        }
        let consumed = sent;
        while sent > 0 {
            let front = served
                .queue
                .front_mut()
                .expect("sent no more than was queued");
            if front.len() <= sent {
                sent -= front.len();
                served.queue.pop_front();
            } else {
                let _ = front.split_to(sent);
                sent = 0;
            }
        }
        let caught_up = served.queue.is_empty();
        let window = served
            .credit
            .consumed(consumed, caught_up)
            .map(|increment| Frame::Window {
                stream: served.id,
                increment,
            });
        if let Some(window) = window {
            self.batch_frame(slot, window);
            self.send_soon(slot);
        }
        self.stream_write(slot, index);
    }

    fn on_stream_shutdown(&mut self, slot: usize, index: usize, result: i32) {
        let served = self.served_mut(slot, index);
        served.inflight -= 1;
        served.shut = true;
        // The socket's peer may be gone already (ENOTCONN): the stream's end still arrived.
        if result < 0 && -result != libc::ENOTCONN {
            let error = io::Error::from_raw_os_error(-result);
            let side = served.side;
            self.fail_served(slot, index, Failure::io(side, &error));
        }
    }

    // Endings.

    /// Ends a served stream with a failure: its socket closes with RST, its operations are
    /// cancelled, and the peer is told with the code the failing side maps to.
    fn fail_served(&mut self, slot: usize, index: usize, failure: Failure) {
        let served = self.served_mut(slot, index);
        if served.failed.is_some() {
            return;
        }
        served.failed = Some(failure);
        served.queue.clear();
        let (id, fd) = (served.id, served.fd.as_raw_fd());
        set_zero_linger(fd);
        served.inflight += 1;
        let cancel = opcode::AsyncCancel2::new(types::CancelBuilder::fd(types::Fd(fd)).all())
            .build()
            .user_data(user_data(slot, index, OP_STREAM_CANCEL));
        self.push(cancel);
        if let Some(code) = failure.reset_code()
            && self.conn(slot).failed.is_none()
        {
            self.batch_frame(
                slot,
                Frame::Reset {
                    stream: id,
                    code,
                    reason: failure.to_string(),
                },
            );
            self.send_soon(slot);
        }
    }

    /// Reports a served stream's outcome and lets it go, once it has failed or both
    /// directions have ended, and nothing of it is in flight.
    fn finish_served(&mut self, slot: usize, index: usize) {
        let Some(served) = self.live_served(slot, index) else {
            return;
        };
        let ended = served.eof && served.shut;
        if served.inflight > 0 || (served.failed.is_none() && !ended) {
            return;
        }
        let conn = self.conn(slot);
        let mut served = conn.served[index].take().expect("a live stream slot");
        conn.free.push(index);
        conn.ids.remove(&served.id);
        conn.blocked.retain(|&i| i != index);
        let outcome = Outcome {
            bytes_out: served.bytes_out,
            bytes_in: served.bytes_in,
            failed: served.failed,
            first_response: served.first_response,
        };
        if let Some(done) = served.done.take() {
            let _ = done.send(outcome);
        }
        // The socket closes here (with RST after a failure), and the halves let the stream go.
    }

    /// Ends a link connection: its served streams fail, its operations are cancelled, and its
    /// task hears why once nothing is in flight.
    fn fail_link(&mut self, slot: usize, error: link::Error) {
        let conn = self.conn(slot);
        if conn.failed.is_some() {
            return;
        }
        conn.failed = Some(error);
        let fd = conn.fd.as_raw_fd();
        conn.inflight += 1;
        let parts = std::mem::take(&mut conn.parts);
        conn.head.clear();
        conn.batched = 0;
        conn.permits.clear();
        let cancel = opcode::AsyncCancel2::new(types::CancelBuilder::fd(types::Fd(fd)).all())
            .build()
            .user_data(user_data(slot, 0, OP_LINK_CANCEL));
        self.push(cancel);
        for part in parts {
            if let Part::Buf { bid, .. } = part {
                self.give_back_stream(bid);
            }
        }
        let served: Vec<usize> = (0..self.conn(slot).served.len()).collect();
        for index in served {
            if self.live_served(slot, index).is_some() {
                self.fail_served(slot, index, LINK_LOST);
                self.finish_served(slot, index);
            }
        }
    }

    /// Lets a failed link connection go once nothing of it is in flight: its socket closes,
    /// its queue's senders see it gone, and its task hears why.
    fn finish_link(&mut self, slot: usize) {
        let conn = self.conn(slot);
        if conn.failed.is_none() || conn.inflight > 0 || !conn.ids.is_empty() {
            return;
        }
        if conn.served.iter().any(Option::is_some) {
            return;
        }
        let mut conn = self.links[slot].take().expect("a live link slot");
        self.free_links.push(slot);
        let error = conn.failed.take().expect("failed");
        let _ = conn.reports.send(Report::Ended(error));
    }
}

/// Adds encoded bytes to a batch: consecutive heads are one slice.
fn add_head(parts: &mut Vec<Part>, range: std::ops::Range<usize>) {
    match parts.last_mut() {
        Some(Part::Head(last)) if last.end == range.start => last.end = range.end,
        _ => parts.push(Part::Head(range)),
    }
}

/// The link the stream runs on died.
const LINK_LOST: Failure = Failure {
    side: Side::Link,
    cause: Cause::LinkLost,
};

/// The failure a reset from the peer stands for.
const fn reset(code: ResetCode) -> Failure {
    Failure {
        side: Side::Link,
        cause: match code {
            ResetCode::LinkLost => Cause::LinkLost,
            code => Cause::Reset(code),
        },
    }
}
