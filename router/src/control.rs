//! The control plane's owners. Each holds its own state behind its own lock and returns its
//! own error type; the admin API ([`crate::app`]) calls them, the link protocol calls
//! [`links::Links`] (as its `Events` and `Access`).
//!
//! - [`network`]: the routing table and the link-state floods.
//! - [`services`]: listeners and connectors, `STATE/resources.json`.
//! - [`links`]: outgoing links, grants, credentials, revocations; link events.
//! - [`certs`]: the CAs, the router identity, service TLS.
//! - [`namespaces`]: namespaces set while the router runs (pods), `STATE/namespaces.json`.
//!
//! No owner holds its lock while it calls another owner that takes one, except into leaf
//! locks (the node's, routing's, forwarding's table); no lock but a state file's own turn is
//! held across file I/O.

pub mod certs;
pub mod links;
pub mod namespaces;
pub mod network;
pub mod services;
