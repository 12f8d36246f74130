//! Giving up privilege: `skiff router run --user USER`.
//!
//! Everything that needs CAP_BPF or CAP_NET_ADMIN happens once, at start: loading the eBPF
//! programs, attaching them to the cgroup, pinning them. The maps are then used through the file
//! descriptors already open, which needs no capability (the kernel checks privilege when a map
//! or program is created, not when an open map is read or written). So the router attaches its
//! programs as root, before it has opened a single network socket, and then becomes USER with
//! every capability set empty, before it reads anything from the network.
//!
//! Kernels before 5.19 refuse every bpf() call, a map update through an open descriptor
//! included, to a caller without CAP_BPF while `kernel.unprivileged_bpf_disabled` is set (as
//! distributions set it). There the router keeps CAP_BPF alone, in its permitted and effective
//! sets and its bounding set, when it uses maps after the drop ([`Keep::Bpf`]), and says so.
//!
//! One thing outlives the router and needs root: the pins under bpffs (root's directory), whose
//! removal also detaches the sock_ops program. A keeper process (`skiff router keep-pins`),
//! started before the drop, stays root with no capabilities, reads nothing but a pipe from the
//! router, and removes the pins when that pipe closes: when the router exits, or crashes.

use std::{
    ffi::{CStr, CString},
    io,
    path::Path,
    process::{Child, Command, Stdio},
};

/// A user to run as.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct User {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
}

/// Failure to give up privilege. The router does not start then.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("--user {0}: no such user")]
    NoSuchUser(String),
    #[error("--user needs the router to start as root (it attaches, then drops privileges)")]
    NotRoot,
    #[error(
        "--user {user}: the state directory {dir} belongs to uid {owner}; \
         give it to the user (chown -R {user} {dir}) or run without --user"
    )]
    StateNotOwned {
        user: String,
        dir: String,
        owner: u32,
    },
    #[error("--user: the router must give up privilege before it starts threads ({0} running)")]
    Threads(usize),
    #[error("failed to {what}")]
    Call {
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("privileges remain after dropping them: {0}")]
    Remaining(String),
}

fn call(what: &'static str, rc: libc::c_int) -> Result<(), Error> {
    if rc < 0 {
        Err(Error::Call {
            what,
            source: io::Error::last_os_error(),
        })
    } else {
        Ok(())
    }
}

impl User {
    /// Looks `spec` up as a user name, or takes it as a numeric uid (whose group is the passwd
    /// entry's, or the same number without one).
    ///
    /// # Errors
    /// When there is no such user.
    pub fn lookup(spec: &str) -> Result<Self, Error> {
        let numeric = spec.parse::<u32>().ok();
        let mut entry: libc::passwd = zeroed_passwd();
        let mut found: *mut libc::passwd = std::ptr::null_mut();
        let mut buf = vec![0 as libc::c_char; 16 * 1024];
        let name = CString::new(spec).map_err(|_| Error::NoSuchUser(spec.to_owned()))?;
        // SAFETY: every pointer is valid for the call; the buffer outlives `entry`'s strings,
        // which are read before it goes away.
        let rc = unsafe {
            match numeric {
                Some(uid) => {
                    libc::getpwuid_r(uid, &mut entry, buf.as_mut_ptr(), buf.len(), &mut found)
                }
                None => libc::getpwnam_r(
                    name.as_ptr(),
                    &mut entry,
                    buf.as_mut_ptr(),
                    buf.len(),
                    &mut found,
                ),
            }
        };
        if rc != 0 || found.is_null() {
            return match numeric {
                Some(uid) => Ok(Self {
                    name: uid.to_string(),
                    uid,
                    gid: uid,
                }),
                None => Err(Error::NoSuchUser(spec.to_owned())),
            };
        }
        // SAFETY: getpwnam_r/getpwuid_r filled `entry` with pointers into `buf`.
        let name = unsafe { CStr::from_ptr(entry.pw_name) }
            .to_string_lossy()
            .into_owned();
        Ok(Self {
            name,
            uid: entry.pw_uid,
            gid: entry.pw_gid,
        })
    }

