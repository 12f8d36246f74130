//! Kubernetes: the node controller ([`controller`], [`reconcile`], [`access`], [`status`],
//! [`secrets`])
//! and the node's pods mapped to their cgroups ([`cgroups`], [`pods`]), fed to the router as
//! its isolation namespaces.

pub mod access;
pub mod cgroups;
pub mod controller;
mod inotify;
pub mod pods;
pub mod reconcile;
pub mod secrets;
pub mod status;

pub use inotify::DirEvent;
