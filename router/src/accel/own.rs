//! The router's own sockets towards backends, registered with the programs before connect():
//! sock_ops accelerates a backend's connection only when the connecting socket is one of
//! these, so that no other process's connection to the same backend is redirected.

use std::{
    os::fd::AsRawFd,
    sync::{Arc, Mutex},
};

use aya::maps::{HashMap, MapData};

/// The registry (`SKIFF_ROUTER_SOCKETS`, by socket cookie).
pub struct OwnSockets {
    map: Mutex<HashMap<MapData, u64, u8>>,
}

impl std::fmt::Debug for OwnSockets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OwnSockets").finish_non_exhaustive()
    }
}

/// A registered socket; the entry goes when this is dropped (once connect() has returned,
/// sock_ops has seen the connection established).
#[derive(Debug)]
pub struct Registered {
    sockets: Arc<OwnSockets>,
    cookie: u64,
}

impl OwnSockets {
    pub(super) fn new(map: HashMap<MapData, u64, u8>) -> Self {
        Self {
            map: Mutex::new(map),
        }
    }

    /// Registers `socket` (not yet connected). `None` when it cannot be (the map is full, or
    /// the kernel has no socket cookies): the connection then simply is not accelerated.
    pub fn register(self: &Arc<Self>, socket: &impl AsRawFd) -> Option<Registered> {
        let cookie = super::socket_cookie(socket.as_raw_fd()).ok()?;
        self.map
            .lock()
            .expect("own sockets lock")
            .insert(cookie, 1, 0)
            .inspect_err(|e| tracing::debug!(error = %e, "backend connection not accelerated"))
            .ok()?;
        Some(Registered {
            sockets: Arc::clone(self),
            cookie,
        })
    }
}

impl Drop for Registered {
    fn drop(&mut self) {
        let _ = self
            .sockets
            .map
            .lock()
            .expect("own sockets lock")
            .remove(&self.cookie);
    }
}
