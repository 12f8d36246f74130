//! The tokio (epoll) backend of the data path.
//!
//! A relayed connection ends cleanly when both directions have seen end-of-stream (TCP
//! half-close is carried end to end). Any failure ends it at once: the socket is closed with
//! RST (linger 0) so the client sees a reset, and the stream is reset at the peer.

use std::time::Duration;

use bytes::BytesMut;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{
        TcpStream,
        tcp::{ReadHalf, WriteHalf},
    },
};

use super::{BUFFER_SIZE, Outcome, Side};
use crate::link::{
    frame::ResetCode,
    stream::{Inbound, StreamRx, StreamTx},
};

/// Moves bytes between a client socket and a local backend socket until both directions end;
/// each direction half-closes the other side when it ends.
///
/// With [`Copy::Splice`] the bytes never enter user space (splice(2)). Sockets whose data
/// the kernel redirects with sk_msg need [`Copy::Read`]: redirected bytes wait in the socket's
/// psock queue, which `recvmsg` drains but splice does not see.
pub async fn proxy(client: TcpStream, backend: TcpStream, copy: Copy) -> Outcome {
    let result = if copy == Copy::Read {
        tokio::try_join!(
            super::copy::one_way(&client, &backend),
            super::copy::one_way(&backend, &client)
        )
    } else {
        tokio::try_join!(
            super::splice::one_way(&client, &backend),
            super::splice::one_way(&backend, &client)
        )
    };
    match result {
        Ok((bytes_out, bytes_in)) => Outcome {
            bytes_out,
            bytes_in,
            failed: None,
        },
        Err(_) => failed_both(&client, &backend),
    }
}

/// How [`proxy`] moves bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Copy {
    /// splice(2) through a pipe: zero-copy.
    Splice,
    /// read and write through a user-space buffer.
    Read,
}

/// Neither copy loop says which socket failed: reset both.
fn failed_both(client: &TcpStream, backend: &TcpStream) -> Outcome {
    abort(client);
    abort(backend);
    Outcome {
        failed: Some(Side::Downstream),
        ..Outcome::default()
    }
}

/// Relays between a socket (`side` says which kind) and a link stream until both directions end.
pub async fn relay(mut tcp: TcpStream, side: Side, tx: StreamTx, mut rx: StreamRx) -> Outcome {
    let result = {
        let (read, write) = tcp.split();
        both_directions(read, write, side, &tx, &mut rx).await
    };
    match result {
        Ok((bytes_out, bytes_in)) => Outcome {
            bytes_out,
            bytes_in,
            failed: None,
        },
        Err((failed, bytes_out, bytes_in)) => {
            abort(&tcp);
            if failed != Side::Link {
                let code = if failed == Side::Upstream {
                    ResetCode::Refused
                } else {
                    ResetCode::Cancelled
                };
                tx.reset(code, failed.as_str()).await;
            }
            Outcome {
                bytes_out,
                bytes_in,
                failed: Some(failed),
            }
        }
    }
}

/// Runs both directions; the first failure ends the whole connection.
async fn both_directions(
    read: ReadHalf<'_>,
    write: WriteHalf<'_>,
    side: Side,
    tx: &StreamTx,
    rx: &mut StreamRx,
) -> Result<(u64, u64), (Side, u64, u64)> {
    let up = socket_to_stream(read, tx, side);
    let down = stream_to_socket(rx, write, side);
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

async fn socket_to_stream(
    mut read: ReadHalf<'_>,
    tx: &StreamTx,
    side: Side,
) -> Result<u64, (Side, u64)> {
    let mut buf = BytesMut::with_capacity(BUFFER_SIZE);
    let mut total = 0u64;
    loop {
        if buf.capacity() < BUFFER_SIZE / 4 {
            buf.reserve(BUFFER_SIZE);
        }
        let n = read.read_buf(&mut buf).await.map_err(|_| (side, total))?;
        if n == 0 {
            tx.close().await;
            return Ok(total);
        }
        total += n as u64;
        tx.send(buf.split().freeze())
            .await
            .map_err(|_| (Side::Link, total))?;
    }
}

async fn stream_to_socket(
    rx: &mut StreamRx,
    mut write: WriteHalf<'_>,
    side: Side,
) -> Result<u64, (Side, u64)> {
    let mut total = 0u64;
    loop {
        match rx.recv().await {
            Inbound::Data(data) => {
                write.write_all(&data).await.map_err(|_| (side, total))?;
                total += data.len() as u64;
                rx.consumed(data.len()).await;
            }
            Inbound::Close => {
                // Half-close: the peer is done sending; our socket may still send.
                let _ = write.shutdown().await;
                return Ok(total);
            }
            Inbound::Reset(_) => return Err((Side::Link, total)),
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
            failed: None,
        },
        Err(code) => {
            // Pass the reset on in both directions; the side that reset ignores the echo.
            a_tx.reset(code, "reset further along the path").await;
            b_tx.reset(code, "reset further along the path").await;
            Outcome {
                failed: Some(Side::Link),
                ..Outcome::default()
            }
        }
    }
}

async fn pipe(rx: &mut StreamRx, tx: &StreamTx) -> Result<u64, ResetCode> {
    let mut total = 0u64;
    loop {
        match rx.recv().await {
            Inbound::Data(data) => {
                let n = data.len();
                tx.send(data).await.map_err(|_| ResetCode::LinkLost)?;
                total += n as u64;
                rx.consumed(n).await;
            }
            Inbound::Close => {
                tx.close().await;
                return Ok(total);
            }
            Inbound::Reset(code) => return Err(code),
        }
    }
}

/// Makes the socket's close send RST instead of FIN: the client sees a reset at once, not a
/// clean end and not a hang.
pub fn abort(tcp: &TcpStream) {
    // tokio deprecates set_linger because a positive linger blocks the thread on drop; a zero
    // linger never blocks, it discards unsent data and sends RST.
    #[expect(deprecated, reason = "zero linger does not block on drop")]
    let _ = tcp.set_linger(Some(Duration::ZERO));
}
