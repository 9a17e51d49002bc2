//! The allocator's side of ccmgr's footprint: giving the C library's `malloc` back the pages
//! it keeps after a burst of allocations.
//!
//! glibc's `malloc` returns memory to the kernel only from the top of its heap and only above a
//! threshold; what a process frees below a live allocation (the copy of the config image a
//! verification read, the parse tree of a configuration, a startup's messages) stays resident
//! for good. A process that then waits for a long time — the standby, a coordinator or keeper
//! whose stack is up — pays for that in RSS for its whole life. [`release_free_memory`] asks
//! `malloc` to hand every free page back (`malloc_trim(0)`, which also `madvise`s free pages in
//! the middle of the heap away): called once at such a point, never on a timer, so idle stays
//! free of wakeups.

/// Hands every page `malloc` holds free back to the kernel. Costs a walk of the heap (tens of
/// microseconds for a few MiB): call it where a process settles, not in a hot path.
pub fn release_free_memory() {
    // SAFETY: malloc_trim only reorganises malloc's own free lists; it takes no pointer and
    // is safe to call from any thread at any time.
    unsafe {
        libc::malloc_trim(0);
    }
}
