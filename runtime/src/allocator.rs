//! The process's allocator settings.

/// Keeps freed memory in the process instead of handing it back to the
/// kernel. A training step frees and reallocates the same tensor sizes every
/// step; with glibc's defaults each large buffer is a fresh `mmap`, so every
/// step pays page faults, zeroing and TLB shootdowns on the VMs we run on
/// (see docs/benchmarks.md). Call it first in `main`, before any thread starts.
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only tunes glibc's allocator; the caller runs it
    // before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, i32::MAX);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
}
