//! Flow records: one per client connection a listener accepted, and one per connection a
//! connector made to its backend, written when the connection ends. The most recent are kept
//! for `skiff flows` (a bounded ring); with `router run --flow-log PATH` each is also a JSON
//! line in PATH (`-`: standard output) for log shippers.

use std::{
    collections::VecDeque,
    io::Write as _,
    os::fd::{AsRawFd as _, BorrowedFd},
    sync::{
        Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{SystemTime, UNIX_EPOCH},
};

use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tracing::warn;

use crate::datapath::Outcome;

/// Flow records kept for `skiff flows`.
pub const RECENT: usize = 1024;
/// Records waiting for the log writer; beyond this, records are counted as lost, not queued.
const LOG_QUEUE: usize = 4096;

/// Which end of the service network a record comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// A client connection a listener accepted.
    Listener,
    /// A connection a connector made to its backend, for a client here or at another site.
    Connector,
}

/// One connection, from start to end.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Flow {
    /// Increasing per router; `skiff flows --follow` asks for those after the last it saw.
    pub id: u64,
    pub role: Role,
    /// Unix milliseconds.
    pub start_ms: u64,
    pub end_ms: u64,
    pub routing_key: String,
    /// The listener or connector.
    pub resource: String,
    /// The client's address (listener records).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client: Option<String>,
    /// The site the client entered at, and the site whose connector served it.
    pub origin: String,
    pub dest: String,
    /// Bytes from the client towards the backend, and back.
    pub bytes_to_backend: u64,
    pub bytes_to_client: u64,
    /// `ok`, or `failed` with the side and cause in `failure`.
    pub outcome: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failure: Option<String>,
    /// The kernel's smoothed round-trip time of the client's (listener) or backend's
    /// (connector) TCP connection, from TCP_INFO at the start.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tcp_rtt_us: Option<u64>,
}

/// A flow that has started: what is known before its outcome.
#[derive(Clone, Debug)]
pub struct Started {
    pub role: Role,
    pub start_ms: u64,
    pub routing_key: String,
    pub resource: String,
    pub client: Option<String>,
    pub origin: String,
    pub dest: String,
    pub tcp_rtt_us: Option<u64>,
}

impl Started {
    /// Now, for `role` at `resource`.
    #[must_use]
    pub fn now(role: Role, routing_key: &str, resource: &str) -> Self {
        Self {
            role,
            start_ms: now_ms(),
            routing_key: routing_key.to_owned(),
            resource: resource.to_owned(),
            client: None,
            origin: String::new(),
            dest: String::new(),
            tcp_rtt_us: None,
        }
    }
}

/// The recent flows, and the log they go to.
#[derive(Debug, Default)]
pub struct Flows {
    recent: Mutex<VecDeque<Flow>>,
    next_id: AtomicU64,
    log: Option<mpsc::Sender<Flow>>,
    lost: AtomicU64,
}

