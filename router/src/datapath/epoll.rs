//! The epoll backend of the data path: tokio's reactor, one task per relayed connection.
//!
//! A relayed connection ends cleanly when both directions have seen end-of-stream (TCP
//! half-close is carried end to end). Any failure ends it at once: the socket is closed with
//! RST (linger 0) so the client sees a reset, and the stream is reset at the peer.

use std::{
    io::{self, IoSlice},
    os::fd::AsFd as _,
};

use bytes::{Bytes, BytesMut};
use tokio::{
    io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _},
    net::TcpStream,
};

use super::{BUFFER_SIZE, Cause, Conn, Failure, FirstByte, Outcome, Side};
use crate::accel::{Backpressure, Inflow, Outflow};
use crate::link::{
    frame::ResetCode,
    stream::{Inbound, StreamRx, StreamTx},
    write_all_vectored,
};

/// Which end of a one-way copy failed.
#[derive(Debug)]
pub(super) enum OneWay {
    /// Reading from the source.
    Read(io::Error),
    /// Writing to the destination.
    Write(io::Error),
}

impl OneWay {
    /// The failure, for a copy from `from` to `to`.
    fn blame(&self, from: Side, to: Side) -> Failure {
        match self {
            Self::Read(e) => Failure::io(from, e),
            Self::Write(e) => Failure::io(to, e),
        }
    }
}

/// Moves bytes between a client socket and a local backend socket until both directions end;
/// each direction half-closes the other side when it ends.
///
/// Without acceleration the bytes never enter user space (splice(2)). Sockets whose data the
/// kernel may redirect with sk_msg (`accel`) need a read/write copy: redirected bytes wait in
/// the socket's psock queue, which `recvmsg` drains but splice does not see; and the copy
/// applies the flow control redirection lacks.
///
/// When either end is TLS, bytes go through rustls and a user-space copy.
pub async fn proxy(client: Conn, backend: Conn, accel: Option<&Backpressure>) -> Outcome {
    let (client, backend) = match (client, backend) {
        (Conn::Tcp(client), Conn::Tcp(backend)) => (client, backend),
        (client, backend) => return proxy_tls(client, backend, accel).await,
    };
    let (c, b) = (client.as_fd(), backend.as_fd());
    // Only the answer's first byte is noted; the request's goes to a cell nobody reads.
    let (request, answer) = (FirstByte::new(), FirstByte::new());
    let result = if let Some(accel) = accel {
        tokio::try_join!(
            blamed(
                super::copy::one_way(
                    &client,
                    &backend,
                    (accel.inflow(c), accel.outflow(b), accel.bypass(c, b)),
                    &request,
                ),
                Side::Downstream,
                Side::Upstream,
            ),
            blamed(
                super::copy::one_way(
                    &backend,
                    &client,
                    (accel.inflow(b), accel.outflow(c), accel.bypass(b, c)),
                    &answer,
                ),
                Side::Upstream,
                Side::Downstream,
            )
        )
    } else {
        tokio::try_join!(
            blamed(
                super::splice::one_way(&client, &backend, &request),
                Side::Downstream,
                Side::Upstream
            ),
            blamed(
                super::splice::one_way(&backend, &client, &answer),
                Side::Upstream,
                Side::Downstream
            )
        )
    };
    ended(result, &client, &backend, answer.get().copied())
}

/// A one-way copy whose failure names the side it came from.
async fn blamed(
    copy: impl Future<Output = Result<u64, OneWay>>,
    from: Side,
    to: Side,
) -> Result<u64, Failure> {
    copy.await.map_err(|e| e.blame(from, to))
}

/// The outcome of a proxied connection; a failure closes both sockets with RST.
fn ended(
    result: Result<(u64, u64), Failure>,
    client: &TcpStream,
    backend: &TcpStream,
    first_response: Option<std::time::Instant>,
) -> Outcome {
    match result {
        Ok((bytes_out, bytes_in)) => Outcome {
            bytes_out,
            bytes_in,
            failed: None,
            first_response,
        },
        Err(failure) => {
            abort(client);
            abort(backend);
            Outcome {
                failed: Some(failure),
                first_response,
                ..Outcome::default()
            }
        }
    }
}

