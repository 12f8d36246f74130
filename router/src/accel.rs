//! Userspace side of skiff's socket-redirection programs: load, attach, and typed map access.
//!
//! The programs (`ebpf/src/sock_ops.rs`, `ebpf/src/sk_msg.rs`) are embedded in this binary at
//! build time. [`Accel::attach`] loads them, attaches sk_msg to the sockhash and sock_ops to a
//! cgroup, and from then on every TCP connection in that cgroup that involves a registered
//! endpoint ([`Accel::add_endpoint`]) moves its bytes socket to socket inside the kernel.
//! Dropping the [`Accel`] detaches both programs and frees the maps.
//!
//! When a pin directory is given (bpffs, one directory per site), the maps and the sock_ops
//! link are pinned there so that `bpftool` can see them while the router runs; the directory is
//! emptied and removed on drop, and a directory left by a crashed router is cleared before
//! loading, which also detaches the crashed router's sock_ops program.

mod backpressure;
pub(crate) mod btf;
mod own;
mod shortcut;
mod sock_diag;

use std::{
    fs::File,
    io,
    net::{IpAddr, SocketAddr},
    os::fd::{AsFd as _, AsRawFd as _, RawFd},
    path::{Path, PathBuf},
    sync::Arc,
};

pub use backpressure::{Backpressure, Inflow, Outflow, Stats as BackpressureStats, queue_limit};
pub use ebpf_common::EndpointKind;
pub use own::{OwnSockets, Registered};
pub use shortcut::Bypass;

use crate::programs::{LoadError, ObjectError, Programs};

use aya::{
    maps::{HashMap, MapData, MapError, PerCpuArray, SockHash},
    programs::{
        CgroupAttachMode, ProgramError, SkMsg, SockOps,
        links::{FdLink, PinnedLink},
        sk_msg::SkMsgLink,
        sock_ops::SockOpsLink,
    },
};
use ebpf_common::{
    COUNTERS_MAP, Counter, DIVERTED_MAP, ENDPOINTS_MAP, EndpointKey, ROUTER_SOCKETS_MAP, SENT_MAP,
    SHORTCUTS_MAP, SK_MSG_PROGRAM, SOCK_ADDRS_MAP, SOCK_OPS_PROGRAM, SOCKS_MAP, SockKey,
};

/// The cookie of the network namespace `fd` lives in, as `bpf_get_netns_cookie` sees it.
///
/// # Errors
/// On kernels before 5.14, which cannot tell it, or when `fd` is not a socket.
pub fn netns_cookie(fd: RawFd) -> io::Result<u64> {
    socket_u64(fd, libc::SO_NETNS_COOKIE)
}

/// The cookie of this process's network namespace (see [`netns_cookie`]).
///
/// # Errors
/// On kernels before 5.14, which cannot tell it.
pub fn own_netns_cookie() -> io::Result<u64> {
    let socket = std::net::UdpSocket::bind((std::net::Ipv4Addr::LOCALHOST, 0))?;
    netns_cookie(socket.as_raw_fd())
}

/// The local and remote addresses of connected socket `fd`.
fn socket_ends(fd: std::os::fd::BorrowedFd<'_>) -> Option<(SocketAddr, SocketAddr)> {
    let socket = socket2::SockRef::from(&fd);
    let local = socket.local_addr().ok()?.as_socket()?;
    let peer = socket.peer_addr().ok()?.as_socket()?;
    Some((local, peer))
}

/// The cookie of socket `fd`, as `bpf_get_socket_cookie` sees it.
///
/// # Errors
/// When `fd` is not a socket.
pub fn socket_cookie(fd: RawFd) -> io::Result<u64> {
    socket_u64(fd, libc::SO_COOKIE)
}

/// A `u64` socket option at `SOL_SOCKET`.
fn socket_u64(fd: RawFd, option: libc::c_int) -> io::Result<u64> {
    let mut value = 0u64;
    let mut len = size_of::<u64>() as libc::socklen_t;
    // SAFETY: the kernel writes at most `len` bytes through the pointer, which is valid for it.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            option,
            (&raw mut value).cast(),
            &raw mut len,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(value)
}

