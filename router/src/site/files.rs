//! Writing files where someone else may be watching: nothing skiff writes follows a symlink or
//! uses a name another user could guess, every file it writes is its own (owner and mode
//! set on the file it created, whatever was there before), and a directory that holds keys
//! must belong to the router and be writable by nobody else. One router per state directory,
//! held by a lock.

use std::{
    fs,
    io::{self, Write as _},
    os::{
        fd::AsRawFd as _,
        unix::fs::{
            DirBuilderExt as _, MetadataExt as _, OpenOptionsExt as _, PermissionsExt as _,
        },
    },
    path::{Path, PathBuf},
};

use super::{Error, io_error};

/// Writes `bytes` to `path` through a new temporary file in the same directory, so a reader
/// sees the old content or the new, never a mix. The temporary file has a random name and is
/// created exclusively without following symlinks; it has `mode` from the first byte and is
/// renamed over `path` (which replaces a symlink there instead of following it).
///
/// # Errors
/// When any step fails; the temporary file is removed.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<(), Error> {
    let tmp = temporary_name(path).map_err(io_error(path))?;
    let result = (|| {
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&tmp)?;
        // The umask may have taken bits away; the mode is what the caller asked for.
        file.set_permissions(fs::Permissions::from_mode(mode))?;
        file.write_all(bytes)?;
        file.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result.map_err(io_error(path))
}

/// `.NAME.RANDOM.tmp` beside `path`.
fn temporary_name(path: &Path) -> io::Result<PathBuf> {
    let mut random = [0u8; 12];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut random)
        .map_err(|_| io::Error::other("no randomness for a temporary name"))?;
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no file name"))?;
    Ok(path.with_file_name(format!(
        ".{}.{}.tmp",
        name.to_string_lossy(),
        crate::token::hex(&random)
    )))
}

/// Why a directory is not private enough to hold a site's keys.
#[derive(Debug, thiserror::Error)]
pub enum NotPrivate {
    #[error(
        "state directory {} belongs to uid {owner}, not {expected}: skiff keeps keys only in a directory of the user it runs as",
        dir.display()
    )]
    Owner {
        dir: PathBuf,
        owner: u32,
        expected: u32,
    },
    #[error(
        "state directory {} is writable by others (mode {mode:o}): chmod 700 it, or let skiff create it",
        dir.display()
    )]
    Writable { dir: PathBuf, mode: u32 },
    #[error("state directory {} is not a directory", dir.display())]
    NotDir { dir: PathBuf },
}

/// The effective uid of this process.
#[must_use]
pub fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// Checks that `dir` is a directory owned by `owner` that no one else may write to.
///
/// # Errors
/// When it cannot be read, or is not private.
pub fn check_private(dir: &Path, owner: u32) -> Result<(), Error> {
    let meta = fs::metadata(dir).map_err(io_error(dir))?;
    if !meta.is_dir() {
        return Err(NotPrivate::NotDir {
            dir: dir.to_owned(),
        }
        .into());
    }
    if meta.uid() != owner {
        return Err(NotPrivate::Owner {
            dir: dir.to_owned(),
            owner: meta.uid(),
            expected: owner,
        }
        .into());
    }
    let mode = meta.mode() & 0o7777;
    if mode & 0o022 != 0 {
        return Err(NotPrivate::Writable {
            dir: dir.to_owned(),
            mode,
        }
        .into());
    }
    Ok(())
}

/// Creates `dir` (and missing parents) with mode 0700; an existing one must already be
/// private to this process's user.
///
/// # Errors
/// When it cannot be created, or exists and is not private.
pub fn create_private_dir(dir: &Path) -> Result<(), Error> {
    match fs::symlink_metadata(dir) {
        Ok(_) => check_private(dir, euid()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(io_error(dir))?;
            // The umask may have taken bits away from 0700; none may be added.
            fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(io_error(dir))?;
            check_private(dir, euid())
        }
        Err(e) => Err(io_error(dir)(e)),
    }
}

