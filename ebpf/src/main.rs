//! skiff's eBPF programs, one file per kernel hook. Built for `bpfel-unknown-none` by
//! `router/build.rs` and embedded in the router binary.
//!
//! Rules for everything here: never panic, return the verdict that leaves the connection on
//! its normal path when anything goes wrong, and count what went wrong.
//!
//! On the host the crate builds as an empty program, so that clippy and rustfmt see the same
//! code the bpf target compiles.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

mod cgroup_sock_addr;
mod maps;
mod sk_msg;
mod sock_ops;

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any program that could reach this; it exists to satisfy no_std.
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";

#[cfg(not(target_arch = "bpf"))]
fn main() {}
