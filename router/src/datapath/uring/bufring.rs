//! A provided-buffer ring (`IORING_REGISTER_PBUF_RING`, Linux 5.19+): buffers the kernel picks
//! from as data arrives, so a connection holds a buffer only while it has bytes to move.
//!
//! The ring and the buffers are one page-aligned allocation each. The kernel consumes entries
//! from the head; the worker hands buffers back by writing entries at the tail and publishing
//! the new tail with a release store.

use std::{
    alloc::{Layout, alloc_zeroed, dealloc},
    io,
    sync::atomic::{AtomicU16, Ordering},
};

use io_uring::{IoUring, types::BufRingEntry};

/// The buffers of one worker and the ring that lends them to the kernel.
pub(super) struct BufRing {
    group: u16,
    entries: u16,
    buf_size: u32,
    ring: *mut BufRingEntry,
    ring_layout: Layout,
    bufs: *mut u8,
    bufs_layout: Layout,
    /// The tail as published to the kernel, plus entries written but not yet published.
    tail: u16,
    /// Buffers in the ring: pushed and not yet seen taken in a completion.
    lent: u16,
}

impl std::fmt::Debug for BufRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BufRing")
            .field("group", &self.group)
            .field("entries", &self.entries)
            .field("buf_size", &self.buf_size)
            .finish_non_exhaustive()
    }
}

const PAGE: usize = 4096;

impl BufRing {
    /// Allocates `entries` buffers of `buf_size` bytes, registers them with `ring` as buffer
    /// group `group` and lends every one to the kernel.
    ///
    /// # Errors
    /// When the kernel has no provided-buffer rings, or memory runs out.
    pub(super) fn new(ring: &IoUring, group: u16, entries: u16, buf_size: u32) -> io::Result<Self> {
        assert!(entries.is_power_of_two(), "the ring size is a power of two");
        let ring_layout =
            Layout::from_size_align(usize::from(entries) * size_of::<BufRingEntry>(), PAGE)
                .map_err(io::Error::other)?;
        let bufs_layout = Layout::from_size_align(usize::from(entries) * buf_size as usize, PAGE)
            .map_err(io::Error::other)?;
        // SAFETY: both layouts have a non-zero size.
        let ring_mem = unsafe { alloc_zeroed(ring_layout) }.cast::<BufRingEntry>();
        let bufs = unsafe { alloc_zeroed(bufs_layout) };
        if ring_mem.is_null() || bufs.is_null() {
            // SAFETY: whichever was allocated, with its own layout.
            unsafe {
                if !ring_mem.is_null() {
                    dealloc(ring_mem.cast(), ring_layout);
                }
                if !bufs.is_null() {
                    dealloc(bufs, bufs_layout);
                }
            }
            return Err(io::Error::from(io::ErrorKind::OutOfMemory));
        }
        let mut this = Self {
            group,
            entries,
            buf_size,
            ring: ring_mem,
            ring_layout,
            bufs,
            bufs_layout,
            tail: 0,
            lent: 0,
        };
        // SAFETY: the ring memory is page-aligned, `entries` long, and lives until `this` is
        // dropped, which unregisters it first (the worker drops the BufRing before the ring).
        unsafe {
            ring.submitter()
                .register_buf_ring_with_flags(ring_mem as u64, entries, group, 0)?;
        }
        for bid in 0..entries {
            this.push(bid);
        }
        this.publish();
        Ok(this)
    }

    /// The buffer group id to name in recv SQEs.
    pub(super) const fn group(&self) -> u16 {
        self.group
    }

    /// The bytes of buffer `bid`.
    pub(super) fn buf(&self, bid: u16) -> *mut u8 {
        debug_assert!(bid < self.entries);
        // SAFETY: bid < entries, so the offset stays inside the allocation.
        unsafe { self.bufs.add(usize::from(bid) * self.buf_size as usize) }
    }

    /// Writes buffer `bid` at the tail; the kernel sees it after [`BufRing::publish`].
    pub(super) fn push(&mut self, bid: u16) {
        let mask = self.entries - 1;
        // SAFETY: the index is masked into the ring; the kernel reads entries only up to the
        // published tail, which this one is past.
        let entry = unsafe { &mut *self.ring.add(usize::from(self.tail & mask)) };
        entry.set_addr(self.buf(bid) as u64);
        entry.set_len(self.buf_size);
        entry.set_bid(bid);
        self.tail = self.tail.wrapping_add(1);
        self.lent += 1;
    }

    /// Notes that a completion carried one of the ring's buffers: the kernel took it.
    pub(super) fn taken(&mut self) {
        debug_assert!(
            self.lent > 0,
            "a completion carried a buffer the ring never lent"
        );
        self.lent = self.lent.saturating_sub(1);
    }

    /// Buffers the kernel may still take (pushed ones included, published or not).
    pub(super) const fn lent(&self) -> u16 {
        self.lent
    }

    /// Makes every pushed buffer visible to the kernel.
    pub(super) fn publish(&self) {
        // SAFETY: the ring's first entry holds the tail (its resv field), a u16 the kernel
        // reads with acquire semantics.
        let tail = unsafe { &*BufRingEntry::tail(self.ring).cast::<AtomicU16>() };
        tail.store(self.tail, Ordering::Release);
    }

    /// Unregisters the ring from `ring` (before either goes).
    pub(super) fn unregister(&self, ring: &IoUring) {
        let _ = ring.submitter().unregister_buf_ring(self.group);
    }
}

impl Drop for BufRing {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with these layouts; the kernel no longer uses them (the
        // worker unregisters the group, or the ring is gone, before this runs).
        unsafe {
            dealloc(self.ring.cast(), self.ring_layout);
            dealloc(self.bufs, self.bufs_layout);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The ring counts what it lends: every buffer at first, one less for each the kernel is
    /// seen taking, one more for each handed back; never below zero.
    #[test]
    fn the_ring_counts_the_buffers_it_lends() {
        // The uring suite runs where io_uring does (SKIFF_DATAPATH=uring in `cargo xtask test`).
        let ring = IoUring::new(8).expect("io_uring");
        let mut bufs = BufRing::new(&ring, 7, 4, 4096).expect("a provided buffer ring");
        assert_eq!(bufs.lent(), 4);
        bufs.taken();
        bufs.taken();
        assert_eq!(bufs.lent(), 2);
        bufs.push(0);
        bufs.publish();
        assert_eq!(bufs.lent(), 3);
        for _ in 0..3 {
            bufs.taken();
        }
        assert_eq!(bufs.lent(), 0);
        bufs.unregister(&ring);
    }
}