    /// Checks that this user can keep the router's state: it must own `state`.
    ///
    /// # Errors
    /// When it does not.
    pub fn check_owns(&self, state: &Path) -> Result<(), Error> {
        use std::os::unix::fs::MetadataExt as _;
        let owner = std::fs::metadata(state)
            .map_err(|source| Error::Call {
                what: "read the state directory",
                source,
            })?
            .uid();
        if owner == self.uid {
            Ok(())
        } else {
            Err(Error::StateNotOwned {
                user: self.name.clone(),
                dir: state.display().to_string(),
                owner,
            })
        }
    }
}

fn zeroed_passwd() -> libc::passwd {
    // SAFETY: passwd is a plain C struct of integers and pointers, for which all-zero is valid.
    unsafe { std::mem::zeroed() }
}

/// Becomes `user` with every capability set empty (permitted, effective, inheritable, ambient
/// and bounding) and no_new_privs set, then checks /proc/self/status says so.
///
/// The capabilities a router keeps when it gives up privilege.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Keep {
    /// None: the kernel checks privilege when a map is created, not when it is used.
    Nothing,
    /// CAP_BPF alone: the kernel checks it on every bpf() call (see the module documentation).
    Bpf,
}

/// CAP_BPF's number (Linux 5.8).
const CAP_BPF: u32 = 39;

impl Keep {
    /// What a router that uses eBPF maps after the drop must keep on this kernel.
    #[must_use]
    pub fn for_this_kernel() -> Self {
        let read = |path: &str| std::fs::read_to_string(path).unwrap_or_default();
        if bpf_refuses_the_unprivileged(
            &read("/proc/sys/kernel/osrelease"),
            &read("/proc/sys/kernel/unprivileged_bpf_disabled"),
        ) {
            Self::Bpf
        } else {
            Self::Nothing
        }
    }

    /// The kept set as a capability mask.
    fn mask(self) -> u64 {
        match self {
            Self::Nothing => 0,
            Self::Bpf => 1 << CAP_BPF,
        }
    }
}

/// Whether a kernel of release `osrelease` with `kernel.unprivileged_bpf_disabled` at
/// `disabled` refuses all of bpf() to callers without CAP_BPF (Linux 5.19 narrowed the check
/// to creating maps and loading programs). An unreadable release counts as a new kernel.
#[must_use]
pub fn bpf_refuses_the_unprivileged(osrelease: &str, disabled: &str) -> bool {
    let mut numbers = osrelease
        .trim()
        .split(|c: char| !c.is_ascii_digit())
        .map(|n| n.parse::<u32>().ok());
    let version = (numbers.next().flatten(), numbers.next().flatten());
    let old = matches!(version, (Some(major), Some(minor)) if (major, minor) < (5, 19));
    old && disabled.trim().parse::<u32>().is_ok_and(|d| d != 0)
}

/// Must run before the process starts a second thread: set*id and capabilities are per thread
/// in the kernel. Keeps `keep` and nothing else.
///
/// # Errors
/// When not root, when threads are running, or when any step fails.
pub fn drop_to(user: &User, keep: Keep) -> Result<(), Error> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err(Error::NotRoot);
    }
    check_single_threaded()?;
    drop_bounding_set(keep.mask())?;
    // SAFETY: plain system calls with valid arguments; each result is checked.
    unsafe {
        call(
            "clear supplementary groups",
            libc::setgroups(0, std::ptr::null()),
        )?;
        call(
            "set the group id",
            libc::setresgid(user.gid, user.gid, user.gid),
        )?;
        // Leaving uid 0 clears the permitted and effective sets unless keep-caps is on.
        call(
            "keep capabilities across the change of user",
            libc::prctl(
                libc::PR_SET_KEEPCAPS,
                libc::c_ulong::from(keep != Keep::Nothing),
                0,
                0,
                0,
            ),
        )?;
        call(
            "set the user id",
            libc::setresuid(user.uid, user.uid, user.uid),
        )?;
        call(
            "turn keep-caps off",
            libc::prctl(libc::PR_SET_KEEPCAPS, 0, 0, 0, 0),
        )?;
    }
    set_capabilities(keep.mask())?;
    set_no_new_privs()?;
    let status = std::fs::read_to_string("/proc/self/status").map_err(|source| Error::Call {
        what: "read /proc/self/status",
        source,
    })?;
    let remaining = remaining_privilege(&status, user.uid, keep);
    if remaining.is_empty() {
        Ok(())
    } else {
        Err(Error::Remaining(remaining.join(", ")))
    }
}

