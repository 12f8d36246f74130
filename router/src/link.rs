//! Links: mutually authenticated TLS connections between routers, carrying multiplexed streams
//! and link-state advertisements. The frame format is in [`frame`] and `docs/protocol.md`.
//!
//! Each link runs three tasks: a reader that decodes frames and dispatches them, a writer that
//! batches queued frames into TLS records, and a heartbeat that pings every second. A link that
//! receives nothing for [`DEAD_AFTER`] is closed; all its streams are reset at once so clients
//! see a reset, not a hang.
//!
//! Where the router has a [`Carrier`] (the io_uring data path), the reader and writer are not
//! tasks: the carrier's worker thread receives, opens, decodes and dispatches ([`receive`]),
//! seals and sends, and reports what the router must act on ([`Report`]) to the link's task,
//! which then only runs the router's side of the link.

pub mod access;
pub mod dial;
pub mod frame;
pub mod stream;
pub mod transport;

use std::{
    collections::HashMap,
    io::IoSlice,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::BytesMut;
use tokio::{
    io::{AsyncWrite, AsyncWriteExt as _},
    sync::mpsc,
};
use tracing::{debug, info, warn};

use self::{
    frame::{Frame, FrameError, LinkState, ResetCode},
    stream::{Slot, StreamRx, StreamTx, new_stream},
    transport::{Inbound, Outbound},
};

/// Link connections one peer site may hold at once (a dialer makes at most this many too).
pub const MAX_CONNECTIONS_PER_PEER: usize = 16;

/// Interval between heartbeats. Each Ping is also bytes in flight for [`USER_TIMEOUT`] to
/// time: an idle link is never without something the peer's kernel must acknowledge.
pub const PING_EVERY: Duration = Duration::from_millis(250);
/// How long sent bytes may go unacknowledged before the kernel ends a link connection
/// (`TCP_USER_TIMEOUT`): a silently cut path is noticed within this plus one Ping interval.
/// A peer that is alive but not reading still acknowledges (its window is closed, the
/// kernel's window probes are answered), so this does not cut it; the heartbeat does.
pub const USER_TIMEOUT: Duration = Duration::from_millis(1250);
/// A link that receives nothing, or whose peer answers no Ping, for this long is dead.
pub const DEAD_AFTER: Duration = Duration::from_secs(5);
/// How long the peer has to send its `Hello`.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// Frames queued for the writer before senders wait.
const OUT_QUEUE: usize = 1024;
/// Encoded bytes queued for the writer before senders wait: what one link connection may hold
/// for a peer that grants credit and does not read (frame count alone allowed 64 MiB).
pub const QUEUE_BYTES: usize = 4 << 20;
/// Most send credit a stream may hold (docs/protocol.md).
const MAX_CREDIT: usize = (1 << 31) - 1;
/// Bytes the writer gathers into one write.
const WRITE_BATCH: usize = 256 * 1024;

/// Why a link ended.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("link i/o failed")]
    Io(#[from] std::io::Error),
    #[error("peer sent a malformed frame")]
    Frame(#[from] FrameError),
    #[error("peer sent a TLS record that was refused")]
    Record(#[from] crate::tls::records::Error),
    #[error("peer violated the protocol: {0}")]
    Protocol(&'static str),
    #[error("peer's Hello says protocol version {0}, the link's ALPN agreed on {1}")]
    Version(u16, u16),
    #[error("peer says it is site {claimed:?} but its certificate names {certified:?}")]
    Identity { claimed: String, certified: String },
    #[error("nothing received from the peer for {0:?}")]
    Timeout(Duration),
    #[error("the peer read nothing for {0:?} while frames waited for it")]
    WriteStalled(Duration),
    #[error("peer closed the link")]
    Closed,
    #[error("closed here: {0}")]
    Shut(String),
}

impl From<transport::ReceiveError> for Error {
    fn from(e: transport::ReceiveError) -> Self {
        match e {
            transport::ReceiveError::Closed => Self::Closed,
            transport::ReceiveError::Io(e) => Self::Io(e),
            transport::ReceiveError::Record(e) => Self::Record(e),
        }
    }
}

/// Which side dialed. The dialer numbers its streams odd, the acceptor even.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Direction {
    /// We dialed, for the outgoing link with this name.
    Outgoing(String),
    Incoming,
}

impl Direction {
    /// `outgoing` or `incoming`, as status and metrics name it.
    #[must_use]
    pub fn label(&self) -> &'static str {
        match self {
            Self::Outgoing(_) => "outgoing",
            Self::Incoming => "incoming",
        }
    }
}

/// What a router does with what arrives on its links.
pub trait Events: Send + Sync + 'static {
    /// The link finished its handshake and is ready for streams.
    fn link_up(&self, link: &Arc<Link>);
    /// The link is gone; its streams have been reset.
    fn link_down(&self, link: &Arc<Link>);
    /// The peer sent an advertisement.
    fn link_state(self: Arc<Self>, from: &Arc<Link>, state: LinkState);
    /// The peer opened a stream (already granted its initial credit).
    fn open(self: Arc<Self>, link: &Arc<Link>, open: Open, tx: StreamTx, rx: StreamRx);
    /// What carries link connections off tokio, if anything does.
    fn carrier(&self) -> Option<Arc<dyn Carrier>> {
        None
    }
    /// Connects a link connection to `url` (`HOST:PORT`): the router's data path makes the
    /// socket; without one, tokio does.
    fn dial<'a>(
        &'a self,
        url: &'a str,
    ) -> futures::future::BoxFuture<'a, std::io::Result<tokio::net::TcpStream>> {
        Box::pin(tokio::net::TcpStream::connect(url))
    }
}

