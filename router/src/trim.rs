//! Hands memory that connections freed back to the kernel.
//!
//! glibc's allocator keeps what it frees inside its heaps, and returns only the top of each to
//! the kernel. Each stream across a link holds buffers while it lives; when thousands of held
//! streams end, their memory is free but stays resident, and the next round of streams lands
//! elsewhere in the heap: measured here, 2,000 idle streams held and released six times took
//! the process from 60 to 208 MB RSS, all of it free inside the allocator
//! (`router/tests/memory.rs`). `malloc_trim` returns free pages from anywhere in the heaps; the
//! router calls it once enough connections have ended since the last call.

use std::{
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

/// How often the trimmer looks.
const EVERY: Duration = Duration::from_secs(1);
/// Connections and streams that must end between two trims while others are still open
/// (with none open, any number will do).
const ENDED_BEFORE_TRIM: u64 = 1024;

/// Counts ended connections and trims the heap now and then.
#[derive(Debug, Default)]
pub struct Trimmer {
    ended: AtomicU64,
    trims: AtomicU64,
    /// How many had ended when the last trim began: all their memory has been offered back.
    trimmed_after: AtomicU64,
}

impl Trimmer {
    /// Counts one connection or stream that ended.
    pub fn ended(&self) {
        self.ended.fetch_add(1, Ordering::Relaxed);
    }

    /// How many times the heap was trimmed.
    #[must_use]
    pub fn trims(&self) -> u64 {
        self.trims.load(Ordering::Relaxed)
    }

    /// Connections and streams ended so far.
    #[must_use]
    pub fn ended_count(&self) -> u64 {
        self.ended.load(Ordering::Relaxed)
    }

    /// How many had ended when the last completed trim began.
    #[must_use]
    pub fn trimmed_after(&self) -> u64 {
        self.trimmed_after.load(Ordering::Acquire)
    }

    /// Trims whenever [`ENDED_BEFORE_TRIM`] connections ended since the last trim, or some did
    /// and `active` says none is open now. Runs until aborted.
    pub async fn run(&self, active: impl Fn() -> usize) {
        let mut tick = tokio::time::interval(EVERY);
        loop {
            tick.tick().await;
            let ended = self.ended.load(Ordering::Relaxed);
            let since = ended - self.trimmed_after();
            if since >= ENDED_BEFORE_TRIM || (since > 0 && active() == 0) {
                // Walks the heaps: milliseconds for hundreds of MB, off the async workers.
                let _ = tokio::task::spawn_blocking(release_free_memory).await;
                self.trims.fetch_add(1, Ordering::Relaxed);
                self.trimmed_after.store(ended, Ordering::Release);
            }
        }
    }
}

#[cfg(target_env = "gnu")]
fn release_free_memory() {
    // SAFETY: malloc_trim has no preconditions; it only returns free pages to the kernel.
    unsafe { libc::malloc_trim(0) };
}

#[cfg(not(target_env = "gnu"))]
fn release_free_memory() {}