/// [`proxy`] when either end is TLS.
async fn proxy_tls(client: Conn, backend: Conn, accel: Option<&Backpressure>) -> Outcome {
    let (client_in, client_out) = guards(accel, client.tcp());
    let (backend_in, backend_out) = guards(accel, backend.tcp());
    let (mut client_read, mut client_write) = tokio::io::split(client);
    let (mut backend_read, mut backend_write) = tokio::io::split(backend);
    let (request, answer) = (FirstByte::new(), FirstByte::new());
    let result = tokio::try_join!(
        blamed(
            pump(
                &mut client_read,
                &mut backend_write,
                (client_in, backend_out),
                &request
            ),
            Side::Downstream,
            Side::Upstream
        ),
        blamed(
            pump(
                &mut backend_read,
                &mut client_write,
                (backend_in, client_out),
                &answer
            ),
            Side::Upstream,
            Side::Downstream
        )
    );
    let (client, backend) = (
        client_read.unsplit(client_write),
        backend_read.unsplit(backend_write),
    );
    ended(result, client.tcp(), backend.tcp(), answer.get().copied())
}

/// Flow-control guards for reading from and writing to `tcp`; inert without acceleration.
fn guards<'a>(accel: Option<&'a Backpressure>, tcp: &TcpStream) -> (Inflow<'a>, Outflow<'a>) {
    match accel {
        Some(accel) => (accel.inflow(tcp.as_fd()), accel.outflow(tcp.as_fd())),
        None => (Inflow::inert(), Outflow::inert()),
    }
}

/// Copies `from` to `to` through a TLS-record-sized buffer until end-of-stream, then shuts
/// `to` down (for TLS: close_notify, then a TCP half-close).
async fn pump<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(
    from: &mut R,
    to: &mut W,
    (mut inflow, mut outflow): (Inflow<'_>, Outflow<'_>),
    first: &FirstByte,
) -> Result<u64, OneWay> {
    let mut buf = vec![0u8; TLS_BUFFER];
    let mut total = 0u64;
    loop {
        let n = from.read(&mut buf).await.map_err(OneWay::Read)?;
        if n == 0 {
            to.shutdown().await.map_err(OneWay::Write)?;
            return Ok(total);
        }
        inflow.check();
        inflow
            .watch(async {
                outflow.reserve(n).await;
                to.write_all(&buf[..n]).await?;
                // tokio-rustls may keep the tail of the records when the socket is full; only
                // a flush sends them even if no more bytes come.
                to.flush().await
            })
            .await
            .map_err(OneWay::Write)?;
        total += n as u64;
        super::first_byte(first);
    }
}

/// Copy buffer per direction when one end is TLS.
const TLS_BUFFER: usize = 64 * 1024;

/// Relays between a connection (`side` says which kind) and a link stream until both
/// directions end. With `accel`, the connection's socket may be redirected by sk_msg and gets
/// the flow control redirection lacks. A failure resets the stream with the code its side
/// maps to ([`Failure::reset_code`]).
pub async fn relay(
    conn: Conn,
    side: Side,
    tx: StreamTx,
    mut rx: StreamRx,
    accel: Option<&Backpressure>,
) -> Outcome {
    let flow = guards(accel, conn.tcp());
    let answer = FirstByte::new();
    match conn {
        Conn::Tcp(mut tcp) => {
            let result = {
                let (read, write) = tcp.split();
                // The relay reads this socket itself: a lost wakeup can be read past.
                let flow = (flow.0.reading_plain_tcp(), flow.1);
                both_directions(read, write, flow, (side, &answer), &tx, &mut rx).await
            };
            finish_relay(result, &tcp, &tx, answer.get().copied()).await
        }
        tls => {
            let (mut read, mut write) = tokio::io::split(tls);
            let result =
                both_directions(&mut read, &mut write, flow, (side, &answer), &tx, &mut rx).await;
            let conn = read.unsplit(write);
            finish_relay(result, conn.tcp(), &tx, answer.get().copied()).await
        }
    }
}

