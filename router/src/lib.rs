//! skiff's router: sites, links, routing, services, and the userspace side of the eBPF programs.

pub mod accel;
pub mod admin;
pub mod app;
pub mod cli;
pub mod control;
pub mod datapath;
pub mod flows;
pub mod forward;
pub mod isolation;
pub mod link;
pub mod log_limit;
pub mod metrics;
pub mod node;
pub mod pki;
pub mod policy;
pub mod privilege;
pub mod programs;
pub mod resource;
pub mod routing;
pub mod service;
pub mod site;
pub mod tls;
pub mod token;
pub mod topology;
pub mod trim;