impl Flows {
    /// Flows kept in memory only.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Flows also written to `path` (`-`: standard output), one JSON line each, by a thread of
    /// their own; a line that cannot be written is logged, and the router goes on.
    ///
    /// # Errors
    /// When `path` cannot be opened for appending.
    pub fn with_log(path: &str) -> std::io::Result<Self> {
        let mut out: Box<dyn std::io::Write + Send> = if path == "-" {
            Box::new(std::io::stdout())
        } else {
            Box::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)?,
            )
        };
        let (tx, mut rx) = mpsc::channel::<Flow>(LOG_QUEUE);
        let name = path.to_owned();
        // A thread of its own, not tokio's blocking pool: a runtime that shuts down waits for
        // its blocking tasks, and this one ends only when the last record sender goes.
        std::thread::Builder::new()
            .name("skiff-flow-log".into())
            .spawn(move || {
                while let Some(flow) = rx.blocking_recv() {
                    let mut line = serde_json::to_vec(&flow).unwrap_or_default();
                    line.push(b'\n');
                    if let Err(e) = out.write_all(&line).and_then(|()| out.flush()) {
                        warn!(path = name, error = %e, "failed to write a flow record");
                    }
                }
            })?;
        Ok(Self {
            log: Some(tx),
            ..Self::default()
        })
    }

    /// Records how `started` ended.
    pub fn end(&self, started: Started, outcome: &Outcome, client_socket: bool) {
        let (to_backend, to_client) = if client_socket {
            (outcome.bytes_out, outcome.bytes_in)
        } else {
            (outcome.bytes_in, outcome.bytes_out)
        };
        let flow = Flow {
            id: self.next_id.fetch_add(1, Ordering::Relaxed) + 1,
            role: started.role,
            start_ms: started.start_ms,
            end_ms: now_ms(),
            routing_key: started.routing_key,
            resource: started.resource,
            client: started.client,
            origin: started.origin,
            dest: started.dest,
            bytes_to_backend: to_backend,
            bytes_to_client: to_client,
            outcome: if outcome.failed.is_some() {
                "failed"
            } else {
                "ok"
            }
            .to_owned(),
            failure: outcome.failed.map(|f| f.to_string()),
            tcp_rtt_us: started.tcp_rtt_us,
        };
        if let Some(log) = &self.log
            && log.try_send(flow.clone()).is_err()
        {
            self.lost.fetch_add(1, Ordering::Relaxed);
        }
        let mut recent = self.recent.lock().expect("flows lock");
        if recent.len() == RECENT {
            recent.pop_front();
        }
        recent.push_back(flow);
    }

    /// The recent flows after id `since`, oldest first.
    #[must_use]
    pub fn since(&self, since: u64) -> Vec<Flow> {
        self.recent
            .lock()
            .expect("flows lock")
            .iter()
            .filter(|f| f.id > since)
            .cloned()
            .collect()
    }

    /// Records the log writer could not take (it fell behind).
    #[must_use]
    pub fn lost(&self) -> u64 {
        self.lost.load(Ordering::Relaxed)
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// The kernel's smoothed round-trip time of TCP socket `fd` (TCP_INFO), in microseconds.
#[must_use]
pub fn tcp_rtt_us(fd: BorrowedFd<'_>) -> Option<u64> {
    // SAFETY: tcp_info is plain data; getsockopt writes at most `len` bytes into it.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = libc::socklen_t::try_from(size_of::<libc::tcp_info>()).ok()?;
    // SAFETY: `fd` is a valid socket for the call; `info` and `len` are valid for writes.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&raw mut info).cast(),
            &raw mut len,
        )
    };
    (rc == 0 && info.tcpi_rtt > 0).then(|| u64::from(info.tcpi_rtt))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datapath::{Failure, Side};

    #[test]
    fn the_ring_keeps_the_most_recent_and_answers_after_an_id() {
        let flows = Flows::new();
        for _ in 0..RECENT + 10 {
            let started = Started::now(Role::Listener, "web", "web-in");
            flows.end(started, &Outcome::default(), true);
        }
        let all = flows.since(0);
        assert_eq!(all.len(), RECENT);
        assert_eq!(all[0].id, 11, "the oldest ten went");
        let later = flows.since(all[RECENT - 3].id);
        assert_eq!(later.len(), 2);
    }

    #[test]
    fn bytes_and_failures_are_told_from_the_clients_side() {
        let flows = Flows::new();
        let outcome = Outcome {
            bytes_out: 7,
            bytes_in: 3,
            failed: Some(Failure::io(
                Side::Upstream,
                &std::io::Error::from(std::io::ErrorKind::ConnectionReset),
            )),
            first_response: None,
        };
        flows.end(Started::now(Role::Connector, "web", "web"), &outcome, false);
        let flow = &flows.since(0)[0];
        assert_eq!((flow.bytes_to_backend, flow.bytes_to_client), (3, 7));
        assert_eq!(flow.outcome, "failed");
        assert_eq!(flow.failure.as_deref(), Some("upstream: connection reset"));
    }
}
