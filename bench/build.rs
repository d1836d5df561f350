//! hone-bench links plugin crates in-process as baselines (hone-testing,
//! hone-rm). Each plugin crate exports the same C entry symbol
//! (`hone_plugin_entry_v1`, from `hone_sdk::export_stages!`) for its cdylib;
//! linked together as rlibs they collide. The benchmark never calls the entry
//! symbol itself (it loads plugins from their .so files), so let the linker
//! keep the first definition.

fn main() {
    println!("cargo:rustc-link-arg-bins=-Wl,--allow-multiple-definition");
}
