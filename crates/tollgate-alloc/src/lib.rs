//! The global allocator of the `tollgate` server (and of the benches that report what it
//! serves): mimalloc, asked for a plain block whenever one is aligned enough.
//!
//! `mimalloc::MiMalloc` asks mimalloc v3 for an *aligned* block on every allocation.
//! mimalloc's aligned path is fast only while the size class's page has a free block at
//! hand; otherwise, for a size class that is not a power of two, it over-allocates by the
//! alignment and marks the page as holding interior pointers, even for alignments every
//! block has anyway. Request handling frees and reallocates the same sizes all the time,
//! so it takes that path often. A plain `mi_malloc` block is aligned to 16 bytes (to its
//! size, below 16), which is what nearly every Rust layout asks for: those go to
//! `mi_malloc`, the rest to mimalloc's aligned calls.
//!
//! Measured with `bench/http_instructions.sh 8` (callgrind, the server's own
//! instructions per request): `/healthz` 16,358 → 15,454, `/v1/check` with the empty
//! policy 32,803 → 31,792, with the 10-rule policy 45,167 → 43,661.

#![warn(missing_docs)]

use std::alloc::{GlobalAlloc, Layout};
use std::ffi::c_void;

/// The alignment of every `mi_malloc` block of at least that size (mimalloc's
/// `MI_MAX_ALIGN_SIZE`).
const PLAIN_ALIGN: usize = 16;

/// mimalloc, asked for plain blocks when the layout's alignment allows (see the crate
/// docs).
pub struct Mimalloc;

/// Whether a plain block of `size` bytes is aligned enough for `align`: blocks smaller
/// than 16 bytes are aligned to their size class, which is at least `align` when
/// `align <= size`.
fn plain(align: usize, size: usize) -> bool {
    align <= PLAIN_ALIGN && align <= size
}

// SAFETY: every block comes from mimalloc and goes back to it (`mi_free` frees blocks of
// both kinds); a plain block is used only where its alignment meets the layout's.
unsafe impl GlobalAlloc for Mimalloc {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if plain(layout.align(), layout.size()) {
            // SAFETY: `layout.size()` is non-zero (a GlobalAlloc contract).
            unsafe { libmimalloc_sys::mi_malloc(layout.size()).cast() }
        } else {
            // SAFETY: forwarded as received.
            unsafe { mimalloc::MiMalloc.alloc(layout) }
        }
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if plain(layout.align(), layout.size()) {
            // SAFETY: as in `alloc`.
            unsafe { libmimalloc_sys::mi_zalloc(layout.size()).cast() }
        } else {
            // SAFETY: forwarded as received.
            unsafe { mimalloc::MiMalloc.alloc_zeroed(layout) }
        }
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from this allocator, so from mimalloc.
        unsafe { mimalloc::MiMalloc.dealloc(ptr, layout) }
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if plain(layout.align(), new_size) {
            // SAFETY: `ptr` came from mimalloc; the new block is aligned as above.
            unsafe { libmimalloc_sys::mi_realloc(ptr.cast::<c_void>(), new_size).cast() }
        } else {
            // SAFETY: forwarded as received.
            unsafe { mimalloc::MiMalloc.realloc(ptr, layout, new_size) }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_meet_their_layouts_alignment_through_alloc_and_realloc() {
        let a = Mimalloc;
        for align in [1, 2, 4, 8, 16, 32, 64, 4096] {
            for size in [1, 3, 8, 15, 16, 24, 40, 100, 704, 1000, 5000, 70_000] {
                let Ok(layout) = Layout::from_size_align(size, align) else {
                    continue;
                };
                // SAFETY: a non-zero size; every block is freed with its layout.
                unsafe {
                    let p = a.alloc(layout);
                    assert!(!p.is_null());
                    assert_eq!(p as usize % align, 0, "alloc {size} aligned {align}");
                    p.write_bytes(0xAB, size);
                    let z = a.alloc_zeroed(layout);
                    assert_eq!(z as usize % align, 0, "zeroed {size} aligned {align}");
                    assert!(std::slice::from_raw_parts(z, size).iter().all(|&b| b == 0));
                    a.dealloc(z, layout);
                    let grown = a.realloc(p, layout, size * 3 + 1);
                    assert_eq!(grown as usize % align, 0, "realloc {size} aligned {align}");
                    // The contents moved with the block.
                    assert!(
                        std::slice::from_raw_parts(grown, size)
                            .iter()
                            .all(|&b| b == 0xAB)
                    );
                    a.dealloc(grown, Layout::from_size_align(size * 3 + 1, align).unwrap());
                }
            }
        }
    }
}
