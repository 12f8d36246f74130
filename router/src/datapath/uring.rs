//! The io_uring backend of the data path: one worker thread per core, each with its own ring
//! (single issuer, deferred task running where the kernel has them) and its own buffers.
//!
//! What runs here: local hops between plain TCP sockets ([`Uring::proxy`]), moved by
//! multishot recv into provided buffers and batched sendmsg (see [`worker`]); link
//! connections, whose records the worker opens and seals itself ([`Uring::carry`], see
//! [`carrier`]); and the streams on them whose other end is a plain TCP socket
//! ([`Uring::relay`]), served by the worker that carries their link. Connections and links are
//! spread over the workers in turn. TLS ends and accelerated sockets run on the epoll backend.

mod bufring;
mod carrier;
mod worker;

use std::{
    io,
    os::fd::{FromRawFd as _, OwnedFd},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
        mpsc,
    },
};

use tokio::net::TcpStream;

use super::{Failure, Outcome, Side};
use crate::link::{
    self, Carried, Link,
    stream::{StreamRx, StreamTx},
};
use worker::{Msg, Worker};

/// The io_uring workers of one router.
#[derive(Debug)]
pub struct Uring {
    workers: Vec<Handle>,
    next: AtomicUsize,
    /// How the rings were set up, for `skiff status`.
    setup: String,
    /// Connections handed to the workers so far.
    connections: std::sync::atomic::AtomicU64,
    /// Link connections carried and streams served so far.
    carried: std::sync::atomic::AtomicU64,
    served: std::sync::atomic::AtomicU64,
    /// Receives that found their worker's buffer ring empty (the workers count them).
    starved: Arc<std::sync::atomic::AtomicU64>,
}

#[derive(Debug)]
struct Handle {
    jobs: mpsc::Sender<Msg>,
    wake: Arc<OwnedFd>,
    /// Set while a wake for the worker's links is pending (see `Worker::woken`).
    woken: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Handle {
    fn send(&self, msg: Msg) -> bool {
        let sent = self.jobs.send(msg).is_ok();
        wake(&self.wake);
        sent
    }

    /// How a carried link wakes this worker: once for any number of frames queued before it
    /// looks.
    fn link_wake(&self, index: usize) -> link::Wake {
        let (fd, woken) = (Arc::clone(&self.wake), Arc::clone(&self.woken));
        link::Wake::new(index, move || {
            if !woken.swap(true, Ordering::AcqRel) {
                wake(&fd);
            }
        })
    }
}

/// Wakes a worker through its eventfd.
fn wake(fd: &OwnedFd) {
    let one = 1u64.to_ne_bytes();
    // SAFETY: writes 8 bytes from `one` to an eventfd the worker owns.
    unsafe {
        libc::write(
            std::os::fd::AsRawFd::as_raw_fd(fd),
            one.as_ptr().cast(),
            one.len(),
        )
    };
}

/// Why io_uring cannot be used here, in one line.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Unavailable(String);

impl Uring {
    /// Starts `workers` worker threads, each checking that its ring works.
    ///
    /// # Errors
    /// When a ring cannot be set up (io_uring disabled by `kernel.io_uring_disabled` or a
    /// seccomp profile, or a kernel without what the workers use).
    pub fn start(workers: usize) -> Result<Self, Unavailable> {
        let mut handles = Vec::new();
        let mut setup = String::new();
        let starved = Arc::new(std::sync::atomic::AtomicU64::new(0));
        for index in 0..workers.max(1) {
            match spawn(index, Arc::clone(&starved)) {
                Ok((handle, label)) => {
                    handles.push(handle);
                    setup = label;
                }
                Err(e) => {
                    drop(Self {
                        workers: handles,
                        next: AtomicUsize::new(0),
                        setup,
                        connections: 0.into(),
                        carried: 0.into(),
                        served: 0.into(),
                        starved,
                    });
                    return Err(e);
                }
            }
        }
        Ok(Self {
            workers: handles,
            next: AtomicUsize::new(0),
            setup,
            connections: 0.into(),
            carried: 0.into(),
            served: 0.into(),
            starved,
        })
    }

    /// Connections handed to the workers so far.
    #[must_use]
    pub fn connections(&self) -> u64 {
        self.connections.load(Ordering::Relaxed)
    }

    /// Receives that found their worker's buffer ring empty, so far: each waits until a
    /// buffer comes back.
    #[must_use]
    pub fn starved(&self) -> u64 {
        self.starved.load(Ordering::Relaxed)
    }

    /// How many workers run, and how their rings were set up.
    #[must_use]
    pub fn describe(&self) -> String {
        format!("{} workers, {}", self.workers.len(), self.setup)
    }

    /// Moves bytes between `client` and `backend` on a worker until both directions end;
    /// each direction half-closes the other side when it ends, a failure closes both with RST.
    pub async fn proxy(&self, client: TcpStream, backend: TcpStream) -> Outcome {
        let (a, b) = match (owned(client), owned(backend)) {
            (Ok(a), Ok(b)) => (a, b),
            (Err(e), _) => return failed(Side::Downstream, &e),
            (_, Err(e)) => return failed(Side::Upstream, &e),
        };
        self.connections.fetch_add(1, Ordering::Relaxed);
        let (done, outcome) = tokio::sync::oneshot::channel();
        let turn = self.next.fetch_add(1, Ordering::Relaxed) % self.workers.len();
        if !self.workers[turn].send(Msg::Proxy { a, b, done }) {
            return failed(Side::Downstream, &io::Error::other("the worker stopped"));
        }
        // A worker that stops drops the connection, and with it the sender.
        outcome
            .await
            .unwrap_or_else(|_| failed(Side::Downstream, &io::Error::other("the worker stopped")))
    }

