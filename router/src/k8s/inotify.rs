//! Directories made and removed under watched directories (inotify), as a tokio stream of
//! events: how pod directories are seen the moment the kubelet makes them, without looking
//! at the file system again and again.

use std::{
    collections::HashMap,
    ffi::{CString, OsStr},
    io,
    os::{
        fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
        unix::ffi::OsStrExt as _,
    },
    path::{Path, PathBuf},
};

use tokio::io::unix::AsyncFd;

/// A change inotify reported.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DirEvent {
    /// A directory was made at this path.
    Created(PathBuf),
    /// A directory at this path was removed.
    Removed(PathBuf),
    /// The kernel's queue overflowed: events were lost, look again at everything.
    Overflow,
}

/// Watches on directories for subdirectories coming and going.
#[derive(Debug)]
pub struct DirWatch {
    fd: AsyncFd<OwnedFd>,
    /// Watch descriptor -> the directory it watches.
    dirs: HashMap<i32, PathBuf>,
}

impl DirWatch {
    /// A new inotify instance with no watches.
    ///
    /// # Errors
    /// When the kernel refuses one (the per-user instance limit).
    pub fn new() -> io::Result<Self> {
        // SAFETY: plain inotify_init1; the descriptor is owned at once.
        let raw = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a new descriptor nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: an OwnedFd's descriptor stays open and the same until it is dropped, which
        // happens only with the AsyncFd.
        let fd = unsafe { AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) }
            .map_err(io::Error::from)?;
        Ok(Self {
            fd,
            dirs: HashMap::new(),
        })
    }

    /// Watches `dir` for subdirectories made and removed (again: a no-op).
    ///
    /// # Errors
    /// When it does not exist, is not a directory, or the watch limit is reached.
    pub fn add(&mut self, dir: &Path) -> io::Result<()> {
        let path = CString::new(dir.as_os_str().as_bytes())
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        let mask = libc::IN_CREATE | libc::IN_DELETE | libc::IN_ONLYDIR;
        // SAFETY: a valid descriptor and a NUL-terminated path.
        let wd = unsafe { libc::inotify_add_watch(self.fd.as_raw_fd(), path.as_ptr(), mask) };
        if wd < 0 {
            return Err(io::Error::last_os_error());
        }
        self.dirs.insert(wd, dir.to_owned());
        Ok(())
    }

    /// Whether `dir` is watched.
    #[must_use]
    pub fn watches(&self, dir: &Path) -> bool {
        self.dirs.values().any(|d| d == dir)
    }

    /// Waits for the next events and returns them (directories only; a watched directory
    /// that goes away just ends its watch).
    ///
    /// # Errors
    /// When reading fails.
    pub async fn next(&mut self) -> io::Result<Vec<DirEvent>> {
        // Room for many events: each is 16 bytes plus a name of up to NAME_MAX + 1.
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let mut guard = self.fd.readable().await?;
            // SAFETY: reads into a buffer of this size from the descriptor this value owns.
            let n = unsafe {
                libc::read(
                    self.fd.get_ref().as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::WouldBlock {
                    guard.clear_ready();
                    continue;
                }
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            let n = usize::try_from(n).unwrap_or(0);
            let events = self.decode(&buf[..n]);
            if !events.is_empty() {
                return Ok(events);
            }
        }
    }

    /// Turns the kernel's records into events, forgetting watches that ended.
    fn decode(&mut self, mut bytes: &[u8]) -> Vec<DirEvent> {
        const HEADER: usize = size_of::<libc::inotify_event>();
        let mut out = Vec::new();
        while bytes.len() >= HEADER {
            // SAFETY: at least HEADER bytes; inotify_event is plain integers, read unaligned.
            let event: libc::inotify_event =
                unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) };
            let len = event.len as usize;
            let Some(name) = bytes.get(HEADER..HEADER + len) else {
                break;
            };
            bytes = &bytes[HEADER + len..];
            if event.mask & libc::IN_Q_OVERFLOW != 0 {
                out.push(DirEvent::Overflow);
                continue;
            }
            if event.mask & libc::IN_IGNORED != 0 {
                self.dirs.remove(&event.wd);
                continue;
            }
            if event.mask & libc::IN_ISDIR == 0 {
                continue;
            }
            let Some(dir) = self.dirs.get(&event.wd) else {
                continue;
            };
            // The name is NUL-padded to its record's length.
            let name = name.split(|b| *b == 0).next().unwrap_or_default();
            let path = dir.join(OsStr::from_bytes(name));
            if event.mask & libc::IN_CREATE != 0 {
                out.push(DirEvent::Created(path));
            } else if event.mask & libc::IN_DELETE != 0 {
                out.push(DirEvent::Removed(path));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn directories_made_and_removed_are_reported() {
        let dir = kernel_tests::TempDir::new("inotify").expect("temp dir");
        let mut watch = DirWatch::new().expect("inotify");
        watch.add(dir.path()).expect("watch");
        assert!(watch.watches(dir.path()));
        let sub = dir.path().join("pod1");
        std::fs::create_dir(&sub).expect("mkdir");
        std::fs::write(dir.path().join("a-file"), b"x").expect("write");
        assert_eq!(
            watch.next().await.expect("events"),
            vec![DirEvent::Created(sub.clone())],
            "files are not reported"
        );
        std::fs::remove_dir(&sub).expect("rmdir");
        assert_eq!(
            watch.next().await.expect("events"),
            vec![DirEvent::Removed(sub)]
        );
    }
}
