//! The skiff eBPF object (`ebpf/`, embedded at build time), loaded once per router:
//! acceleration ([`crate::accel`]) and isolation ([`crate::isolation`]) take their maps and
//! programs from the same load, so each map exists once in the kernel.
//!
//! Each takes the links of the programs it attaches, so each detaches its own programs when
//! dropped; the object itself can go once both have what they need.

use aya::{Ebpf, EbpfLoader, maps::MapError, programs::ProgramError};
use ebpf_common::{
    PROTO_MEMORY_ALLOCATED_OFFSET, PROTO_SYSCTL_MEM_OFFSET, QUEUE_LIMIT, ROUTER_NETNS,
    SK_PROT_OFFSET, SK_RMEM_ALLOC_OFFSET, TCP_COPIED_SEQ_OFFSET, TCP_RCV_NXT_OFFSET,
    TCP_SND_UNA_OFFSET, TCP_WRITE_SEQ_OFFSET,
};

use crate::accel::{btf, own_netns_cookie, queue_limit};

/// The eBPF object built from `ebpf/` by `build.rs`.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/skiff-ebpf"));

/// The kernel refused the object (no CAP_BPF, a verifier rejection, a missing map type).
#[derive(Debug, thiserror::Error)]
#[error("failed to load the eBPF object")]
pub struct LoadError(#[source] Box<aya::EbpfError>);

/// A program or map of the object that is missing, or that the kernel refused.
#[derive(Debug, thiserror::Error)]
pub enum ObjectError {
    #[error("eBPF object has no {kind} named {name}")]
    Missing {
        kind: &'static str,
        name: &'static str,
    },
    #[error("failed to load or attach program {name}")]
    Program {
        name: &'static str,
        #[source]
        source: Box<ProgramError>,
    },
    #[error("failed to access map {name}")]
    Map {
        name: &'static str,
        #[source]
        source: Box<MapError>,
    },
}

impl ObjectError {
    /// Names the map an access failed on.
    pub fn map(name: &'static str) -> impl FnOnce(MapError) -> Self {
        move |source| Self::Map {
            name,
            source: Box::new(source),
        }
    }

    /// Names the program a load or attach failed on.
    pub fn program(name: &'static str) -> impl FnOnce(ProgramError) -> Self {
        move |source| Self::Program {
            name,
            source: Box::new(source),
        }
    }
}

/// The loaded object, and the load-time settings its programs were given.
pub struct Programs {
    pub(crate) ebpf: Ebpf,
    netns: Option<u64>,
    shortcuts: bool,
}

impl std::fmt::Debug for Programs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Programs")
            .field("netns", &self.netns)
            .field("shortcuts", &self.shortcuts)
            .finish_non_exhaustive()
    }
}

impl Programs {
    /// Loads the object for the router's own network namespace.
    ///
    /// # Errors
    /// When the kernel refuses the object.
    pub fn load() -> Result<Self, LoadError> {
        let netns = own_netns_cookie()
            .inspect_err(|e| {
                tracing::warn!(
                    error = %e,
                    "this kernel cannot tell network namespaces apart (SO_NETNS_COOKIE): no acceleration, and isolation counts loopback in every namespace"
                );
            })
            .ok();
        Self::load_for(netns)
    }