async fn finish_relay(
    result: Result<(u64, u64), (Failure, u64, u64)>,
    tcp: &TcpStream,
    tx: &StreamTx,
    first_response: Option<std::time::Instant>,
) -> Outcome {
    match result {
        Ok((bytes_out, bytes_in)) => Outcome {
            bytes_out,
            bytes_in,
            failed: None,
            first_response,
        },
        Err((failed, bytes_out, bytes_in)) => {
            abort(tcp);
            if let Some(code) = failed.reset_code() {
                tx.reset(code, &failed.to_string()).await;
            }
            Outcome {
                bytes_out,
                bytes_in,
                failed: Some(failed),
                first_response,
            }
        }
    }
}

/// Runs both directions; the first failure ends the whole connection.
/// `answer` notes the first byte of the answer: read from a backend (`side` upstream), or
/// written to a client.
async fn both_directions<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(
    read: R,
    write: W,
    (inflow, outflow): (Inflow<'_>, Outflow<'_>),
    (side, answer): (Side, &FirstByte),
    tx: &StreamTx,
    rx: &mut StreamRx,
) -> Result<(u64, u64), (Failure, u64, u64)> {
    let request = FirstByte::new();
    let (read_first, write_first) = if side == Side::Upstream {
        (answer, &request)
    } else {
        (&request, answer)
    };
    let up = socket_to_stream(read, inflow, tx, side, read_first);
    let down = stream_to_socket(rx, write, outflow, side, write_first);
    tokio::pin!(up, down);
    let (mut out, mut inn) = (None, None);
    while out.is_none() || inn.is_none() {
        tokio::select! {
            r = &mut up, if out.is_none() => match r {
                Ok(n) => out = Some(n),
                Err((failed, n)) => return Err((failed, n, inn.unwrap_or(0))),
            },
            r = &mut down, if inn.is_none() => match r {
                Ok(n) => inn = Some(n),
                Err((failed, n)) => return Err((failed, out.unwrap_or(0), n)),
            },
        }
    }
    Ok((out.unwrap_or(0), inn.unwrap_or(0)))
}

async fn socket_to_stream<R: AsyncRead + Unpin>(
    mut read: R,
    mut inflow: Inflow<'_>,
    tx: &StreamTx,
    side: Side,
    first: &FirstByte,
) -> Result<u64, (Failure, u64)> {
    let mut buf = BytesMut::with_capacity(BUFFER_SIZE);
    let mut total = 0u64;
    loop {
        if buf.capacity() < BUFFER_SIZE / 4 {
            buf.reserve(BUFFER_SIZE);
        }
        let n = read_waking(&mut read, &mut buf, &mut inflow)
            .await
            .map_err(|e| (Failure::io(side, &e), total))?;
        if n == 0 {
            tx.close().await;
            return Ok(total);
        }
        total += n as u64;
        super::first_byte(first);
        inflow.check();
        inflow
            .watch(tx.send(buf.split().freeze()))
            .await
            .map_err(|_| (LINK_LOST, total))?;
    }
}

/// Reads into `buf`; on a redirected socket, also what arrived without a wakeup (see
/// [`Inflow::read_stuck`]): a read that has waited [`Inflow::stuck_after`] looks for it.
async fn read_waking<R: AsyncRead + Unpin>(
    read: &mut R,
    buf: &mut BytesMut,
    inflow: &mut Inflow<'_>,
) -> io::Result<usize> {
    let Some(mut after) = inflow.stuck_after() else {
        return read.read_buf(buf).await;
    };
    loop {
        // A cancelled read_buf of a TCP stream has taken nothing.
        if let Ok(read) = tokio::time::timeout(after, read.read_buf(buf)).await {
            return read;
        }
        if let Some(read) = inflow.read_stuck(buf) {
            return read;
        }
        // Nothing there: an idle connection is looked at less and less often.
        after = (after * 2).min(STUCK_AT_MOST);
    }
}

/// The longest a read of a redirected socket waits between two looks for bytes that came
/// without a wakeup: idle accelerated connections cost one recv a second each.
const STUCK_AT_MOST: std::time::Duration = std::time::Duration::from_secs(1);

