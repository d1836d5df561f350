//! The `hone` command.

fn main() {
    // Die quietly on a closed pipe (`hone plugins | head`), like other CLIs,
    // instead of panicking on a failed print.
    #[cfg(unix)]
    // SAFETY: restoring the default disposition of SIGPIPE at start-up.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    // Keep freed memory in the process: first touches of fresh pages are
    // expensive on the VMs we run on (see docs/benchmarks.md).
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only tunes glibc's allocator; called before any threads start.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, i32::MAX);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
    let code = hone::cli::main();
    // Our own exit: the handler that names a stage calling exit() stays quiet.
    hone::last_breath::exiting();
    std::process::exit(code);
}
