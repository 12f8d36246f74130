//! skiff's router: sites, links, routing, services, and the userspace side of the eBPF programs.

pub mod accel;
