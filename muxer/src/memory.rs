//! Giving memory back to the kernel after large one-off work.
//!
//! The `muxer` binary allocates with mimalloc (see `main.rs`), which keeps freed pages resident
//! until later activity on the same thread purges them. That is right for connection churn, but
//! not for start-up work that never repeats, such as loading the eBPF object.

/// Returns the memory this thread's heap has freed to the kernel. Harmless under another global
/// allocator (tests): mimalloc's own heap is then empty.
pub(crate) fn release_freed() {
    // SAFETY: mi_collect takes no pointers; it only walks the calling thread's heap.
    unsafe { libmimalloc_sys::mi_collect(true) };
}