/// The link died (or the stream was reset) while the relay was sending on it.
const LINK_LOST: Failure = Failure {
    side: Side::Link,
    cause: Cause::LinkLost,
};

/// The failure a reset read from a stream stands for: a dead link reads as `LinkLost`.
const fn reset(code: ResetCode) -> Failure {
    Failure {
        side: Side::Link,
        cause: match code {
            ResetCode::LinkLost => Cause::LinkLost,
            code => Cause::Reset(code),
        },
    }
}

async fn stream_to_socket<W: AsyncWrite + Unpin>(
    rx: &mut StreamRx,
    mut write: W,
    mut outflow: Outflow<'_>,
    side: Side,
    first: &FirstByte,
) -> Result<u64, (Failure, u64)> {
    let mut total = 0u64;
    let mut batch: Vec<Bytes> = Vec::new();
    let mut next = None;
    loop {
        let inbound = match next.take() {
            Some(inbound) => inbound,
            None => rx.recv().await,
        };
        match inbound {
            Inbound::Data(data) => {
                // Whatever else has already arrived goes out in the same write: fewer, larger
                // writes mean fewer wakeups of the reader on the other side.
                let mut len = data.len();
                batch.push(data);
                while len < BUFFER_SIZE {
                    match rx.try_recv() {
                        Some(Inbound::Data(data)) => {
                            len += data.len();
                            batch.push(data);
                        }
                        other => {
                            next = other;
                            break;
                        }
                    }
                }
                outflow.reserve(len).await;
                let mut slices: Vec<IoSlice<'_>> = batch.iter().map(|b| IoSlice::new(b)).collect();
                write_all_vectored(&mut write, &mut slices)
                    .await
                    .map_err(|e| (Failure::io(side, &e), total))?;
                // See `pump`: a TLS connection may hold back the tail of its records.
                write
                    .flush()
                    .await
                    .map_err(|e| (Failure::io(side, &e), total))?;
                drop(slices);
                batch.clear();
                total += len as u64;
                super::first_byte(first);
                rx.consumed(len).await;
            }
            Inbound::Close => {
                // Half-close: the peer is done sending; our socket may still send.
                let _ = write.shutdown().await;
                return Ok(total);
            }
            Inbound::Reset(code) => return Err((reset(code), total)),
        }
    }
}

/// Splices two link streams at an interior router until both directions end.
pub async fn splice(
    a_tx: StreamTx,
    mut a_rx: StreamRx,
    b_tx: StreamTx,
    mut b_rx: StreamRx,
) -> Outcome {
    let forward = pipe(&mut a_rx, &b_tx);
    let backward = pipe(&mut b_rx, &a_tx);
    match tokio::try_join!(forward, backward) {
        Ok((bytes_out, bytes_in)) => Outcome {
            bytes_out,
            bytes_in,
            ..Outcome::default()
        },
        Err(failed) => {
            // Pass the reset on in both directions, with the code it came with; the side that
            // reset ignores the echo.
            let code = match failed.cause {
                Cause::Reset(code) | Cause::Refused(code) => code,
                Cause::LinkLost | Cause::Io(_) => ResetCode::LinkLost,
            };
            a_tx.reset(code, "reset further along the path").await;
            b_tx.reset(code, "reset further along the path").await;
            Outcome {
                failed: Some(failed),
                ..Outcome::default()
            }
        }
    }
}

async fn pipe(rx: &mut StreamRx, tx: &StreamTx) -> Result<u64, Failure> {
    let mut total = 0u64;
    loop {
        match rx.recv().await {
            Inbound::Data(data) => {
                let n = data.len();
                tx.send(data).await.map_err(|_| LINK_LOST)?;
                total += n as u64;
                rx.consumed(n).await;
            }
            Inbound::Close => {
                tx.close().await;
                return Ok(total);
            }
            Inbound::Reset(code) => return Err(reset(code)),
        }
    }
}

/// Makes the socket's close send RST instead of FIN: the client sees a reset at once, not a
/// clean end and not a hang.
pub fn abort(tcp: &TcpStream) {
    // A zero linger never blocks the thread on close: it discards unsent data and sends RST.
    let _ = tcp.set_zero_linger();
}
