//! The allocator of rankalign's binaries, and the peak heap memory of a piece of work.
//!
//! - [`MiMalloc`] (mimalloc) is the global allocator of `rankalign` and the model bench, set
//!   up by [`keep_freed_memory`]. A training step runs its two towers as parallel tasks
//!   that allocate and free tensors all the time; glibc's malloc served both from one
//!   arena and its lock (with an arena per thread, a worker's arena unmaps its large
//!   blocks whenever it empties, and each reuse faults the pages in again). mimalloc
//!   keeps a heap per thread. Measured on this project's 2-core machine, 2 threads: the
//!   tiny CLIP step 108–118 → 98 ms, its 4 × 32 micro-batch form 130 → 103 ms
//!   (decision 88 in `docs/decisions.md`).
//! - [`Counting`] wraps that allocator and counts live bytes and their high-water mark;
//!   a binary opts in with `#[global_allocator] static A: Counting = Counting;` and
//!   measures with [`peak_during`]. Without that declaration the counters stay at zero.

#![allow(unsafe_code)] // a GlobalAlloc implementation is unsafe by definition

pub use mimalloc::MiMalloc;

use std::alloc::{GlobalAlloc, Layout};
use std::sync::atomic::{AtomicUsize, Ordering};

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

/// [`MiMalloc`], counting live bytes and their high-water mark.
#[derive(Debug)]
pub struct Counting;

// SAFETY: every call forwards to `MiMalloc` with the same layout (and size); the
// counters are only bookkeeping and never affect the pointers returned.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded unchanged.
        let p = unsafe { MiMalloc.alloc(layout) };
        if !p.is_null() {
            let live = LIVE.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
            PEAK.fetch_max(live, Ordering::Relaxed);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `alloc` with this layout.
        unsafe { MiMalloc.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded unchanged (mimalloc can skip zeroing fresh pages).
        let p = unsafe { MiMalloc.alloc_zeroed(layout) };
        if !p.is_null() {
            let live = LIVE.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
            PEAK.fetch_max(live, Ordering::Relaxed);
        }
        p
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: `ptr` came from `alloc` with this layout; forwarded unchanged.
        let p = unsafe { MiMalloc.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
            let live = LIVE.fetch_add(new_size, Ordering::Relaxed) + new_size;
            PEAK.fetch_max(live, Ordering::Relaxed);
        }
        p
    }
}

/// Bytes live now (0 unless [`Counting`] is the global allocator).
pub fn live_bytes() -> usize {
    LIVE.load(Ordering::Relaxed)
}

/// `f`'s result and the peak of live bytes during it above those live before it. Other
/// threads' allocations in that time count too.
pub fn peak_during<R>(f: impl FnOnce() -> R) -> (R, usize) {
    let base = LIVE.load(Ordering::Relaxed);
    PEAK.store(base, Ordering::Relaxed);
    let out = f();
    (out, PEAK.load(Ordering::Relaxed).saturating_sub(base))
}

/// mimalloc's `mi_option_purge_delay` (the index in `mimalloc.h`'s `mi_option_e`; the
/// extended API names only some options). Its default, 1000 ms, is checked by the test
/// below to catch a renumbering when mimalloc is upgraded.
const PURGE_DELAY: std::ffi::c_int = 15;

/// Sets up [`MiMalloc`] for training, which allocates and frees the same large tensors
/// every step: freed memory is never purged (handed back to the kernel), so a tensor
/// allocated again is not faulted in and zeroed page by page once more. mimalloc's
/// default purges memory left free for a second, and a ViT-B/16 step (several seconds)
/// then paid for its tensors again every step. Measured, that step at batch 16 on
/// 2 threads: 8.0 s a step and 30 s of system time in the benchmark's 76 s with the
/// default, 6.8 s and 5 s without purging. Resident memory then stays near the peak
/// (glibc's `M_TRIM_THRESHOLD` did the same before).
pub fn keep_freed_memory() {
    // SAFETY: `mi_option_set` only stores an option value (any value is allowed).
    unsafe { libmimalloc_sys::mi_option_set(PURGE_DELAY, -1) };
}

#[cfg(test)]
mod tests {
    #[test]
    fn mimalloc_takes_the_setting() {
        // SAFETY: reading and setting option values only.
        unsafe {
            // mimalloc's documented default, unless the environment overrides it.
            if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
                assert_eq!(libmimalloc_sys::mi_option_get(super::PURGE_DELAY), 1000);
            }
            super::keep_freed_memory();
            assert_eq!(libmimalloc_sys::mi_option_get(super::PURGE_DELAY), -1);
        }
    }
}
