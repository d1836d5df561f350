//! `hone new-stage`: scaffolds an out-of-tree stage crate.

use std::path::{Path, PathBuf};

/// Where the SDK this hone was built with lives, if it is still there.
pub fn sdk_path() -> Option<PathBuf> {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../sdk"))
        .canonicalize()
        .ok()
}

/// Writes a new stage crate `NAME` under `parent`. Returns its directory.
pub fn new_stage(name: &str, parent: &Path) -> Result<PathBuf, String> {
    let valid = name.chars().next().is_some_and(|c| c.is_ascii_lowercase())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_');
    if !valid {
        return Err(format!(
            "stage name \"{name}\" must start with a lower-case letter and use only a-z, 0-9, `-` and `_`"
        ));
    }
    let dir = parent.join(name);
    if dir.exists() {
        return Err(format!(
            "{} already exists: pick another name or --dir",
            dir.display()
        ));
    }
    let sdk_dep = match sdk_path() {
        Some(p) => format!("hone-sdk = {{ path = {:?} }}", p.to_string_lossy()),
        None => format!("hone-sdk = \"{}\"", hone_sdk::SDK_VERSION),
    };
    let lib_name = name.replace('-', "_");
    let cargo = format!(
        r#"[package]
name = "{name}"
version = "0.1.0"
edition = "2021"

# A hone stage plugin: a dynamic library the runtime loads with --plugin-path.
[lib]
crate-type = ["cdylib"]

[dependencies]
{sdk_dep}
serde = {{ version = "1", features = ["derive"] }}

# Keeps this crate out of any enclosing cargo workspace.
[workspace]
"#
    );
    let lib = format!(
        r#"//! The `{name}` hone stage plugin, scaffolded by `hone new-stage`.

use hone_sdk::prelude::*;
use serde::Deserialize;

/// Tags every preference pair with a label and counts what it sees.
pub struct Tag {{
    config: TagConfig,
    seen: u64,
}}

#[derive(Deserialize)]
struct TagConfig {{
    label: String,
}}

impl StageFactory for Tag {{
    fn descriptor() -> StageDescriptor {{
        StageDescriptor::new("{lib_name}.tag", "Adds meta.tag = LABEL to every preference pair.")
            .input("pairs", RecordKind::PreferencePair)
            .output("pairs", RecordKind::PreferencePair)
            .optional("label", FieldType::String, "{name}", "The tag to add.")
            .placement(Placement::DataParallel)
    }}

    fn create(init: &StageInit) -> Result<Self, StageError> {{
        Ok(Tag {{ config: init.config()?, seen: 0 }})
    }}
}}

impl Stage for Tag {{
    fn on_batch(&mut self, ctx: &mut Context, _port: usize, batch: Vec<Record>) -> Result<(), StageError> {{
        for record in batch {{
            if let Record::Pair(mut pair) = record {{
                pair.meta.insert("tag".into(), self.config.label.clone());
                self.seen += 1;
                ctx.emit(0, Record::Pair(pair));
            }}
        }}
        Ok(())
    }}

    fn on_round_end(&mut self, ctx: &mut Context) -> Result<(), StageError> {{
        ctx.metric("tagged", self.seen as f64);
        self.seen = 0;
        Ok(())
    }}
}}

hone_sdk::export_stages!(Tag);
"#
    );
    let readme = format!(
        "# {name}\n\nA hone stage plugin (kind `{lib_name}.tag`).\n\n```sh\ncargo build --release\n\
         hone plugins --plugin-path target/release\nhone run PIPELINE --plugin-path target/release\n```\n\n\
         In a pipeline:\n\n```toml\n[stages.tag]\nkind = \"{lib_name}.tag\"\ninputs = [\"read\"]\n\
         config = {{ label = \"mine\" }}\n```\n"
    );
    let write = |path: PathBuf, text: &str| {
        std::fs::create_dir_all(path.parent().expect("has parent"))
            .and_then(|_| std::fs::write(&path, text))
            .map_err(|e| format!("cannot write {}: {e}", path.display()))
    };
    write(dir.join("Cargo.toml"), &cargo)?;
    write(dir.join("src/lib.rs"), &lib)?;
    write(dir.join("README.md"), &readme)?;
    Ok(dir)
}