/// Moves a link connection's bytes on a thread of its own once the link is up: receives,
/// opens and dispatches what arrives ([`receive`]), seals and sends what is queued, and
/// reports to the link's task what the router must act on.
pub trait Carrier: Send + Sync {
    /// Takes the connection of `link`; hands it back when it cannot carry it.
    ///
    /// # Errors
    /// The connection, when the carrier has stopped.
    fn carry(&self, link: &Arc<Link>, conn: Carried) -> Result<(), Carried>;
}

/// A link connection handed to a [`Carrier`].
#[derive(Debug)]
pub struct Carried {
    pub transport: transport::Detached,
    /// The frames the link's users queue ([`Link::send`]).
    pub frames: mpsc::Receiver<Queued>,
    /// Where the carrier reports what arrives, and how the connection ended.
    pub reports: mpsc::UnboundedSender<Report>,
}

/// What a [`Carrier`] reports to the link's task.
#[derive(Debug)]
pub enum Report {
    /// The peer opened a stream (its initial credit is granted).
    Open(Open, StreamTx, StreamRx),
    /// The peer advertised its link state.
    LinkState(LinkState),
    /// The connection ended.
    Ended(Error),
}

/// Which of a carrier's threads carries a link connection, and how the link's users wake it
/// when they queue a frame or shut the link.
pub struct Wake {
    worker: usize,
    wake: Box<dyn Fn() + Send + Sync>,
}

impl Wake {
    #[must_use]
    pub fn new(worker: usize, wake: impl Fn() + Send + Sync + 'static) -> Self {
        Self {
            worker,
            wake: Box::new(wake),
        }
    }
}

impl std::fmt::Debug for Wake {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Wake")
    }
}

/// The routing fields of an `Open` frame.
#[derive(Clone, Debug)]
pub struct Open {
    pub routing_key: String,
    pub origin: String,
    pub dest: String,
    /// The application protocol a TLS listener agreed with the client; empty for none.
    /// Carried only over version 2 links.
    pub alpn: String,
}

/// Counters of one link.
#[derive(Debug, Default)]
pub struct Stats {
    pub bytes_in: AtomicU64,
    pub bytes_out: AtomicU64,
    pub rtt_us: AtomicU64,
    /// Streams opened on this connection, by either side.
    pub streams_opened: AtomicU64,
}

/// One established link.
#[derive(Debug)]
pub struct Link {
    /// The peer's site name, as its certificate names it.
    pub peer: String,
    pub direction: Direction,
    pub stats: Stats,
    pub since: Instant,
    /// The Pings this router sent lately (random nonces, and when), and when a Pong last
    /// answered one: a peer that answers none for [`DEAD_AFTER`] is not reading, however
    /// much it sends.
    ping: Mutex<Heartbeat>,
    /// The protocol version agreed by ALPN.
    pub version: u16,
    out: mpsc::Sender<Queued>,
    /// Room left in the writer's queue, in encoded bytes ([`QUEUE_BYTES`]).
    room: Arc<tokio::sync::Semaphore>,
    streams: Mutex<HashMap<u32, Slot>>,
    next_stream: AtomicU32,
    closed: AtomicBool,
    /// Why this router ends the link ([`Link::shut`]); the reader wakes on `shut_signal`.
    shut_reason: Mutex<Option<String>>,
    shut_signal: tokio::sync::Notify,
    /// Set once a [`Carrier`] took the connection: how to wake it.
    carrier: std::sync::OnceLock<Wake>,
    /// When the carrier last received from the peer, in ms since `since`.
    heard_ms: AtomicU64,
    /// Since when the carrier's current send has been waiting, in ms since `since` plus one;
    /// 0 when nothing waits.
    sending_since_ms: AtomicU64,
    /// How much its streams' windows have grown beyond the initial one, together
    /// ([`stream::LINK_GROWTH`] at most).
    window_growth: Arc<std::sync::atomic::AtomicUsize>,
}

impl Link {
    /// Queues a frame for the writer.
    ///
    /// # Errors
    /// When the link is gone.
    pub async fn send(&self, frame: Frame) -> Result<(), Error> {
        let room = Arc::clone(&self.room)
            .acquire_many_owned(queued_size(&frame))
            .await
            .map_err(|_| Error::Closed)?;
        self.out
            .send(Queued { frame, room })
            .await
            .map_err(|_| Error::Closed)?;
        self.wake_carrier();
        Ok(())
    }

    /// Queues a frame if there is room now; `false` when there is none (or the link is gone).
    fn try_send(&self, frame: Frame) -> bool {
        let Ok(room) = Arc::clone(&self.room).try_acquire_many_owned(queued_size(&frame)) else {
            return false;
        };
        let queued = self.out.try_send(Queued { frame, room }).is_ok();
        if queued {
            self.wake_carrier();
        }
        queued
    }

    fn wake_carrier(&self) {
        if let Some(wake) = self.carrier.get() {
            (wake.wake)();
        }
    }

    /// The carrier thread that moves this connection's bytes, if one does.
    #[must_use]
    pub fn carrier_worker(&self) -> Option<usize> {
        self.carrier.get().map(|w| w.worker)
    }

    /// Says the connection is carried, and how its carrier is woken. Once only.
    pub fn carried_by(&self, wake: Wake) {
        let _ = self.carrier.set(wake);
    }

    /// Whether a [`Carrier`] moves this connection's bytes.
    #[must_use]
    pub fn is_carried(&self) -> bool {
        self.carrier.get().is_some()
    }