/// The state directory's lock, held by the one router running on it; released when dropped
/// (or when the process ends, however it ends).
#[derive(Debug)]
pub struct Lock {
    _file: fs::File,
}

/// `STATE/router.lock` is taken by another router.
#[derive(Debug, thiserror::Error)]
#[error(
    "another router is running on {} (pid {pid}): stop it first, or give this one its own --state-dir",
    dir.display()
)]
pub struct Busy {
    pub dir: PathBuf,
    pub pid: String,
}

/// Takes `dir/router.lock` (created 0600, never through a symlink) and writes this process's
/// pid into it.
///
/// # Errors
/// When another process holds it ([`Busy`]), or it cannot be opened.
pub fn lock(dir: &Path) -> Result<Lock, Error> {
    let path = dir.join("router.lock");
    let mut file = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(&path)
        .map_err(io_error(&path))?;
    // SAFETY: flock on a descriptor this function owns.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
            let pid = fs::read_to_string(&path).unwrap_or_default();
            return Err(Busy {
                dir: dir.to_owned(),
                pid: pid.trim().to_owned(),
            }
            .into());
        }
        return Err(io_error(&path)(e));
    }
    let pid = format!("{}\n", std::process::id());
    file.set_len(0)
        .and_then(|()| file.write_all(pid.as_bytes()))
        .map_err(io_error(&path))?;
    Ok(Lock { _file: file })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("skiff-files-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        create_private_dir(&dir).expect("dir");
        dir
    }

    /// The review's redirections: a symlink where the file goes, and one at the old
    /// predictable temporary name. Neither is followed; the file is new, ours, and has the
    /// mode asked for even where a world-readable file stood.
    #[test]
    fn writes_follow_no_symlink_and_leave_a_file_of_our_own() {
        let dir = temp_dir("symlink");
        let victim = dir.join("victim");
        fs::write(&victim, "root's").expect("victim");
        let target = dir.join("token");
        std::os::unix::fs::symlink(&victim, &target).expect("symlink");
        let old_tmp = target.with_extension(format!("tmp{}", std::process::id()));
        std::os::unix::fs::symlink(&victim, &old_tmp).expect("symlink");

        write_atomic(&target, b"secret", 0o600).expect("write");
        assert_eq!(fs::read_to_string(&victim).expect("victim"), "root's");
        let meta = fs::symlink_metadata(&target).expect("target");
        assert!(meta.is_file(), "the symlink was replaced, not followed");
        assert_eq!(meta.mode() & 0o777, 0o600);
        assert_eq!(meta.uid(), euid());

        let open = dir.join("open");
        fs::write(&open, "x").expect("file");
        fs::set_permissions(&open, fs::Permissions::from_mode(0o666)).expect("chmod");
        write_atomic(&open, b"key", 0o600).expect("write");
        assert_eq!(fs::metadata(&open).expect("meta").mode() & 0o777, 0o600);
        let leftovers: Vec<_> = fs::read_dir(&dir)
            .expect("list")
            .filter_map(Result::ok)
            .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
        fs::remove_dir_all(&dir).expect("cleanup");
    }

    #[test]
    fn directories_others_may_write_or_own_are_refused() {
        let dir = temp_dir("private");
        check_private(&dir, euid()).expect("our own 0700 directory");
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o777)).expect("chmod");
        let e = create_private_dir(&dir).expect_err("0777");
        assert!(e.to_string().contains("writable by others"), "{e}");
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o700)).expect("chmod");
        let e = check_private(&dir, euid().wrapping_add(1)).expect_err("another owner");
        assert!(e.to_string().contains("belongs to uid"), "{e}");
        fs::remove_dir_all(&dir).expect("cleanup");
    }

    #[test]
    fn one_lock_per_state_directory() {
        let dir = temp_dir("lock");
        let held = lock(&dir).expect("first");
        let e = lock(&dir).expect_err("second");
        assert!(
            e.to_string()
                .contains(&format!("(pid {})", std::process::id())),
            "{e}"
        );
        drop(held);
        lock(&dir).expect("free again");
        fs::remove_dir_all(&dir).expect("cleanup");
    }
}
