//! The skiff eBPF object (`ebpf/`, embedded at build time), loaded once per router:
//! acceleration ([`crate::accel`]) and isolation ([`crate::isolation`]) take their maps and
//! programs from the same load, so each map exists once in the kernel.
//!
//! Each takes the links of the programs it attaches, so each detaches its own programs when
//! dropped; the object itself can go once both have what they need.

use aya::{Ebpf, EbpfLoader, maps::MapError, programs::ProgramError};
use ebpf_common::{ROUTER_NETNS, SK_RMEM_ALLOC_OFFSET};

use crate::accel::{btf, own_netns_cookie};

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
        let rmem_offset = btf::sk_rmem_alloc_offset()
            .inspect_err(|e| tracing::warn!("no shortcuts between local workloads: {e}"))
            .ok();
        if let Some(offset) = &rmem_offset {
            loader.override_global(SK_RMEM_ALLOC_OFFSET, offset, true);
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
