//! Out-of-tree plugins: a crate scaffolded by `hone new-stage` builds against
//! the SDK, loads with `--plugin-path` and runs; an incompatible library is
//! refused with both versions named.

use hone_tests::{hone, read_lines, text, workspace, TempDir};
use std::process::Command;

#[test]
fn scaffolded_stage_builds_loads_by_path_and_runs() {
    let dir = TempDir::new("newstage");
    let out = hone(
        &dir.0,
        &["new-stage", "my-tagger", "--dir", dir.0.to_str().unwrap()],
    );
    assert_eq!(out.status.code(), Some(0), "{:?}", text(&out));
    let krate = dir.join("my-tagger");
    // Shared target dir: later runs reuse the compiled SDK.
    let target = workspace().join("target/scaffold-test");
    let build = Command::new(env!("CARGO"))
        .args(["build", "--quiet", "--manifest-path"])
        .arg(krate.join("Cargo.toml"))
        .env("CARGO_TARGET_DIR", &target)
        .output()
        .expect("cargo runs");
    assert!(
        build.status.success(),
        "{}",
        String::from_utf8_lossy(&build.stderr)
    );
    let plugin_dir = target.join("debug");

    let out = hone(
        &dir.0,
        &["plugins", "--plugin-path", plugin_dir.to_str().unwrap()],
    );
    assert!(text(&out).0.contains("my_tagger.tag"), "{:?}", text(&out));

    let pipeline = dir.write(
        "p.toml",
        r#"[pipeline]
name = "tagged"

[stages.gen]
kind = "testing.generate-pairs"
config = { count = 5 }

[stages.tag]
kind = "my_tagger.tag"
inputs = ["gen"]
config = { label = "third-party" }

[stages.write]
kind = "jsonl.write"
inputs = ["tag"]
"#,
    );
    let p = pipeline.to_str().unwrap();
    // Without the plugin path the kind is unknown, and the error says how to fix it.
    let out = hone(&dir.0, &["validate", p]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out).1.contains("--plugin-path"), "{:?}", text(&out));

    let out = hone(
        &dir.0,
        &[
            "run",
            p,
            "--plugin-path",
            plugin_dir.to_str().unwrap(),
            "-q",
        ],
    );
    assert_eq!(out.status.code(), Some(0), "{:?}", text(&out));
    let lines = read_lines(&dir.join("runs/tagged/outputs/write/records.jsonl"));
    assert_eq!(lines.len(), 5);
    for line in lines {
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["meta"]["tag"], "third-party");
    }
}

#[test]
fn incompatible_plugin_is_refused_with_both_versions() {
    let dir = TempDir::new("badabi");
    let src = dir.write(
        "bad.rs",
        r#"#[repr(C)]
pub struct Table { abi_version: u32 }
static TABLE: Table = Table { abi_version: 99 };
#[no_mangle]
pub extern "C" fn hone_plugin_entry_v1() -> *const Table { &TABLE }
"#,
    );
    let libs = dir.join("libs");
    std::fs::create_dir_all(&libs).unwrap();
    let lib = libs.join(format!(
        "{}bad{}",
        std::env::consts::DLL_PREFIX,
        std::env::consts::DLL_SUFFIX
    ));
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let status = Command::new(rustc)
        .args(["--crate-type", "cdylib", "--edition", "2021", "-o"])
        .arg(&lib)
        .arg(&src)
        .status()
        .expect("rustc runs");
    assert!(status.success());
    let out = hone(
        &dir.0,
        &["plugins", "--plugin-path", libs.to_str().unwrap()],
    );
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(0));
    assert!(stderr.contains("plugin refused"), "{stderr}");
    assert!(stderr.contains("plugin ABI version 99"), "{stderr}");
    assert!(
        stderr.contains(&format!("ABI version {}", hone_sdk::abi::ABI_VERSION)),
        "{stderr}"
    );
    // The built-in plugins still load.
    assert!(stdout.contains("filter.pairs"));
}
