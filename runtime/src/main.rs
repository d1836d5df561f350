//! The `hone` command.

fn main() {
    std::process::exit(hone::cli::main());
}
