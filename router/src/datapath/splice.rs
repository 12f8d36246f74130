//! Zero-copy proxying between two TCP sockets with splice(2): bytes go socket -> pipe ->
//! socket inside the kernel, never through user space. Readiness comes from tokio's reactor;
//! the splice calls are non-blocking.

use std::{
    io,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd, RawFd},
};

use tokio::{io::Interest, net::TcpStream};

use super::epoll::OneWay;

/// Pipe capacity per direction; the kernel rounds it to pages and may cap it
/// (/proc/sys/fs/pipe-max-size, 1 MiB by default).
const PIPE_SIZE: libc::c_int = 1 << 20;

/// A pipe used as the in-kernel buffer of one direction.
struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
    /// Bytes spliced in and not yet spliced out.
    pending: usize,
}

impl Pipe {
    fn new() -> io::Result<Self> {
        let mut fds = [0 as RawFd; 2];
        // SAFETY: fds has room for the two descriptors pipe2 writes.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: pipe2 succeeded, so both are open descriptors that we now own.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // A bigger pipe means fewer splice calls per byte; failure only costs speed.
        // SAFETY: fcntl on a descriptor we own.
        unsafe { libc::fcntl(write.as_raw_fd(), libc::F_SETPIPE_SZ, PIPE_SIZE) };
        Ok(Self {
            read,
            write,
            pending: 0,
        })
    }
}

fn splice(from: RawFd, to: RawFd, len: usize) -> io::Result<usize> {
    // SAFETY: both are open descriptors; null offsets mean "current position" (required for
    // sockets and pipes).
    let n = unsafe {
        libc::splice(
            from,
            std::ptr::null_mut(),
            to,
            std::ptr::null_mut(),
            len,
            libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
        )
    };
    usize::try_from(n).map_err(|_| io::Error::last_os_error())
}

/// Moves bytes from `from` to `to` until `from` reaches end-of-stream, then half-closes `to`.
/// Returns the number of bytes moved.
pub async fn one_way(
    from: &TcpStream,
    to: &TcpStream,
    first: &super::FirstByte,
) -> Result<u64, OneWay> {
    // A pipe that cannot be made is the router's own failure; it is charged to the source.
    let mut pipe = Pipe::new().map_err(OneWay::Read)?;
    let mut total = 0u64;
    let mut eof = false;
    // The last read found the pipe full (it counts buffers, not bytes: small segments fill it
    // before PIPE_SIZE bytes do), so only a write can make progress.
    let mut pipe_full = false;
    loop {
        if !eof && !pipe_full && pipe.pending < PIPE_SIZE as usize {
            let room = PIPE_SIZE as usize - pipe.pending;
            match from.try_io(Interest::READABLE, || {
                match splice(from.as_raw_fd(), pipe.write.as_raw_fd(), room) {
                    // EAGAIN with bytes waiting in the socket means the pipe is full, not the
                    // socket empty: that must not clear the socket's readiness, or the next
                    // read waits for an edge that a sender stopped by a full window never
                    // makes.
                    Err(e)
                        if e.kind() == io::ErrorKind::WouldBlock
                            && pipe.pending > 0
                            && unread(from.as_raw_fd()) > 0 =>
                    {
                        Err(io::Error::other(PipeFull))
                    }
                    other => other,
                }
            }) {
                Ok(0) => eof = true,
                Ok(n) => pipe.pending += n,
                Err(e) if e.get_ref().is_some_and(|e| e.is::<PipeFull>()) => pipe_full = true,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    // The socket is empty (a full pipe is `PipeFull`, above).
                    if pipe.pending == 0 {
                        from.readable().await.map_err(OneWay::Read)?;
                        continue;
                    }
                }
                Err(e) => return Err(OneWay::Read(e)),
            }
        }
        if pipe.pending > 0 {
            match to.try_io(Interest::WRITABLE, || {
                splice(pipe.read.as_raw_fd(), to.as_raw_fd(), pipe.pending)
            }) {
                Ok(n) => {
                    pipe.pending -= n;
                    total += n as u64;
                    pipe_full &= n == 0;
                    if n > 0 {
                        super::first_byte(first);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    // Wait for whichever comes first: room to write, or more to read. With the
                    // pipe full, only room to write will do: a source whose peer has
                    // half-closed stays readable (tokio keeps read-closed readiness), so
                    // waiting on it as well would spin.
                    if eof || pipe_full || pipe.pending >= PIPE_SIZE as usize {
                        to.writable().await.map_err(OneWay::Write)?;
                    } else {
                        tokio::select! {
                            r = to.writable() => r.map_err(OneWay::Write)?,
                            r = from.readable() => r.map_err(OneWay::Read)?,
                        }
                    }
                }
                Err(e) => return Err(OneWay::Write(e)),
            }
        } else if eof {
            shutdown_write(to);
            return Ok(total);
        }
    }
}

/// The pipe had no room for what the socket holds.
#[derive(Debug, thiserror::Error)]
#[error("pipe full")]
struct PipeFull;

/// Bytes waiting in socket `fd`'s receive queue (FIONREAD); 0 when it cannot tell.
fn unread(fd: RawFd) -> usize {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int to `n`.
    let r = unsafe { libc::ioctl(fd, libc::FIONREAD, &raw mut n) };
    if r == 0 {
        usize::try_from(n).unwrap_or(0)
    } else {
        0
    }
}

/// Half-closes `socket`: the peer reads end-of-stream, and the other direction stays open.
pub fn shutdown_write(socket: &TcpStream) {
    // SAFETY: shutdown on a socket we borrow; it only affects the write direction.
    unsafe { libc::shutdown(socket.as_raw_fd(), libc::SHUT_WR) };
}
