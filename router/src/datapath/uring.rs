//! The io_uring backend of the data path: one worker thread per core, each with its own ring
//! (single issuer, deferred task running where the kernel has them) and its own buffers.
//!
//! What runs here today: local hops between plain TCP sockets ([`Uring::proxy`]), moved by
//! multishot recv into provided buffers and batched sendmsg (see [`worker`]). Connections
//! are spread over the workers in turn. Link streams and TLS ends still run on the epoll
//! backend; docs/architecture.md says what is planned.

mod bufring;
mod worker;

use std::{
    io,
    os::fd::{FromRawFd as _, OwnedFd},
    sync::{
        atomic::{AtomicUsize, Ordering},
        mpsc,
    },
};

use tokio::net::TcpStream;

use super::{Failure, Outcome, Side};
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
}

#[derive(Debug)]
struct Handle {
    jobs: mpsc::Sender<Msg>,
    wake: OwnedFd,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Handle {
    fn send(&self, msg: Msg) -> bool {
        let sent = self.jobs.send(msg).is_ok();
        let one = 1u64.to_ne_bytes();
        // SAFETY: writes 8 bytes from `one` to an eventfd we own.
        unsafe {
            libc::write(
                std::os::fd::AsRawFd::as_raw_fd(&self.wake),
                one.as_ptr().cast(),
                one.len(),
            )
        };
        sent
    }
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
        for index in 0..workers.max(1) {
            match spawn(index) {
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
        })
    }

    /// Connections handed to the workers so far.
    #[must_use]
    pub fn connections(&self) -> u64 {
        self.connections.load(Ordering::Relaxed)
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
fn spawn(index: usize) -> Result<(Handle, String), Unavailable> {
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
            match Worker::new(ring, worker_wake, rx) {
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
                wake,
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
