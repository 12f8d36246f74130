//! The router's limit on open files. Every connection it relays holds at least two sockets,
//! and a process starts with the soft limit its parent had: 1024 under systemd's defaults and
//! under a kernel's own init, where a burst of short connections ran the router out of
//! descriptors (EMFILE on the backend's connect, the client reset; seen in the VM matrix's
//! guests). The hard limit is what an administrator allows; the soft one is the process's own
//! choice, so the router raises it to the hard limit at start, as servers that hold many
//! sockets do, and says what it has.

/// Below this many open files the router warns at start: about half as many concurrent
/// connections.
pub const LOW: u64 = 16_384;

/// Raises the soft limit on open files to the hard limit; returns both as they are after.
///
/// # Errors
/// When the limits cannot be read or set.
pub fn raise() -> std::io::Result<(u64, u64)> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit into the struct it is given.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &raw mut limit) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    if limit.rlim_cur < limit.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: limit.rlim_max,
            rlim_max: limit.rlim_max,
        };
        // SAFETY: setrlimit reads one rlimit; raising the soft limit up to the hard one needs
        // no privilege.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raw const raised) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        limit = raised;
    }
    Ok((limit.rlim_cur, limit.rlim_max))
}

#[cfg(test)]
mod tests {
    /// In a child process, so that no other test of this binary runs with a lowered limit:
    /// a soft limit below the hard one (as a process under systemd starts) rises to it.
    #[test]
    fn the_soft_limit_on_open_files_rises_to_the_hard_one() {
        // SAFETY: the child calls only getrlimit, setrlimit and _exit, which are safe after a
        // fork of a threaded process.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork failed");
        if pid == 0 {
            let mut limit = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            // SAFETY: as in `raise`; lowering the soft limit needs no privilege either.
            let ok = unsafe {
                libc::getrlimit(libc::RLIMIT_NOFILE, &raw mut limit) == 0 && {
                    let lowered = libc::rlimit {
                        rlim_cur: limit.rlim_max.min(1024),
                        rlim_max: limit.rlim_max,
                    };
                    libc::setrlimit(libc::RLIMIT_NOFILE, &raw const lowered) == 0
                }
            } && super::raise().is_ok_and(|got| got == (limit.rlim_max, limit.rlim_max));
            // SAFETY: ends the child without running the parent's destructors or atexit.
            unsafe { libc::_exit(if ok { 0 } else { 1 }) };
        }
        let mut status = 0;
        // SAFETY: waits for the child just forked.
        assert_eq!(unsafe { libc::waitpid(pid, &raw mut status, 0) }, pid);
        assert!(
            libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
            "the child's soft limit did not rise to its hard limit"
        );
    }
}