/// Failure to set up or drive the socket-redirection programs.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error("the kernel cannot tell this network namespace's cookie (SO_NETNS_COOKIE, Linux 5.14)")]
    Netns,
    #[error(transparent)]
    Object(#[from] ObjectError),
    #[error("failed to open cgroup {}", path.display())]
    Cgroup {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("failed to pin {} under bpffs", path.display())]
    Pin {
        path: PathBuf,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("failed to clear leftover pins in {}", path.display())]
    Cleanup {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// File name of the pinned sock_ops link inside the pin directory.
const SOCK_OPS_LINK_PIN: &str = "sock_ops_link";

impl Error {
    fn map(name: &'static str) -> impl FnOnce(MapError) -> Self {
        move |source| Self::Object(ObjectError::map(name)(source))
    }

    fn program(name: &'static str) -> impl FnOnce(ProgramError) -> Self {
        move |source| Self::Object(ObjectError::program(name)(source))
    }
}

/// Loaded and attached socket-redirection programs and their maps.
pub struct Accel {
    // Dropped in this order: sock_ops stops inserting sockets, then sk_msg leaves the map.
    _sock_ops: Option<SockOpsLink>,
    pins: Option<Pins>,
    _sk_msg: SkMsgLink,
    socks: SockHash<MapData, SockKey>,
    endpoints: HashMap<MapData, EndpointKey, u32>,
    counters: PerCpuArray<MapData, u64>,
    backpressure: Arc<Backpressure>,
    own: Arc<OwnSockets>,
}

impl std::fmt::Debug for Accel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Accel").finish_non_exhaustive()
    }
}

/// A snapshot of the programs' counters, summed over CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    pub socks_inserted: u64,
    pub socks_insert_failed: u64,
    pub msg_redirected: u64,
    pub bytes_redirected: u64,
    pub msg_missed: u64,
    pub msg_diverted: u64,
    pub msg_shortcut: u64,
    pub bytes_shortcut: u64,
    pub shortcut_over_budget: u64,
    pub shortcut_behind: u64,
    /// Sockets of a registered endpoint left out because the router is at neither end.
    pub socks_foreign: u64,
    /// Senders sk_msg diverted itself, at the queue limit.
    pub senders_diverted: u64,
    /// Diverted senders sk_msg took back onto redirection, their TCP path drained.
    pub senders_returned: u64,
    /// Senders sk_msg diverted while TCP's memory was past `tcp_mem`'s low mark.
    pub senders_under_pressure: u64,
    /// What the router's flow control for redirected sockets did.
    pub backpressure: BackpressureStats,
}

impl Accel {
    /// Loads the programs and attaches them to the cgroup (v2) directory at `cgroup`, pinning
    /// maps and the sock_ops link under `pin_dir` when given.
    ///
    /// # Errors
    /// Fails without CAP_BPF and CAP_NET_ADMIN, when the kernel lacks sock_ops or sk_msg, when
    /// `cgroup` is not a cgroup v2 directory, or when pinning fails.
    pub fn attach(cgroup: &Path, pin_dir: Option<&Path>) -> Result<Self, Error> {
        Self::attach_to(&mut Programs::load()?, cgroup, pin_dir)
    }

    /// [`Accel::attach`], taking only the sockets of the network namespace whose cookie is
    /// `netns` (the router's own, for a router; the test's, in the kernel tests).
    ///
    /// # Errors
    /// As [`Accel::attach`].
    pub fn attach_for(cgroup: &Path, pin_dir: Option<&Path>, netns: u64) -> Result<Self, Error> {
        Self::attach_to(&mut Programs::load_for(Some(netns))?, cgroup, pin_dir)
    }