/// Stays uid 0 but drops every capability, for the pin keeper. Must run single-threaded.
///
/// # Errors
/// When any step fails.
pub fn drop_capabilities() -> Result<(), Error> {
    check_single_threaded()?;
    drop_bounding_set(0)?;
    set_capabilities(0)?;
    set_no_new_privs()
}

fn check_single_threaded() -> Result<(), Error> {
    let status = std::fs::read_to_string("/proc/self/status").map_err(|source| Error::Call {
        what: "read /proc/self/status",
        source,
    })?;
    let threads = field(&status, "Threads:")
        .and_then(|t| t.parse::<usize>().ok())
        .unwrap_or(1);
    if threads == 1 {
        Ok(())
    } else {
        Err(Error::Threads(threads))
    }
}

/// Drops every capability but those in `keep` from the bounding set.
fn drop_bounding_set(keep: u64) -> Result<(), Error> {
    // Capabilities the kernel does not know end the loop with EINVAL.
    for cap in (0..64).filter(|cap| keep & (1 << cap) == 0) {
        // SAFETY: prctl with integer arguments.
        if unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) } < 0 {
            let err = io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::EINVAL) {
                break;
            }
            return Err(Error::Call {
                what: "drop the capability bounding set",
                source: err,
            });
        }
    }
    Ok(())
}

/// Sets the permitted and effective sets to `keep`, the inheritable and ambient sets empty.
fn set_capabilities(keep: u64) -> Result<(), Error> {
    #[repr(C)]
    struct Header {
        version: u32,
        pid: libc::c_int,
    }
    #[repr(C)]
    #[derive(Clone, Copy, Default)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;
    let header = Header {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    // Two 32-bit words: capabilities 0-31, then 32-63 (the truncations are the split).
    let word = |bits: u64| Data {
        effective: bits as u32,
        permitted: bits as u32,
        inheritable: 0,
    };
    let data = [word(keep), word(keep >> 32)];
    // SAFETY: capset reads a v3 header and two data words, both valid for the call.
    unsafe {
        call(
            "set the capability sets",
            libc::syscall(libc::SYS_capset, &raw const header, data.as_ptr()) as libc::c_int,
        )?;
        call(
            "clear the ambient capabilities",
            libc::prctl(
                libc::PR_CAP_AMBIENT,
                libc::PR_CAP_AMBIENT_CLEAR_ALL,
                0,
                0,
                0,
            ),
        )
    }
}

fn set_no_new_privs() -> Result<(), Error> {
    // SAFETY: prctl with integer arguments.
    call("set no_new_privs", unsafe {
        libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    })
}

fn field<'a>(status: &'a str, name: &str) -> Option<&'a str> {
    status
        .lines()
        .find_map(|line| line.strip_prefix(name))
        .map(str::trim)
}

/// What /proc/PID/status shows of privilege beyond an unprivileged `uid` that keeps `keep`.
#[must_use]
pub fn remaining_privilege(status: &str, uid: u32, keep: Keep) -> Vec<String> {
    let mut remaining = Vec::new();
    let uid = uid.to_string();
    if let Some(uids) = field(status, "Uid:")
        && uids.split_whitespace().any(|u| u != uid)
    {
        remaining.push(format!("Uid {uids}"));
    }
    for (set, allowed) in [
        ("CapInh:", 0),
        ("CapPrm:", keep.mask()),
        ("CapEff:", keep.mask()),
        ("CapBnd:", keep.mask()),
        ("CapAmb:", 0),
    ] {
        if let Some(caps) = field(status, set)
            && u64::from_str_radix(caps, 16).map_or(true, |caps| caps & !allowed != 0)
        {
            remaining.push(format!("{set} {caps}"));
        }
    }
    remaining
}