    /// Loads the object for the network namespace whose cookie is `netns` (the router's own,
    /// for a router; the test's, in the kernel tests). Without one, the programs cannot tell
    /// namespaces apart: acceleration does not start, and isolation treats loopback alike in
    /// every namespace.
    ///
    /// # Errors
    /// When the kernel refuses the object.
    pub fn load_for(netns: Option<u64>) -> Result<Self, LoadError> {
        let mut loader = EbpfLoader::new();
        // sk_msg bounds shortcuts by the far socket's unread bytes, which it finds at an
        // offset only the kernel's BTF knows; without it, the router offers none.
        let offsets = btf::Offsets::read();
        let rmem_offset = offsets
            .as_ref()
            .map_err(Clone::clone)
            .and_then(|o| o.sk_rmem_alloc.clone())
            .inspect_err(|e| tracing::warn!("no shortcuts between local workloads: {e}"))
            .ok();
        // With the offset, sk_msg also holds a workload's redirected bytes in a router socket
        // to the limit the router's flow control uses, whether or not the router gets to run.
        let limit = u32::try_from(queue_limit()).expect("the queue limit is at most 64 MiB");
        if let Some(offset) = &rmem_offset {
            loader.override_global(SK_RMEM_ALLOC_OFFSET, offset, true);
            loader.override_global(QUEUE_LIMIT, &limit, true);
        }
        // And the way from a socket to TCP's memory count: a workload is diverted while TCP's
        // memory is under pressure, where a redirected message could fail with ENOMEM.
        let proto_mem = offsets
            .as_ref()
            .map_err(Clone::clone)
            .and_then(|o| o.proto_mem.clone())
            .inspect_err(|e| {
                tracing::warn!("redirection does not watch TCP's memory pressure: {e}");
            })
            .ok();
        if let (Some(mem), Some(_)) = (&proto_mem, &rmem_offset) {
            loader.override_global(SK_PROT_OFFSET, &mem.sk_prot, true);
            loader.override_global(PROTO_MEMORY_ALLOCATED_OFFSET, &mem.memory_allocated, true);
            loader.override_global(PROTO_SYSCTL_MEM_OFFSET, &mem.sysctl_mem, true);
        }
        // And where TCP keeps its sequence numbers: a diverted workload returns to redirection
        // once its TCP path is drained. Without them it stays diverted.
        let tcp = offsets
            .and_then(|o| o.tcp_seq)
            .inspect_err(|e| tracing::warn!("diverted senders stay on the TCP path: {e}"))
            .ok();
        if let (Some(tcp), Some(_)) = (&tcp, &rmem_offset) {
            loader.override_global(TCP_SND_UNA_OFFSET, &tcp.snd_una, true);
            loader.override_global(TCP_WRITE_SEQ_OFFSET, &tcp.write_seq, true);
            loader.override_global(TCP_COPIED_SEQ_OFFSET, &tcp.copied_seq, true);
            loader.override_global(TCP_RCV_NXT_OFFSET, &tcp.rcv_nxt, true);
        }
        if let Some(cookie) = &netns {
            loader.override_global(ROUTER_NETNS, cookie, true);
        }
        let ebpf = loader.load(OBJECT).map_err(|e| LoadError(Box::new(e)))?;
        Ok(Self {
            ebpf,
            netns,
            shortcuts: rmem_offset.is_some(),
        })
    }