    /// Whether `link`'s connection is carried here, so that its streams can be served here.
    #[must_use]
    pub fn carries(&self, link: &Link) -> bool {
        link.carrier_worker()
            .is_some_and(|w| w < self.workers.len())
    }

    /// Relays between `conn` (`side` says which kind) and a stream of a link connection the
    /// workers carry, on the worker that carries it, until both directions end.
    pub async fn relay(&self, conn: TcpStream, side: Side, tx: StreamTx, rx: StreamRx) -> Outcome {
        let link = Arc::clone(tx.link());
        let Some(worker) = link.carrier_worker().and_then(|w| self.workers.get(w)) else {
            return failed(side, &io::Error::other("the link is not carried here"));
        };
        let fd = match owned(conn) {
            Ok(fd) => fd,
            Err(e) => return failed(side, &e),
        };
        self.served.fetch_add(1, Ordering::Relaxed);
        let (done, outcome) = tokio::sync::oneshot::channel();
        let relay = carrier::Relay {
            link,
            fd,
            side,
            tx,
            rx,
            done,
        };
        if !worker.send(Msg::Relay(relay)) {
            return failed(side, &io::Error::other("the worker stopped"));
        }
        outcome
            .await
            .unwrap_or_else(|_| failed(side, &io::Error::other("the worker stopped")))
    }

    /// Link connections the workers have carried, and streams they served.
    #[must_use]
    pub fn carried(&self) -> (u64, u64) {
        (
            self.carried.load(Ordering::Relaxed),
            self.served.load(Ordering::Relaxed),
        )
    }
}

impl link::Carrier for Uring {
    fn carry(&self, link: &Arc<Link>, conn: Carried) -> Result<(), Carried> {
        let turn = self.next.fetch_add(1, Ordering::Relaxed) % self.workers.len();
        let worker = &self.workers[turn];
        link.carried_by(worker.link_wake(turn));
        self.carried.fetch_add(1, Ordering::Relaxed);
        let msg = Msg::Carry {
            link: Arc::clone(link),
            carried: conn,
        };
        if let Err(mpsc::SendError(Msg::Carry { carried, .. })) = worker.jobs.send(msg) {
            return Err(carried);
        }
        wake(&worker.wake);
        Ok(())
    }
}

impl Drop for Uring {
    fn drop(&mut self) {
        for worker in &self.workers {
            worker.send(Msg::Stop);
        }
        for worker in &mut self.workers {
            if let Some(thread) = worker.thread.take() {
                let _ = thread.join();
            }
        }
    }
}

/// Starts worker `index`; returns once its ring is set up and checked.
fn spawn(
    index: usize,
    starved: Arc<std::sync::atomic::AtomicU64>,
) -> Result<(Handle, String), Unavailable> {
    // SAFETY: eventfd returns a new descriptor or -1.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
    if fd < 0 {
        return Err(Unavailable(format!(
            "eventfd: {}",
            io::Error::last_os_error()
        )));
    }
    // SAFETY: fd is a new descriptor nothing else owns.
    let wake = unsafe { OwnedFd::from_raw_fd(fd) };
    let (jobs, rx) = mpsc::channel();
    let (ready_tx, ready) = mpsc::channel();
    let worker_wake = wake.try_clone().map_err(|e| Unavailable(e.to_string()))?;
    let woken = Arc::new(AtomicBool::new(false));
    let worker_woken = Arc::clone(&woken);
    let thread = std::thread::Builder::new()
        .name(format!("skiff-uring-{index}"))
        .spawn(move || {
            let mut label = String::new();
            let ring = match worker::setup(&mut label) {
                Ok(ring) => ring,
                Err(e) => {
                    let _ = ready_tx.send(Err(why_not(&e)));
                    return;
                }
            };
            match Worker::new(ring, worker_wake, worker_woken, starved, rx) {
                Ok(worker) => {
                    let _ = ready_tx.send(Ok(label));
                    worker.run();
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(format!("io_uring: {e}")));
                }
            }
        })
        .map_err(|e| Unavailable(format!("cannot start an io_uring worker: {e}")))?;
    match ready.recv() {
        Ok(Ok(label)) => Ok((
            Handle {
                jobs,
                wake: Arc::new(wake),
                woken,
                thread: Some(thread),
            },
            label,
        )),
        Ok(Err(reason)) => {
            let _ = thread.join();
            Err(Unavailable(reason))
        }
        Err(_) => {
            let _ = thread.join();
            Err(Unavailable(
                "the io_uring worker ended while starting".into(),
            ))
        }
    }
}

/// Why `io_uring_setup` failed, with the usual cause named.
fn why_not(e: &io::Error) -> String {
    let disabled = std::fs::read_to_string("/proc/sys/kernel/io_uring_disabled")
        .ok()
        .and_then(|v| v.trim().parse::<u8>().ok());
    match (e.raw_os_error(), disabled) {
        (Some(libc::EPERM), Some(level @ 1..)) => {
            format!("io_uring_setup: {e}: kernel.io_uring_disabled is {level}")
        }
        (Some(libc::EPERM | libc::ENOSYS), _) => format!(
            "io_uring_setup: {e}: a seccomp profile may block io_uring (containerd 2.0's default does)"
        ),
        _ => format!("io_uring_setup: {e}"),
    }
}

fn owned(tcp: TcpStream) -> io::Result<OwnedFd> {
    Ok(OwnedFd::from(tcp.into_std()?))
}

fn failed(side: Side, e: &io::Error) -> Outcome {
    Outcome {
        failed: Some(Failure::io(side, e)),
        ..Outcome::default()
    }
}
