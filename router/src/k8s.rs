//! Kubernetes: the node's pods mapped to their cgroups ([`cgroups`], [`pods`]), fed to the
//! router as its isolation namespaces.

pub mod cgroups;
mod inotify;
pub mod pods;

pub use inotify::DirEvent;
