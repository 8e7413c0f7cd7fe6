//! The process's heap: mimalloc asked the cheapest way a layout allows ([`Allocator`]), freed
//! memory given back after large one-off work, and the heap kept in small pages.
//!
//! The `muxer` binary allocates with mimalloc (see `main.rs`), which keeps freed pages resident
//! until later activity on the same thread purges them. That is right for connection churn, but
//! not for start-up work that never repeats, such as loading the eBPF object.
use std::alloc::{GlobalAlloc, Layout};
use std::ffi::c_void;

use libmimalloc_sys as mi;

/// The alignment mimalloc gives a plain allocation whose size is a multiple of the alignment
/// asked for, up to this (`MI_MAX_ALIGN_SIZE`): its size classes are multiples of 8 (of 16 above
/// 64 bytes) and every page's first block starts 16-aligned, so such a block is aligned already.
const PLAIN_ALIGN: usize = 16;

/// mimalloc as the global allocator, asked through its plain entry points whenever those already
/// give the alignment a layout needs, and through the aligned ones otherwise.
///
/// Why not `mimalloc::MiMalloc`: it sends every allocation to `mi_malloc_aligned`, and mimalloc 3
/// serves that with a plain block only when the page's next free block happens to be aligned and
/// the size is at most 1 KiB, or the size is a power of two. Everything else (the 3.3 KiB request
/// handler, hyper's buffers, any size class a page has just run out of) was over-allocated by
/// `alignment - 1` bytes and aligned inside a larger block: 5 of a keep-alive request's
/// allocations took that path, about 700 instructions per request (callgrind).
#[derive(Debug, Default, Clone, Copy)]
pub struct Allocator;

/// Whether a block of `size` bytes from mimalloc's plain entry points is aligned to `align`.
fn plain_is_aligned(size: usize, align: usize) -> bool {
    align <= PLAIN_ALIGN && size.is_multiple_of(align)
}

// SAFETY: every method hands mimalloc the layout's size (and alignment, where the plain entry
// points would not guarantee it), and returns what mimalloc returns: a block of at least that
// size with that alignment, or null. Blocks from either kind of entry point may be freed and
// reallocated by `mi_free` and `mi_realloc*` (mimalloc finds an aligned block's start itself).
unsafe impl GlobalAlloc for Allocator {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let (size, align) = (layout.size(), layout.align());
        if plain_is_aligned(size, align) {
            // SAFETY: mi_malloc takes a size only; the block is aligned (see `plain_is_aligned`).
            unsafe { mi::mi_malloc(size).cast() }
        } else {
            // SAFETY: `align` is a power of two, as every `Layout`'s is.
            unsafe { mi::mi_malloc_aligned(size, align).cast() }
        }
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let (size, align) = (layout.size(), layout.align());
        if plain_is_aligned(size, align) {
            // SAFETY: as in `alloc`.
            unsafe { mi::mi_zalloc(size).cast() }
        } else {
            // SAFETY: as in `alloc`.
            unsafe { mi::mi_zalloc_aligned(size, align).cast() }
        }
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, _layout: Layout) {
        // SAFETY: the caller passes a block this allocator returned and has not freed.
        unsafe { mi::mi_free(ptr.cast::<c_void>()) }
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let align = layout.align();
        if plain_is_aligned(new_size, align) {
            // SAFETY: `ptr` is a live block of this allocator (the caller's promise); the new
            // block is aligned (see `plain_is_aligned`).
            unsafe { mi::mi_realloc(ptr.cast(), new_size).cast() }
        } else {
            // SAFETY: as above, with the alignment asked for explicitly.
            unsafe { mi::mi_realloc_aligned(ptr.cast(), new_size, align).cast() }
        }
    }
}

/// Returns the memory this thread's heap has freed to the kernel. Harmless under another global
/// allocator (tests): mimalloc's own heap is then empty.
pub(crate) fn release_freed() {
    // SAFETY: mi_collect takes no pointers; it only walks the calling thread's heap.
    unsafe { libmimalloc_sys::mi_collect(true) };
}

/// Turns transparent huge pages off for this process and what it starts (the setting is
/// inherited). mimalloc asks for huge pages on its arenas, and the kernel's khugepaged then
/// collapses any 2 MiB stretch with a single page in use into a whole resident huge page, at a
/// moment of its choosing. Measured with 10 000 idle HTTP connections: the daemon held 9.8 MB of
/// heap with the first 50 open instead of 5.1 MB (one huge page is made before `main` runs),
/// and in a third of the runs RSS grew by another 3.1 MB a second or two after the last one
/// arrived, with no traffic at all (1.34 instead of 1.03 KiB per connection). Requests per
/// second, CPU per request and bulk throughput were level with and without (paired runs).
pub fn keep_heap_in_small_pages() -> std::io::Result<()> {
    rustix::thread::disable_transparent_huge_pages(true).map_err(std::io::Error::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every size up to 8 KiB and beyond a huge block, at every alignment up to 4 KiB: what
    /// comes back is aligned, writable over its whole size, and keeps its bytes when it grows.
    #[test]
    fn every_layout_gets_an_aligned_block_that_keeps_its_bytes_across_realloc() {
        let sizes = (1..=600).chain((600..=8192).step_by(40)).chain([
            12 << 10,
            100_000,
            1 << 20,
            (4 << 20) + 24,
        ]);
        for size in sizes {
            for align in [1, 2, 4, 8, 16, 32, 64, 128, 4096] {
                let Ok(layout) = Layout::from_size_align(size, align) else {
                    continue;
                };
                // SAFETY: the layout has a non-zero size; each block is used within its size
                // and freed once, with the layout it was made with.
                unsafe {
                    let block = Allocator.alloc(layout);
                    assert!(!block.is_null(), "{layout:?}");
                    assert_eq!(block as usize % align, 0, "{layout:?}");
                    block.write_bytes(0xa5, size);
                    let grown = Allocator.realloc(block, layout, size * 2 + 8);
                    assert!(!grown.is_null(), "{layout:?}");
                    assert_eq!(grown as usize % align, 0, "grown {layout:?}");
                    assert!((0..size).all(|i| *grown.add(i) == 0xa5), "{layout:?}");
                    let grown_layout = Layout::from_size_align(size * 2 + 8, align).unwrap();
                    Allocator.dealloc(grown, grown_layout);

                    let zeroed = Allocator.alloc_zeroed(layout);
                    assert_eq!(zeroed as usize % align, 0, "zeroed {layout:?}");
                    assert!((0..size).all(|i| *zeroed.add(i) == 0), "{layout:?}");
                    Allocator.dealloc(zeroed, layout);
                }
            }
        }
    }

    #[test]
    fn only_layouts_the_plain_blocks_satisfy_skip_the_aligned_path() {
        assert!(plain_is_aligned(24, 8));
        assert!(plain_is_aligned(48, 16));
        assert!(plain_is_aligned(3312, 8));
        assert!(
            !plain_is_aligned(24, 16),
            "a 24-byte class is only 8-aligned"
        );
        assert!(!plain_is_aligned(128, 32));
        assert!(!plain_is_aligned(256, 128), "tokio's task cells");
    }

    #[test]
    fn the_process_reports_huge_pages_off() {
        keep_heap_in_small_pages().unwrap();
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        assert!(status.contains("THP_enabled:\t0"), "{status}");
    }
}
