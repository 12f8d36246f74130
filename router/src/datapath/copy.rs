//! Proxying between two TCP sockets through a user-space buffer, for sockets whose bytes the
//! kernel redirects with sk_msg (splice does not see them; see [`super::epoll::proxy`]).
//!
//! The buffer exists only while a direction has bytes to move: it is allocated when the source
//! becomes readable and released when the source runs dry, so an idle stream holds no buffer.
//! (With one 256 KiB buffer per direction held for the connection's life, 1,000 idle
//! accelerated streams cost the router about 240 MiB; `cargo xtask bench` measures it.)
//!
//! Redirection has no flow control of its own: `inflow` and `outflow` bound what waits in the
//! kernel on either side (see [`crate::accel::Backpressure`]).

use std::io;

use bytes::{Buf as _, BytesMut};
use tokio::net::TcpStream;

use super::{BUFFER_SIZE, epoll::OneWay};
use crate::accel::{Bypass, Inflow, Outflow};

/// Moves bytes from `from` to `to` until `from` reaches end-of-stream, then half-closes `to`.
/// Whenever it has caught up, it offers `from`'s peer the shortcut to `to`'s peer (`bypass`).
/// Returns the number of bytes moved, by the router or by the shortcut; notes when the first
/// was written in `first`.
pub async fn one_way(
    from: &TcpStream,
    to: &TcpStream,
    (mut inflow, mut outflow, mut bypass): (Inflow<'_>, Outflow<'_>, Bypass<'_>),
    first: &super::FirstByte,
) -> Result<u64, OneWay> {
    let mut buf = BytesMut::new();
    let mut total = 0u64;
    let mut eof = false;
    loop {
        if buf.is_empty() {
            if eof {
                super::splice::shutdown_write(to);
                return Ok(total + bypass.bytes());
            }
            // Reuses the allocation when there is one (the buffer is empty and not shared).
            buf.reserve(BUFFER_SIZE);
            match from.try_read_buf(&mut buf) {
                Ok(0) => eof = true,
                Ok(n) => {
                    if bypass.fell_back() {
                        outflow.look_again();
                    }
                    inflow.check();
                    inflow.watch(outflow.reserve(n)).await;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    // Dry: give the buffer back while waiting, and step out of the way.
                    buf = BytesMut::new();
                    bypass.offer(total);
                    from.readable().await.map_err(OneWay::Read)?;
                }
                Err(e) => return Err(OneWay::Read(e)),
            }
            continue;
        }
        match to.try_write(&buf) {
            Ok(n) => {
                buf.advance(n);
                total += n as u64;
                super::first_byte(first);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                inflow.watch(to.writable()).await.map_err(OneWay::Write)?;
            }
            Err(e) => return Err(OneWay::Write(e)),
        }
    }
}