/// Starts the pin keeper for `pin_dir` and returns it; the router keeps the returned child (and
/// with it the pipe to the keeper's stdin) for its whole life.
///
/// # Errors
/// When the keeper cannot be started.
pub fn spawn_keeper(pin_dir: &Path) -> Result<Child, Error> {
    let exe = std::env::current_exe().map_err(|source| Error::Call {
        what: "find the skiff binary",
        source,
    })?;
    Command::new(exe)
        .args(["router", "keep-pins", "--pin-dir"])
        .arg(pin_dir)
        .stdin(Stdio::piped())
        .spawn()
        .map_err(|source| Error::Call {
            what: "start the pin keeper",
            source,
        })
}

/// The pin keeper's life: no capabilities, deaf to signals meant for the router, waits for its
/// stdin (the router's pipe) to close, then removes the pins.
///
/// # Errors
/// When dropping capabilities fails; a failure to remove pins is logged (the next router start
/// removes them too).
pub fn keep_pins(pin_dir: &Path) -> Result<(), Error> {
    drop_capabilities()?;
    for signal in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: ignoring a signal is always sound.
        unsafe { libc::signal(signal, libc::SIG_IGN) };
    }
    let mut sink = Vec::new();
    let _ = io::Read::read_to_end(&mut io::stdin(), &mut sink);
    crate::accel::remove_pins(pin_dir);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_without_privilege_is_clean() {
        let status = "Name:\tskiff\nUid:\t65534\t65534\t65534\t65534\nCapInh:\t0000000000000000\n\
                      CapPrm:\t0000000000000000\nCapEff:\t0000000000000000\n\
                      CapBnd:\t0000000000000000\nCapAmb:\t0000000000000000\n";
        assert!(remaining_privilege(status, 65534, Keep::Nothing).is_empty());
        let root = status.replace("CapEff:\t0000000000000000", "CapEff:\t000001ffffffffff");
        assert_eq!(
            remaining_privilege(&root, 65534, Keep::Bpf),
            vec!["CapEff: 000001ffffffffff"]
        );
        assert_eq!(
            remaining_privilege(status, 1000, Keep::Nothing),
            vec!["Uid 65534\t65534\t65534\t65534"]
        );
        let bpf = status
            .replace("CapEff:\t0000000000000000", "CapEff:\t0000008000000000")
            .replace("CapPrm:\t0000000000000000", "CapPrm:\t0000008000000000");
        assert!(remaining_privilege(&bpf, 65534, Keep::Bpf).is_empty());
        assert_eq!(
            remaining_privilege(&bpf, 65534, Keep::Nothing),
            vec!["CapPrm: 0000008000000000", "CapEff: 0000008000000000"]
        );
    }

    /// Debian 11's 5.10 sets unprivileged_bpf_disabled to 2 and checks it on every bpf()
    /// call; 5.19 and later check it only when maps are created and programs loaded.
    #[test]
    fn kernels_before_5_19_with_unprivileged_bpf_disabled_need_cap_bpf() {
        assert!(bpf_refuses_the_unprivileged("5.10.0-32-amd64\n", "2\n"));
        assert!(bpf_refuses_the_unprivileged("5.18.19", "1"));
        assert!(!bpf_refuses_the_unprivileged("5.10.0-32-amd64", "0"));
        assert!(!bpf_refuses_the_unprivileged("5.19.0", "2"));
        assert!(!bpf_refuses_the_unprivileged("6.1.0-50-amd64", "2"));
        assert!(!bpf_refuses_the_unprivileged("6.18.0", "2"));
        assert!(!bpf_refuses_the_unprivileged("", "2"));
        assert!(!bpf_refuses_the_unprivileged("5.10.0", ""));
    }

    #[test]
    fn users_are_found_by_name_and_number() {
        let root = User::lookup("root").expect("root exists");
        assert_eq!((root.uid, root.gid), (0, 0));
        assert_eq!(User::lookup("0").expect("uid 0").name, "root");
        assert_eq!(User::lookup("4000000").expect("numeric").gid, 4_000_000);
        assert!(matches!(
            User::lookup("no-such-user-here"),
            Err(Error::NoSuchUser(_))
        ));
    }
}
