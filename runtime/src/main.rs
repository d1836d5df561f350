//! The `hone` command.

fn main() {
    // Die quietly on a closed pipe (`hone plugins | head`), like other CLIs,
    // instead of panicking on a failed print.
    #[cfg(unix)]
    // SAFETY: restoring the default disposition of SIGPIPE at start-up.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    hone::allocator::keep_freed_memory();
    hone::kernel_threads::one_kernel_pool();
    let code = hone::cli::main();
    // Our own exit: the handler that names a stage calling exit() stays quiet.
    hone::last_breath::exiting();
    std::process::exit(code);
}
