//! The `hone` command.

fn main() {
    // Die quietly on a closed pipe (`hone plugins | head`), like other CLIs,
    // instead of panicking on a failed print.
    #[cfg(unix)]
    // SAFETY: restoring the default disposition of SIGPIPE at start-up.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    std::process::exit(hone::cli::main());
}