    /// Why this router ends the link, once [`Link::shut`] said so (taken: asked once).
    pub fn take_shut_reason(&self) -> Option<String> {
        self.shut_reason.lock().expect("shut lock").take()
    }

    /// The carrier heard from the peer now.
    pub fn heard(&self) {
        self.heard_ms.store(self.ms_since_up(), Ordering::Relaxed);
    }

    /// The carrier started a send that has not completed (`true`), or has none waiting.
    pub fn sending(&self, waiting: bool) {
        let since = if waiting { self.ms_since_up() + 1 } else { 0 };
        self.sending_since_ms.store(since, Ordering::Relaxed);
    }

    fn ms_since_up(&self) -> u64 {
        u64::try_from(self.since.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// For a carried link: why it is dead, when nothing was received for [`DEAD_AFTER`] or a
    /// send has waited that long (the carrier has no timers of its own; the heartbeat asks).
    fn carried_and_dead(&self) -> Option<Error> {
        if !self.is_carried() {
            return None;
        }
        let now = self.ms_since_up();
        let dead = u64::try_from(DEAD_AFTER.as_millis()).unwrap_or(u64::MAX);
        if now.saturating_sub(self.heard_ms.load(Ordering::Relaxed)) > dead {
            return Some(Error::Timeout(DEAD_AFTER));
        }
        let since = self.sending_since_ms.load(Ordering::Relaxed);
        (since != 0 && now.saturating_sub(since - 1) > dead)
            .then_some(Error::WriteStalled(DEAD_AFTER))
    }

    /// Whether the link has ended.
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Ends the link from this side (a policy change, a revoked credential): its streams are
    /// reset and the connection closed, as when the peer goes away.
    pub fn shut(&self, reason: impl Into<String>) {
        *self.shut_reason.lock().expect("shut lock") = Some(reason.into());
        // notify_one keeps a permit if the reader is not waiting at this moment.
        self.shut_signal.notify_one();
        self.wake_carrier();
    }

    /// Number of open streams.
    pub fn stream_count(&self) -> usize {
        self.streams.lock().expect("stream table lock").len()
    }

    /// Opens a stream for `open` on this link.
    ///
    /// # Errors
    /// When the link is gone.
    pub async fn open(self: &Arc<Self>, open: &Open) -> Result<(StreamTx, StreamRx), Error> {
        let (tx, rx) = {
            let mut streams = self.streams.lock().expect("stream table lock");
            let id = self.allocate_id(&streams);
            // Credit to send arrives with the peer's first Window frame.
            let (tx, rx, slot) = new_stream(self, id, 0);
            streams.insert(id, slot);
            (tx, rx)
        };
        let id = tx.id();
        self.stats.streams_opened.fetch_add(1, Ordering::Relaxed);
        let alpn = if self.version >= 2 {
            open.alpn.clone()
        } else {
            if !open.alpn.is_empty() {
                debug!(peer = %self.peer, alpn = %open.alpn, "version 1 link: ALPN not carried");
            }
            String::new()
        };
        self.send(Frame::Open {
            stream: id,
            routing_key: open.routing_key.clone(),
            origin: open.origin.clone(),
            dest: open.dest.clone(),
            window: stream::INITIAL_WINDOW,
            alpn,
        })
        .await?;
        Ok((tx, rx))
    }

    /// The next free stream id of our parity. Ids wrap after 2^32 and skip 0 and ids still open,
    /// so a long-lived link never reuses an open stream's id.
    fn allocate_id(&self, streams: &HashMap<u32, Slot>) -> u32 {
        loop {
            let id = self.next_stream.fetch_add(2, Ordering::Relaxed);
            if id != 0 && !streams.contains_key(&id) {
                return id;
            }
        }
    }

    pub(crate) fn forget_stream(&self, id: u32) {
        self.streams.lock().expect("stream table lock").remove(&id);
    }

    fn kill_streams(&self, code: ResetCode) {
        for (_, slot) in self.streams.lock().expect("stream table lock").drain() {
            slot.kill(code);
        }
    }

    fn owns_parity(&self, id: u32) -> bool {
        // Our ids share next_stream's parity; the peer's have the other one.
        id % 2 == self.next_stream.load(Ordering::Relaxed) % 2
    }
}

/// Sets a link connection's socket options: no Nagle delay, and [`USER_TIMEOUT`].
pub fn tune(tcp: &tokio::net::TcpStream) {
    let _ = tcp.set_nodelay(true);
    if let Err(e) = socket2::SockRef::from(tcp).set_tcp_user_timeout(Some(USER_TIMEOUT)) {
        warn!(error = %e, "TCP_USER_TIMEOUT not set: a cut path is noticed by the heartbeat only");
    }
}

/// Runs a link over an established TLS connection until it ends.
///
/// `certified_peer` is the site name from the peer's verified certificate; the peer's `Hello`
/// must agree with it, and with `version`, the protocol version the TLS handshake's ALPN
/// agreed on ([`frame::link_version`]).
///
/// # Errors
/// Whatever ended the link; routine ends (peer closed) are errors too, for the log.
pub async fn run(
    (mut reader, mut writer): (Inbound, Outbound),
    version: u16,
    me: &str,
    certified_peer: String,
    direction: Direction,
    events: Arc<dyn Events>,
) -> Result<(), Error> {
    let mut hello = BytesMut::new();
    Frame::Hello {
        version,
        site: me.to_owned(),
    }
    .encode(&mut hello);
    writer.send(&mut [IoSlice::new(&hello)]).await?;

    let first = tokio::time::timeout(HELLO_TIMEOUT, read_frame(&mut reader))
        .await
        .map_err(|_| Error::Timeout(HELLO_TIMEOUT))??;
    match first {
        Frame::Hello {
            version: theirs, ..
        } if theirs != version => {
            return Err(Error::Version(theirs, version));
        }
        Frame::Hello { site, .. } if site != certified_peer => {
            return Err(Error::Identity {
                claimed: site,
                certified: certified_peer,
            });
        }
        Frame::Hello { .. } => {}
        _ => return Err(Error::Protocol("first frame is not Hello")),
    }

    let (out, out_rx) = mpsc::channel(OUT_QUEUE);
    let room = Arc::new(tokio::sync::Semaphore::new(QUEUE_BYTES));
    let first_stream = match direction {
        Direction::Outgoing(_) => 1,
        Direction::Incoming => 2,
    };
    let link = Arc::new(Link {
        peer: certified_peer,
        direction,
        stats: Stats::default(),
        since: Instant::now(),
        ping: Mutex::new(Heartbeat::new()),
        version,
        out,
        room,
        streams: Mutex::new(HashMap::new()),
        next_stream: AtomicU32::new(first_stream),
        closed: AtomicBool::new(false),
        shut_reason: Mutex::new(None),
        shut_signal: tokio::sync::Notify::new(),
        carrier: std::sync::OnceLock::new(),
        heard_ms: AtomicU64::new(0),
        sending_since_ms: AtomicU64::new(0),
        window_growth: Arc::default(),
    });
    info!(peer = %link.peer, direction = ?link.direction, "link up");
    events.link_up(&link);

    // Tear-down lives in a guard so that it also runs when this future is dropped (the link's
    // task aborted by `link delete` or router shutdown), not only when the reader returns.
    let mut guard = Teardown {
        tasks: vec![tokio::spawn(heartbeat(Arc::clone(&link))).abort_handle()],
        link: Arc::clone(&link),
        events: Arc::clone(&events),
    };
    let result = match carry(events.carrier(), &link, reader, writer, out_rx) {
        Carriage::Carried(reports) => follow_carrier(reports, &link, &events).await,
        Carriage::Here(here) => {
            let (mut reader, writer, out_rx) = *here;
            guard.tasks.push(
                tokio::spawn(write_until_failure(writer, out_rx, Arc::clone(&link))).abort_handle(),
            );
            read_loop(&mut reader, &link, &events).await
        }
    };
    drop(guard);
    match &result {
        Err(Error::Closed) => info!(peer = %link.peer, "link closed by peer"),
        Err(e) => {
            // The cause says which rule a malformed frame broke.
            let cause = std::error::Error::source(e).map(ToString::to_string);
            warn!(peer = %link.peer, error = %e, cause, "link down");
        }
        Ok(()) => {}
    }
    result
}

/// The reports a carrier sends about a link connection.
type Reports = mpsc::UnboundedReceiver<Report>;

/// Where a link connection's bytes move.
enum Carriage {
    /// On a carrier, which reports here.
    Carried(Reports),
    /// On this task and a writer task: the two directions and the frame queue.
    Here(Box<(Inbound, Outbound, mpsc::Receiver<Queued>)>),
}

/// Hands the connection to `carrier`, when there is one and the connection has a record
/// layer to detach; otherwise gives it back to run on tokio tasks.
fn carry(
    carrier: Option<Arc<dyn Carrier>>,
    link: &Arc<Link>,
    reader: Inbound,
    writer: Outbound,
    frames: mpsc::Receiver<Queued>,
) -> Carriage {
    let Some(carrier) = carrier else {
        return Carriage::Here(Box::new((reader, writer, frames)));
    };
    let transport = match transport::detach(reader, writer) {
        Ok(transport) => transport,
        Err((reader, writer)) => return Carriage::Here(Box::new((reader, writer, frames))),
    };
    let (reports, rx) = mpsc::unbounded_channel();
    link.heard();
    carrier
        .carry(
            link,
            Carried {
                transport,
                frames,
                reports,
            },
        )
        // A stopped carrier means a router shutting down: the link ends with it.
        .map_or_else(
            |_| Carriage::Carried(mpsc::unbounded_channel().1),
            |()| Carriage::Carried(rx),
        )
}

/// Runs the router's side of a carried link: streams the peer opens and advertisements go to
/// the router, until the carrier says the connection ended.
async fn follow_carrier(
    mut reports: Reports,
    link: &Arc<Link>,
    events: &Arc<dyn Events>,
) -> Result<(), Error> {
    loop {
        match reports.recv().await {
            Some(Report::Open(open, tx, rx)) => Arc::clone(events).open(link, open, tx, rx),
            Some(Report::LinkState(state)) => Arc::clone(events).link_state(link, state),
            Some(Report::Ended(e)) => return Err(e),
            None => return Err(Error::Shut("the data path stopped".into())),
        }
    }
}

/// Ends a link: stops its writer and heartbeat (and a carrier's handling of it), resets its
/// streams, tells the router.
struct Teardown {
    tasks: Vec<tokio::task::AbortHandle>,
    link: Arc<Link>,
    events: Arc<dyn Events>,
}

impl Drop for Teardown {
    fn drop(&mut self) {
        self.link.closed.store(true, Ordering::Release);
        for task in &self.tasks {
            task.abort();
        }
        if self.link.is_carried() {
            // Ends the carrier's side too when this task is aborted (link delete, shutdown).
            self.link.shut("the link ended");
        }
        self.link.kill_streams(ResetCode::LinkLost);
        self.events.link_down(&self.link);
    }
}

async fn read_frame(reader: &mut Inbound) -> Result<Frame, Error> {
    loop {
        if let Some(frame) = reader.frame()? {
            return Ok(frame);
        }
        reader.receive().await?;
    }
}

async fn read_loop(
    reader: &mut Inbound,
    link: &Arc<Link>,
    events: &Arc<dyn Events>,
) -> Result<(), Error> {
    loop {
        while let Some(frame) = reader.frame()? {
            dispatch(link, events, frame).await?;
        }
        let n = tokio::select! {
            read = tokio::time::timeout(DEAD_AFTER, reader.receive()) => {
                read.map_err(|_| Error::Timeout(DEAD_AFTER))??
            }
            () = link.shut_signal.notified() => {
                let reason = link.shut_reason.lock().expect("shut lock").take();
                return Err(Error::Shut(reason.unwrap_or_default()));
            }
        };
        link.stats.bytes_in.fetch_add(n as u64, Ordering::Relaxed);
    }
}

async fn dispatch(link: &Arc<Link>, events: &Arc<dyn Events>, frame: Frame) -> Result<(), Error> {
    match receive(link, frame)? {
        Action::Done => {}
        // A Pong is dropped when the queue is full: a peer that pings without reading must not
        // block this reader on its own answers (the stalled writer ends the link instead).
        Action::Reply(pong @ Frame::Pong { .. }) => {
            let _ = link.try_send(pong);
        }
        Action::Reply(frame) => link.send(frame).await?,
        Action::Open(open, tx, rx) => {
            link.send(Frame::Window {
                stream: tx.id(),
                increment: stream::INITIAL_WINDOW,
            })
            .await?;
            Arc::clone(events).open(link, open, tx, rx);
        }
        Action::LinkState(state) => Arc::clone(events).link_state(link, state),
    }
    Ok(())
}

/// What a received frame asks of whoever reads the link, beyond what [`receive`] did itself.
#[derive(Debug)]
pub enum Action {
    /// Nothing more.
    Done,
    /// Send this frame to the peer: a stream's reset, or a Pong (only if the queue has room:
    /// a peer that pings without reading must not hold up the reader).
    Reply(Frame),
    /// The peer opened a stream: grant it the initial window, then hand it to the router.
    Open(Open, StreamTx, StreamRx),
    /// The peer advertised its link state.
    LinkState(LinkState),
}

/// Takes in one frame from the peer: credits, queues or resets the stream it is for, checks
/// it against the protocol, and says what else it asks for.
///
/// # Errors
/// When the frame breaks the protocol in a way that ends the link.
pub fn receive(link: &Arc<Link>, frame: Frame) -> Result<Action, Error> {
    match frame {
        Frame::Data { stream, data } => {
            let len = i64::try_from(data.len()).expect("frame payloads are bounded");
            let violated = {
                let streams = link.streams.lock().expect("stream table lock");
                match streams.get(&stream) {
                    // Data for a stream we already dropped: it was in flight; ignore it.
                    None => None,
                    Some(slot) if slot.peer_closed.load(Ordering::Acquire) => {
                        slot.kill(ResetCode::Internal);
                        Some("data after the peer's own close")
                    }
                    Some(slot) => {
                        if slot.recv_budget.fetch_sub(len, Ordering::AcqRel) < len {
                            slot.kill(ResetCode::Internal);
                            Some("sent beyond credit")
                        } else {
                            let _ = slot.inbound.send(stream::Inbound::Data(data));
                            None
                        }
                    }
                }
            };
            if let Some(reason) = violated {
                debug!(peer = %link.peer, stream, reason, "stream reset");
                link.forget_stream(stream);
                return Ok(Action::Reply(Frame::Reset {
                    stream,
                    code: ResetCode::Internal,
                    reason: reason.into(),
                }));
            }
        }
        Frame::Window { stream, increment } => {
            if let Some(slot) = link.streams.lock().expect("stream table lock").get(&stream) {
                // Bounded so a hostile peer cannot overflow the semaphore (which would panic).
                if slot.credit.available_permits() + increment as usize > MAX_CREDIT {
                    return Err(Error::Protocol("window grows credit beyond 2^31-1 bytes"));
                }
                slot.credit.add_permits(increment as usize);
            }
        }
        Frame::Close { stream } => {
            if let Some(slot) = link.streams.lock().expect("stream table lock").get(&stream) {
                slot.peer_closed.store(true, Ordering::Release);
                let _ = slot.inbound.send(stream::Inbound::Close);
            }
        }
        Frame::Reset {
            stream,
            code,
            reason,
        } => {
            debug!(peer = %link.peer, stream, ?code, reason, "stream reset by peer");
            if let Some(slot) = link
                .streams
                .lock()
                .expect("stream table lock")
                .remove(&stream)
            {
                slot.kill(code);
            }
        }
        Frame::Open {
            stream,
            routing_key,
            origin,
            dest,
            window,
            alpn,
        } => {
            if link.owns_parity(stream) {
                return Err(Error::Protocol("stream id has our parity"));
            }
            if link.version < 2 && !alpn.is_empty() {
                return Err(Error::Protocol("open-alpn frame on a version 1 link"));
            }
            let (tx, rx, slot) = new_stream(link, stream, window);
            {
                let mut streams = link.streams.lock().expect("stream table lock");
                if streams.contains_key(&stream) {
                    return Err(Error::Protocol("stream id reused while open"));
                }
                streams.insert(stream, slot);
            }
            link.stats.streams_opened.fetch_add(1, Ordering::Relaxed);
            let open = Open {
                routing_key,
                origin,
                dest,
                alpn,
            };
            return Ok(Action::Open(open, tx, rx));
        }
        Frame::LinkState(state) => return Ok(Action::LinkState(state)),
        Frame::Ping { nonce } => return Ok(Action::Reply(Frame::Pong { nonce })),
        Frame::Pong { nonce } => {
            // Only an answer to one of our recent Pings counts; any other nonce is ignored.
            let rtt = link.ping.lock().expect("heartbeat lock").answered(nonce);
            if let Some(rtt) = rtt {
                let rtt = u64::try_from(rtt.as_micros()).unwrap_or(u64::MAX);
                link.stats.rtt_us.store(rtt, Ordering::Relaxed);
            }
        }
        Frame::Hello { .. } => return Err(Error::Protocol("second Hello")),
    }
    Ok(Action::Done)
}

/// Runs the writer; when it fails (the peer stopped reading, or the connection broke) the link
/// ends as it would for a read failure.
async fn write_until_failure(writer: Outbound, frames: mpsc::Receiver<Queued>, link: Arc<Link>) {
    if let Err(e) = write_loop(writer, frames, Arc::clone(&link)).await {
        link.shut(e.to_string());
    }
}

async fn write_loop(
    mut writer: Outbound,
    mut frames: mpsc::Receiver<Queued>,
    link: Arc<Link>,
) -> Result<(), Error> {
    // Headers and small frames are encoded into `head`; Data payloads stay in their own
    // buffers and reach the record layer as slices of their own, which it seals into the
    // send buffer without gathering them first: one copy of each byte fewer than encoding
    // whole frames into one buffer.
    let mut head = BytesMut::with_capacity(64 * 1024);
    let mut parts: Vec<Part> = Vec::new();
    // The queue room the batch's frames took, given back once they are written.
    let mut taken = Vec::new();
    while let Some(first) = frames.recv().await {
        let mut batch = add_frame(first.frame, &mut head, &mut parts);
        taken.push(first.room);
        while batch < WRITE_BATCH {
            match frames.try_recv() {
                Ok(next) => {
                    batch += add_frame(next.frame, &mut head, &mut parts);
                    taken.push(next.room);
                }
                Err(_) => break,
            }
        }
        let mut slices: Vec<IoSlice<'_>> = parts
            .iter()
            .map(|part| match part {
                Part::Head(range) => IoSlice::new(&head[range.clone()]),
                Part::Payload(data) => IoSlice::new(data),
            })
            .collect();
        // A peer that reads nothing for DEAD_AFTER while this waits is dead, however many
        // frames it sends (a peer flooding Pings keeps the reader busy, not the writer).
        tokio::time::timeout(DEAD_AFTER, writer.send(&mut slices))
            .await
            .map_err(|_| Error::WriteStalled(DEAD_AFTER))??;
        link.stats
            .bytes_out
            .fetch_add(batch as u64, Ordering::Relaxed);
        head.clear();
        parts.clear();
        taken.clear();
    }
    Ok(())
}

/// A frame in the writer's queue, holding the room it takes there until it is written.
#[derive(Debug)]
pub struct Queued {
    pub frame: Frame,
    pub room: tokio::sync::OwnedSemaphorePermit,
}

/// The room a frame takes in the writer's queue: its encoded length (a frame is at most
/// `MAX_PAYLOAD` and a little, far below the queue's room). Pings and Pongs take none, so
/// that a queue full of data never keeps the heartbeat out; the channel's frame count still
/// bounds them.
fn queued_size(frame: &Frame) -> u32 {
    if matches!(frame, Frame::Ping { .. } | Frame::Pong { .. }) {
        return 0;
    }
    u32::try_from(frame.encoded_len().min(QUEUE_BYTES)).unwrap_or(u32::MAX)
}

/// A piece of a write batch: encoded bytes in the writer's head buffer, or a Data payload.
enum Part {
    Head(std::ops::Range<usize>),
    Payload(bytes::Bytes),
}

/// Adds `frame` to the batch; returns its encoded length.
fn add_frame(frame: Frame, head: &mut BytesMut, parts: &mut Vec<Part>) -> usize {
    let len = frame.encoded_len();
    let start = head.len();
    let payload = frame.encode_head(head);
    match parts.last_mut() {
        // Consecutive encoded bytes are one slice.
        Some(Part::Head(range)) if range.end == start => range.end = head.len(),
        _ => parts.push(Part::Head(start..head.len())),
    }
    if let Some(data) = payload.filter(|d| !d.is_empty()) {
        parts.push(Part::Payload(data));
    }
    len
}

/// Writes every slice, however the writer splits them up.
pub(crate) async fn write_all_vectored<W: AsyncWrite + Unpin>(
    writer: &mut W,
    mut slices: &mut [IoSlice<'_>],
) -> std::io::Result<()> {
    while !slices.is_empty() {
        let n = writer.write_vectored(slices).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        IoSlice::advance_slices(&mut slices, n);
    }
    Ok(())
}

/// Pings still awaiting their Pong: every Ping of the dead-link time, so that a slow link
/// whose round trip exceeds the Ping interval still answers in time.
const PINGS_IN_FLIGHT: usize = 20;
const _: () = assert!(PINGS_IN_FLIGHT as u128 * PING_EVERY.as_millis() >= DEAD_AFTER.as_millis());

/// What the heartbeat knows of the peer's answers.
#[derive(Debug)]
struct Heartbeat {
    /// The last Pings sent (random nonce, when), oldest overwritten first.
    sent: [Option<(u64, Instant)>; PINGS_IN_FLIGHT],
    next: usize,
    answered: Instant,
}

impl Heartbeat {
    fn new() -> Self {
        Self {
            sent: [None; PINGS_IN_FLIGHT],
            next: 0,
            answered: Instant::now(),
        }
    }

    fn sent(&mut self, nonce: u64) {
        self.sent[self.next] = Some((nonce, Instant::now()));
        self.next = (self.next + 1) % PINGS_IN_FLIGHT;
    }

    /// Takes in a Pong; returns the round trip when it answers one of our Pings.
    fn answered(&mut self, nonce: u64) -> Option<Duration> {
        let slot = self
            .sent
            .iter_mut()
            .find(|s| s.is_some_and(|(n, _)| n == nonce))?;
        let (_, at) = slot.take()?;
        self.answered = Instant::now();
        Some(at.elapsed())
    }
}

async fn heartbeat(link: Arc<Link>) {
    let mut tick = tokio::time::interval(PING_EVERY);
    loop {
        tick.tick().await;
        if let Some(dead) = link.carried_and_dead() {
            link.shut(dead.to_string());
            return;
        }
        let silent = link.ping.lock().expect("heartbeat lock").answered.elapsed();
        if silent > DEAD_AFTER {
            link.shut(format!(
                "the peer answered no Ping for {silent:?}: it is not reading"
            ));
            return;
        }
        // Random, so that a peer cannot answer Pings it never read.
        let mut nonce = [0u8; 8];
        if crate::tls::random(&mut nonce).is_err() {
            continue;
        }
        let nonce = u64::from_ne_bytes(nonce);
        link.ping.lock().expect("heartbeat lock").sent(nonce);
        // Never waits: a queue so full that a Ping finds no place is a peer not reading.
        let _ = link.try_send(Frame::Ping { nonce });
        if link.is_closed() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::*;

    /// A Pong counts for any of the recent Pings (a slow link's round trip may span several),
    /// once, and never for a nonce this router did not send.
    #[test]
    fn pongs_answer_recent_pings_only() {
        let mut beat = Heartbeat::new();
        for nonce in 1..=3 {
            beat.sent(nonce);
        }
        assert!(beat.answered(99).is_none());
        assert!(beat.answered(0).is_none(), "an unused slot is no Ping");
        assert!(beat.answered(1).is_some(), "an older Ping still counts");
        assert!(beat.answered(1).is_none(), "once");
        // Ping 2 went out in slot 1; PINGS_IN_FLIGHT more from there overwrite it.
        let last = 3 + PINGS_IN_FLIGHT as u64;
        for nonce in 4..=last {
            beat.sent(nonce);
        }
        assert!(
            beat.answered(2).is_none(),
            "overwritten after PINGS_IN_FLIGHT newer ones"
        );
        assert!(beat.answered(last).is_some());
    }

    /// The far end of a link under test: a peer speaking frames over an in-memory pipe.
    struct Peer {
        io: tokio::io::DuplexStream,
        buf: BytesMut,
    }

    impl Peer {
        async fn send(&mut self, frame: Frame) {
            let mut out = BytesMut::new();
            frame.encode(&mut out);
            self.io.write_all(&out).await.expect("peer writes");
        }

        /// The next frame the router sends, or `None` once it has closed the link.
        async fn next(&mut self) -> Option<Frame> {
            loop {
                if let Some(frame) =
                    frame::decode(&mut self.buf).expect("router sends valid frames")
                {
                    return Some(frame);
                }
                let read =
                    tokio::time::timeout(Duration::from_secs(10), self.io.read_buf(&mut self.buf))
                        .await
                        .expect("router answers within 10 s");
                if read.expect("peer reads") == 0 {
                    return None;
                }
            }
        }

        /// The next frame that is not routine (advertisements, heartbeats, credit).
        async fn next_notable(&mut self) -> Option<Frame> {
            loop {
                match self.next().await? {
                    Frame::LinkState(_) | Frame::Ping { .. } => {}
                    frame => return Some(frame),
                }
            }
        }

        /// Answers the router's Hello as the certified site.
        async fn hello(&mut self) {
            self.send(Frame::Hello {
                version: 2,
                site: PEER.into(),
            })
            .await;
        }

        /// Opens `stream` towards the router (without reading its answer).
        async fn open(&mut self, stream: u32) {
            self.send(Frame::Open {
                stream,
                routing_key: "web".into(),
                origin: PEER.into(),
                dest: "east".into(),
                window: stream::INITIAL_WINDOW,
                alpn: String::new(),
            })
            .await;
        }

        /// Waits for the router to reset `stream` (code Internal) for `reason`.
        async fn expect_reset(&mut self, stream: u32, reason: &str) {
            match self.next_notable().await {
                Some(Frame::Reset {
                    stream: reset,
                    code: ResetCode::Internal,
                    reason: why,
                }) if reset == stream => assert_eq!(why, reason),
                other => panic!("expected a reset of stream {stream}, got {other:?}"),
            }
        }

        /// Sends a Ping and waits for its Pong: the link still serves this peer.
        async fn still_linked(&mut self) {
            self.send(Frame::Ping { nonce: 0x5eed }).await;
            loop {
                match self.next().await {
                    Some(Frame::Pong { nonce: 0x5eed }) => return,
                    Some(_) => {}
                    None => panic!("the link ended"),
                }
            }
        }
    }

    /// Link events, recorded; opened streams are held (and never read) until the test ends.
    #[derive(Default)]
    struct Recorder {
        ups: AtomicU32,
        downs: AtomicU32,
        streams: Mutex<Vec<(StreamTx, StreamRx)>>,
    }

    impl Events for Recorder {
        fn link_up(&self, _: &Arc<Link>) {
            self.ups.fetch_add(1, Ordering::SeqCst);
        }
        fn link_down(&self, _: &Arc<Link>) {
            self.downs.fetch_add(1, Ordering::SeqCst);
        }
        fn link_state(self: Arc<Self>, _: &Arc<Link>, _: LinkState) {}
        fn open(self: Arc<Self>, _: &Arc<Link>, _: Open, tx: StreamTx, rx: StreamRx) {
            self.streams.lock().expect("streams").push((tx, rx));
        }
    }

    const PEER: &str = "west";

    /// How the link ended, within 10 s.
    async fn ended(run: tokio::task::JoinHandle<Result<(), Error>>) -> Result<(), Error> {
        tokio::time::timeout(Duration::from_secs(10), run)
            .await
            .expect("the link ends within 10 s")
            .expect("link task")
    }

    /// Runs an incoming link from certified site `west` (version 2); the peer has read the
    /// router's Hello and not yet sent its own.
    async fn link() -> (
        Peer,
        Arc<Recorder>,
        tokio::task::JoinHandle<Result<(), Error>>,
    ) {
        let (ours, theirs) = tokio::io::duplex(4 << 20);
        let events = Arc::new(Recorder::default());
        let run = tokio::spawn(run(
            transport::plain(ours),
            2,
            "east",
            PEER.to_owned(),
            Direction::Incoming,
            Arc::clone(&events) as Arc<dyn Events>,
        ));
        let mut peer = Peer {
            io: theirs,
            buf: BytesMut::new(),
        };
        assert_eq!(
            peer.next().await,
            Some(Frame::Hello {
                version: 2,
                site: "east".into()
            })
        );
        (peer, events, run)
    }

    /// A linked peer with stream 1 open (the peer's parity is odd on an incoming link).
    async fn with_stream() -> (
        Peer,
        Arc<Recorder>,
        tokio::task::JoinHandle<Result<(), Error>>,
    ) {
        let (mut peer, events, run) = link().await;
        peer.hello().await;
        peer.open(1).await;
        assert_eq!(
            peer.next_notable().await,
            Some(Frame::Window {
                stream: 1,
                increment: stream::INITIAL_WINDOW
            })
        );
        (peer, events, run)
    }

    #[tokio::test]
    async fn a_hello_naming_another_site_than_the_certificate_ends_the_link() {
        let (mut peer, events, run) = link().await;
        peer.send(Frame::Hello {
            version: 2,
            site: "mallory".into(),
        })
        .await;
        let ended = ended(run).await;
        assert!(
            matches!(&ended, Err(Error::Identity { claimed, certified }) if claimed == "mallory" && certified == PEER),
            "{ended:?}"
        );
        assert_eq!(events.ups.load(Ordering::SeqCst), 0, "never up");
        assert_eq!(peer.next().await, None, "connection closed");
    }

    #[tokio::test]
    async fn a_hello_with_another_version_than_alpn_agreed_ends_the_link() {
        let (mut peer, events, run) = link().await;
        peer.send(Frame::Hello {
            version: 1,
            site: PEER.into(),
        })
        .await;
        let ended = ended(run).await;
        assert!(matches!(ended, Err(Error::Version(1, 2))), "{ended:?}");
        assert_eq!(events.ups.load(Ordering::SeqCst), 0, "never up");
    }

    #[tokio::test]
    async fn data_beyond_credit_resets_that_stream_and_the_link_goes_on() {
        let (mut peer, events, _run) = with_stream().await;
        // The stream's reader never reads, so no credit comes back: one byte more than the
        // initial window overruns it.
        let chunk = Bytes::from(vec![7u8; stream::MAX_DATA]);
        let full = stream::INITIAL_WINDOW as usize / stream::MAX_DATA;
        for _ in 0..full {
            peer.send(Frame::Data {
                stream: 1,
                data: chunk.clone(),
            })
            .await;
        }
        peer.send(Frame::Data {
            stream: 1,
            data: Bytes::from_static(b"x"),
        })
        .await;
        peer.expect_reset(1, "sent beyond credit").await;
        peer.still_linked().await;
        assert_eq!(events.downs.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn data_after_the_peers_close_resets_that_stream_and_the_link_goes_on() {
        let (mut peer, events, _run) = with_stream().await;
        peer.send(Frame::Close { stream: 1 }).await;
        peer.send(Frame::Data {
            stream: 1,
            data: Bytes::from_static(b"late"),
        })
        .await;
        peer.expect_reset(1, "data after the peer's own close")
            .await;
        peer.still_linked().await;
        assert_eq!(events.downs.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn a_window_past_the_credit_limit_ends_the_link() {
        let (mut peer, events, run) = with_stream().await;
        // The router granted nothing to send on stream 1 yet; the peer's Open gave it the
        // initial window. This pushes it past 2^31-1.
        peer.send(Frame::Window {
            stream: 1,
            increment: u32::MAX,
        })
        .await;
        let ended = ended(run).await;
        assert!(matches!(ended, Err(Error::Protocol(_))), "{ended:?}");
        assert_eq!(events.downs.load(Ordering::SeqCst), 1, "link_down told");
    }

    #[tokio::test]
    async fn a_stream_opened_with_the_routers_own_parity_ends_the_link() {
        let (mut peer, _events, run) = link().await;
        peer.hello().await;
        peer.open(2).await;
        let ended = ended(run).await;
        assert!(
            matches!(ended, Err(Error::Protocol("stream id has our parity"))),
            "{ended:?}"
        );
    }
}