    /// Takes map `name` out of the object, as type `T`.
    ///
    /// # Errors
    /// When the object has no such map, or it is not a `T`.
    pub fn take_map<T>(&mut self, name: &'static str) -> Result<T, ObjectError>
    where
        T: TryFrom<aya::maps::Map, Error = MapError>,
    {
        let map = self
            .ebpf
            .take_map(name)
            .ok_or(ObjectError::Missing { kind: "map", name })?;
        T::try_from(map).map_err(ObjectError::map(name))
    }

    /// Program `name` of the object, as type `T`.
    ///
    /// # Errors
    /// When the object has no such program, or it is not a `T`.
    pub fn program<'a, T>(&'a mut self, name: &'static str) -> Result<&'a mut T, ObjectError>
    where
        &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = ProgramError>,
    {
        let program = self.ebpf.program_mut(name).ok_or(ObjectError::Missing {
            kind: "program",
            name,
        })?;
        program.try_into().map_err(ObjectError::program(name))
    }

    /// The network namespace the programs serve, when the kernel could tell it.
    #[must_use]
    pub const fn netns(&self) -> Option<u64> {
        self.netns
    }

    /// Whether sk_msg may shortcut between local workloads (the kernel's BTF gave the offset
    /// it needs).
    #[must_use]
    pub const fn shortcuts(&self) -> bool {
        self.shortcuts
    }
}

/// Why loading or attaching failed, in one line. A verifier refusal is cut to the line of its
/// log that says why (the whole log runs to dozens of lines), and a kernel locked down for
/// confidentiality, which refuses the programs' reads of kernel memory, is named.
#[must_use]
pub fn reason(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts = Vec::new();
    let mut refused = false;
    let mut cause = Some(e);
    while let Some(error) = cause {
        if let Some(ProgramError::LoadError {
            io_error,
            verifier_log,
        }) = program_error(error)
        {
            parts.push(format!(
                "the kernel refused the program ({io_error}): {}",
                verifier_refusal(&verifier_log.to_string())
            ));
            refused = true;
            break;
        }
        parts.push(error.to_string());
        cause = error.source();
    }
    let line = parts.join(": ");
    let lockdown = std::fs::read_to_string("/sys/kernel/security/lockdown").unwrap_or_default();
    if refused && locked_for_confidentiality(&lockdown) {
        format!(
            "the kernel is locked down for confidentiality, which refuses BPF reads of kernel memory: {line}"
        )
    } else {
        line
    }
}

/// The program error inside `error`, however aya or this module wrapped it.
fn program_error<'e>(error: &'e (dyn std::error::Error + 'static)) -> Option<&'e ProgramError> {
    if let Some(p) = error.downcast_ref::<ProgramError>() {
        return Some(p);
    }
    if let Some(p) = error.downcast_ref::<Box<ProgramError>>() {
        return Some(p);
    }
    let ebpf = error
        .downcast_ref::<aya::EbpfError>()
        .or_else(|| error.downcast_ref::<Box<aya::EbpfError>>().map(|b| &**b));
    match ebpf {
        Some(aya::EbpfError::ProgramError(p)) => Some(p),
        _ => None,
    }
}

/// The line of a verifier log that says why it refused: the last one before its statistics.
fn verifier_refusal(log: &str) -> &str {
    const STATISTICS: [&str; 4] = [
        "processed ",
        "verification time",
        "stack depth",
        "max_states_per_insn",
    ];
    log.lines()
        .map(str::trim)
        .rfind(|l| !l.is_empty() && !STATISTICS.iter().any(|s| l.starts_with(s)))
        .unwrap_or("(the verifier gave no reason)")
}

/// Whether `/sys/kernel/security/lockdown` (given as `text`) selects confidentiality.
fn locked_for_confidentiality(text: &str) -> bool {
    text.contains("[confidentiality]")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_verifier_log_is_cut_to_its_refusal() {
        // The shape of the log 6.12 gave under lockdown=confidentiality (docs/vm-matrix-notes.md).
        let log = "func#0 @0\n0: R1=ctx() R10=fp0\n; let sk = ... @ sk_msg.rs:113\n\
                   42: (85) call bpf_probe_read#4\n\
                   program of this type cannot use helper bpf_probe_read#4\n\
                   processed 43 insns (limit 1000000) max_states_per_insn 0 total_states 3\n";
        assert_eq!(
            verifier_refusal(log),
            "program of this type cannot use helper bpf_probe_read#4"
        );
        assert_eq!(verifier_refusal(""), "(the verifier gave no reason)");
    }

    #[test]
    fn only_the_confidentiality_mode_counts_as_locked_down() {
        assert!(locked_for_confidentiality(
            "none integrity [confidentiality]\n"
        ));
        assert!(!locked_for_confidentiality(
            "none [integrity] confidentiality\n"
        ));
        assert!(!locked_for_confidentiality(""));
    }

    #[test]
    fn a_reason_without_a_verifier_refusal_is_the_error_chain() {
        let error = ObjectError::Missing {
            kind: "map",
            name: "SKIFF_ALLOWED",
        };
        assert_eq!(reason(&error), "eBPF object has no map named SKIFF_ALLOWED");
    }
}