    /// Takes the socket-redirection maps and programs from `programs` (loaded once for
    /// acceleration and isolation) and attaches them to `cgroup`.
    ///
    /// # Errors
    /// As [`Accel::attach`]; also when `programs` were loaded without a network namespace
    /// cookie (kernels before 5.14 cannot tell namespaces apart, so acceleration does not
    /// start there).
    pub fn attach_to(
        programs: &mut Programs,
        cgroup: &Path,
        pin_dir: Option<&Path>,
    ) -> Result<Self, Error> {
        if programs.netns().is_none() {
            return Err(Error::Netns);
        }
        if let Some(dir) = pin_dir {
            clear_pins(dir)?;
            std::fs::create_dir_all(dir).map_err(|source| Error::Cleanup {
                path: dir.to_owned(),
                source,
            })?;
        }
        // From here on, a failure removes whatever was pinned.
        let mut pins = pin_dir.map(|dir| Pins {
            dir: dir.to_owned(),
            link: None,
            keeper: false,
        });
        let shortcuts = programs.shortcuts();
        if let Some(pins) = &pins {
            for name in [
                SOCKS_MAP,
                ENDPOINTS_MAP,
                COUNTERS_MAP,
                DIVERTED_MAP,
                SENT_MAP,
                SOCK_ADDRS_MAP,
                SHORTCUTS_MAP,
            ] {
                let map = programs
                    .ebpf
                    .map(name)
                    .ok_or(ObjectError::Missing { kind: "map", name })?;
                let path = pins.dir.join(name);
                map.pin(&path).map_err(|e| Error::Pin {
                    path,
                    source: Box::new(e),
                })?;
            }
        }
        let socks: SockHash<MapData, SockKey> = programs.take_map(SOCKS_MAP)?;
        let endpoints = programs.take_map(ENDPOINTS_MAP)?;
        let counters = programs.take_map(COUNTERS_MAP)?;
        let own = Arc::new(OwnSockets::new(programs.take_map(ROUTER_SOCKETS_MAP)?));
        let backpressure = Arc::new(Backpressure::new(
            programs.take_map(DIVERTED_MAP)?,
            programs.take_map(SENT_MAP)?,
            programs.take_map(SHORTCUTS_MAP)?,
            shortcuts,
        ));

        // sk_msg first: a socket picks up the map's programs when it is inserted, so the
        // verdict program must be there before sock_ops starts inserting.
        let sk_msg: &mut SkMsg = programs.program(SK_MSG_PROGRAM)?;
        sk_msg.load().map_err(Error::program(SK_MSG_PROGRAM))?;
        let sk_msg_link = sk_msg
            .attach(socks.fd())
            .and_then(|id| sk_msg.take_link(id))
            .map_err(Error::program(SK_MSG_PROGRAM))?;

        let cgroup_dir = File::open(cgroup).map_err(|source| Error::Cgroup {
            path: cgroup.to_owned(),
            source,
        })?;
        let sock_ops: &mut SockOps = programs.program(SOCK_OPS_PROGRAM)?;
        sock_ops.load().map_err(Error::program(SOCK_OPS_PROGRAM))?;
        let sock_ops_link = sock_ops
            .attach(cgroup_dir.as_fd(), CgroupAttachMode::Single)
            .and_then(|id| sock_ops.take_link(id))
            .map_err(Error::program(SOCK_OPS_PROGRAM))?;
        // Pinned, the link is the pin's to detach (see `Pins`); otherwise it is ours.
        let sock_ops_link = match &mut pins {
            Some(pins) => {
                let path = pins.dir.join(SOCK_OPS_LINK_PIN);
                let fd_link = FdLink::try_from(sock_ops_link).map_err(|e| Error::Pin {
                    path: path.clone(),
                    source: Box::new(e),
                })?;
                pins.link = Some(fd_link.pin(&path).map_err(|e| Error::Pin {
                    path,
                    source: Box::new(e),
                })?);
                None
            }
            None => Some(sock_ops_link),
        };

        Ok(Self {
            _sock_ops: sock_ops_link,
            pins,
            _sk_msg: sk_msg_link,
            socks,
            endpoints,
            counters,
            backpressure,
            own,
        })
    }

    /// Leaves removing the pins to a keeper process ([`crate::privilege::keep_pins`]): a
    /// router that has given up root may not unlink them. Until the keeper does, the pinned
    /// sock_ops link stays attached and the pinned maps stay alive.
    pub fn leave_pins_to_keeper(&mut self) {
        if let Some(pins) = &mut self.pins {
            pins.keeper = true;
        }
    }

    /// The flow control the data path applies to accelerated sockets.
    #[must_use]
    pub fn backpressure(&self) -> Arc<Backpressure> {
        Arc::clone(&self.backpressure)
    }

    /// Where the router registers its sockets towards backends before connecting them.
    #[must_use]
    pub fn own_sockets(&self) -> Arc<OwnSockets> {
        Arc::clone(&self.own)
    }

    /// The pin directory, if the objects are pinned.
    #[must_use]
    pub fn pin_dir(&self) -> Option<&Path> {
        self.pins.as_ref().map(|p| p.dir.as_path())
    }

    /// Accelerates connections to and from `addr` (unspecified IP: every local address).
    ///
    /// # Errors
    /// Fails when the endpoint map is full.
    pub fn add_endpoint(&mut self, addr: SocketAddr, kind: EndpointKind) -> Result<(), Error> {
        self.endpoints
            .insert(endpoint_key(addr), kind as u32, 0)
            .map_err(Error::map(ENDPOINTS_MAP))
    }

    /// Stops accelerating new connections of `addr`; established ones keep their shortcut.
    ///
    /// # Errors
    /// Fails when `addr` was not registered.
    pub fn remove_endpoint(&mut self, addr: SocketAddr) -> Result<(), Error> {
        self.endpoints
            .remove(&endpoint_key(addr))
            .map_err(Error::map(ENDPOINTS_MAP))
    }

    /// Number of sockets currently in the sockhash.
    ///
    /// # Errors
    /// Fails when the map cannot be read.
    pub fn socks_len(&self) -> Result<usize, Error> {
        let mut n = 0;
        for key in self.socks.keys() {
            key.map_err(Error::map(SOCKS_MAP))?;
            n += 1;
        }
        Ok(n)
    }

    /// The programs' counters, summed over CPUs.
    ///
    /// # Errors
    /// Fails when the counter map cannot be read.
    pub fn counters(&self) -> Result<Counters, Error> {
        let read = |counter: Counter| -> Result<u64, Error> {
            let per_cpu = self
                .counters
                .get(&(counter as u32), 0)
                .map_err(Error::map(COUNTERS_MAP))?;
            Ok(per_cpu.iter().sum())
        };
        Ok(Counters {
            socks_inserted: read(Counter::SocksInserted)?,
            socks_insert_failed: read(Counter::SocksInsertFailed)?,
            msg_redirected: read(Counter::MsgRedirected)?,
            bytes_redirected: read(Counter::BytesRedirected)?,
            msg_missed: read(Counter::MsgMissed)?,
            msg_diverted: read(Counter::MsgDiverted)?,
            msg_shortcut: read(Counter::MsgShortcut)?,
            bytes_shortcut: read(Counter::BytesShortcut)?,
            shortcut_over_budget: read(Counter::ShortcutOverBudget)?,
            shortcut_behind: read(Counter::ShortcutBehind)?,
            socks_foreign: read(Counter::SocksForeign)?,
            senders_diverted: read(Counter::SendersDiverted)?,
            senders_returned: read(Counter::SendersReturned)?,
            senders_under_pressure: read(Counter::SendersUnderPressure)?,
            backpressure: self.backpressure.stats(),
        })
    }
}

/// What is pinned for one site; removed on drop, which detaches the sock_ops program, unless
/// a keeper process removes them (see [`Accel::leave_pins_to_keeper`]).
#[derive(Debug)]
struct Pins {
    dir: PathBuf,
    link: Option<PinnedLink>,
    keeper: bool,
}

impl Drop for Pins {
    fn drop(&mut self) {
        if self.keeper {
            // The pinned link stays attached until the keeper unlinks it.
            return;
        }
        if let Some(link) = self.link.take() {
            // Unpinning hands back the FdLink; dropping it detaches the program.
            drop(link.unpin());
        }
        remove_pins(&self.dir);
    }
}

/// Removes a site's pin directory and what is pinned in it, and the shared `<bpffs>/skiff`
/// directory once the last site's pins are gone (while other sites still pin there, that
/// fails harmlessly). Removing the pinned sock_ops link detaches the program once no process
/// holds it open. Failures are logged: the next router start of the site removes leftovers.
pub fn remove_pins(dir: &Path) {
    if let Err(e) = clear_pins(dir) {
        tracing::warn!(error = %e, "failed to remove pinned eBPF objects");
    }
    if let Some(parent) = dir.parent() {
        let _ = std::fs::remove_dir(parent);
    }
}

/// Removes a pin directory and everything pinned in it (a bpffs directory holds only pins).
fn clear_pins(dir: &Path) -> Result<(), Error> {
    let cleanup = |source| Error::Cleanup {
        path: dir.to_owned(),
        source,
    };
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(cleanup(e)),
    };
    for entry in entries {
        let entry = entry.map_err(cleanup)?;
        std::fs::remove_file(entry.path()).map_err(cleanup)?;
    }
    std::fs::remove_dir(dir).map_err(cleanup)
}

/// The bpffs mount point, from /proc/mounts, if bpffs is mounted.
#[must_use]
pub fn bpffs_mount() -> Option<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/mounts").ok()?;
    mounts.lines().find_map(|line| {
        let mut fields = line.split_whitespace();
        let (_, dir, fstype) = (fields.next()?, fields.next()?, fields.next()?);
        (fstype == "bpf").then(|| PathBuf::from(dir))
    })
}

/// The endpoint key for `addr`: IPv4 as v4-mapped, octets in network order.
#[must_use]
pub fn endpoint_key(addr: SocketAddr) -> EndpointKey {
    let v6 = match addr.ip() {
        IpAddr::V4(v4) if v4.is_unspecified() => std::net::Ipv6Addr::UNSPECIFIED,
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    };
    let octets = v6.octets();
    let mut ip = [0u32; 4];
    for (word, chunk) in ip.iter_mut().zip(octets.chunks_exact(4)) {
        *word = u32::from_ne_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
    }
    EndpointKey {
        ip,
        port: u32::from(addr.port()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_keys_of_v4_and_mapped_v6_agree() {
        let v4: SocketAddr = "127.0.0.1:7000".parse().expect("valid address");
        let mapped: SocketAddr = "[::ffff:127.0.0.1]:7000".parse().expect("valid address");
        assert_eq!(endpoint_key(v4), endpoint_key(mapped));
        assert_eq!(
            endpoint_key(v4).ip,
            ebpf_common::v4_mapped(u32::from_ne_bytes([127, 0, 0, 1]))
        );
    }

    #[test]
    fn unspecified_addresses_match_any_ip() {
        for addr in ["0.0.0.0:80", "[::]:80"] {
            let key = endpoint_key(addr.parse().expect("valid address"));
            assert_eq!(key.ip, ebpf_common::ANY_IP);
            assert_eq!(key.port, 80);
        }
    }
}
