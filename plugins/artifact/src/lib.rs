//! The `artifact` stage family: artifacts that outlive their run.
//!
//! `artifact.load` points a pipeline at a model (or dataset) written by an
//! earlier run, or at any directory holding hone's checkpoint files, the way
//! `from_pretrained(path)` works in Hugging Face tools: a reward model trained
//! once can score new data without being trained again.
//!
//! When the file lies in a hone run directory (a parent holding the
//! `.hone-run` marker and `manifest.jsonl`), it is verified before anything runs: its sha256 must be
//! the one that run's manifest recorded, and its kind and lineage are taken
//! from there, so `rm.warm`'s shared-initialisation check works across runs.
//! The artifact is referenced where it is, by absolute path, not copied: a
//! model can be hundreds of megabytes.

use hone_sdk::fs::sha256_file;
use hone_sdk::prelude::*;
use serde::Deserialize;
use std::path::{Path, PathBuf};

/// The artifact kinds hone's stages exchange.
const KINDS: &[&str] = &["policy", "reward-model", "dataset"];

/// The main file of a checkpoint directory (what the manifest hashes).
const MODEL_FILE: &str = "model.safetensors";

#[derive(Deserialize)]
struct LoadConfig {
    path: PathBuf,
    kind: String,
}

/// What was found at the path: the file, its kind, and where it came from.
#[derive(Debug, Clone, PartialEq)]
struct Found {
    file: PathBuf,
    kind: String,
    sha256: String,
    /// The earlier run's record of it: (artifact id, lineage, run directory).
    origin: Option<(String, Vec<String>, PathBuf)>,
}

/// Emits one artifact loaded from a path, in round 0.
pub struct Load {
    found: Found,
}

impl StageFactory for Load {
    fn descriptor() -> StageDescriptor {
        StageDescriptor::new(
            "artifact.load",
            "Loads an artifact from a path: a checkpoint directory of an earlier run (its sha256 \
             verified against that run's manifest.jsonl, its lineage carried over) or any \
             directory holding hone's checkpoint files.",
        )
        .output("artifact", RecordKind::Artifact(ArtifactKind::Any))
        .required(
            "path",
            FieldType::Path,
            "The checkpoint directory (holding model.safetensors) or the artifact's file, e.g. \
             \"../runs/rm/outputs/rm/member-0\".",
        )
        .optional(
            "kind",
            FieldType::one_of(&["auto", "policy", "reward-model", "dataset"]),
            "auto",
            "The artifact kind. `auto`: the kind the earlier run's manifest recorded, or else \
             `reward-model` for a directory with reward.json and `policy` for one with \
             config.json.",
        )
    }

    fn create(init: &StageInit) -> Result<Self, StageError> {
        let config: LoadConfig = init.config()?;
        let found = find(&config.path, &config.kind).map_err(|e| StageError::config("path", e))?;
        Ok(Load { found })
    }
}

impl Stage for Load {
    fn on_round_end(&mut self, ctx: &mut Context) -> Result<(), StageError> {
        if ctx.round() > 0 {
            return Ok(());
        }
        let found = &self.found;
        // The file may have changed since `create` verified it.
        let now = sha256_file(&found.file)
            .map_err(|e| StageError::new(format!("cannot read {}: {e}", found.file.display())))?;
        if now != found.sha256 {
            return Err(StageError::new(format!(
                "{} changed while the run started (sha256 {} when checked, {now} now)",
                found.file.display(),
                found.sha256
            )));
        }
        let mut lineage = Vec::new();
        let mut inputs = Vec::new();
        match &found.origin {
            Some((id, earlier, run)) => {
                lineage.push(format!(
                    "loaded {id} from run {} (sha256 verified against its manifest)",
                    run.display()
                ));
                lineage.extend(earlier.iter().cloned());
                inputs.push(id.clone());
            }
            None => lineage.push(format!(
                "loaded from {} (not in a run directory: unverified)",
                found.file.display()
            )),
        }
        let artifact = ctx.register_artifact(&found.kind, &found.file, inputs, lineage)?;
        ctx.log(format!(
            "{} {} from {}",
            found.kind,
            artifact.id,
            found.file.display()
        ));
        ctx.emit(0, Record::Artifact(artifact));
        Ok(())
    }
}

/// Resolves `path` to the artifact's file, its kind and origin, verifying it
/// against the manifest of the run directory it lies in.
fn find(path: &Path, kind: &str) -> Result<Found, String> {
    let file = if path.is_dir() {
        let file = path.join(MODEL_FILE);
        if !file.is_file() {
            return Err(format!(
                "{} holds no {MODEL_FILE}: give a checkpoint directory (e.g. an earlier run's \
                 outputs/STAGE/final) or the artifact's file itself",
                path.display()
            ));
        }
        file
    } else if path.is_file() {
        path.to_path_buf()
    } else {
        return Err(format!("{} does not exist", path.display()));
    };
    let file = file
        .canonicalize()
        .map_err(|e| format!("cannot resolve {}: {e}", file.display()))?;
    let sha256 = sha256_file(&file).map_err(|e| format!("cannot read {}: {e}", file.display()))?;
    let recorded = match run_dir_of(&file) {
        Some(run) => Some(manifest_entry(&run, &file)?),
        None => None,
    };
    let origin = match &recorded {
        Some(entry) => {
            if entry.sha256 != sha256 {
                return Err(format!(
                    "{} has sha256 {sha256}, but {} recorded {} for it: the file changed after \
                     its run wrote it; refusing to load it",
                    file.display(),
                    entry.manifest.display(),
                    entry.sha256
                ));
            }
            Some((
                entry.id.clone(),
                entry.lineage.clone(),
                entry
                    .manifest
                    .parent()
                    .map(Path::to_path_buf)
                    .unwrap_or_default(),
            ))
        }
        None => None,
    };
    let detected = recorded
        .as_ref()
        .map(|e| e.kind.clone())
        .or_else(|| detect_kind(&file));
    let kind = match (kind, detected) {
        ("auto", Some(k)) => k,
        ("auto", None) => {
            return Err(format!(
                "cannot tell what kind of artifact {} is: set `kind` to one of {}",
                file.display(),
                KINDS.join(", ")
            ))
        }
        (wanted, Some(k)) if recorded.is_some() && k != wanted => {
            return Err(format!(
                "`kind = \"{wanted}\"`, but the run that wrote {} recorded it as a {k}",
                file.display()
            ))
        }
        (wanted, _) => wanted.to_string(),
    };
    Ok(Found {
        file,
        kind,
        sha256,
        origin,
    })
}

/// `reward-model` for a checkpoint with reward.json, `policy` for one with
/// config.json.
fn detect_kind(file: &Path) -> Option<String> {
    let dir = file.parent()?;
    if dir.join("reward.json").is_file() {
        Some("reward-model".into())
    } else if dir.join("config.json").is_file() {
        Some("policy".into())
    } else {
        None
    }
}

/// The nearest hone run directory above `file`: one holding the run marker
/// and a `manifest.jsonl` (a stray manifest elsewhere proves nothing).
fn run_dir_of(file: &Path) -> Option<PathBuf> {
    file.ancestors()
        .skip(1)
        .find(|d| d.join("manifest.jsonl").is_file() && d.join(".hone-run").is_file())
        .map(Path::to_path_buf)
}

/// One manifest line, the fields this stage reads.
#[derive(Deserialize)]
struct ManifestLine {
    id: String,
    kind: String,
    path: String,
    sha256: String,
    #[serde(default)]
    lineage: Vec<String>,
}

/// What a run's manifest recorded for a file.
struct Entry {
    manifest: PathBuf,
    id: String,
    kind: String,
    sha256: String,
    lineage: Vec<String>,
}

/// The last entry of `run`'s manifest for `file`; an error when the manifest
/// cannot be read or does not list the file (it cannot then be verified).
fn manifest_entry(run: &Path, file: &Path) -> Result<Entry, String> {
    let manifest = run.join("manifest.jsonl");
    let text = std::fs::read_to_string(&manifest)
        .map_err(|e| format!("cannot read {}: {e}", manifest.display()))?;
    let run = run.canonicalize().unwrap_or(run.to_path_buf());
    let mut found = None;
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let entry: ManifestLine = serde_json::from_str(line)
            .map_err(|e| format!("{}:{}: not a manifest line: {e}", manifest.display(), i + 1))?;
        let path = Path::new(&entry.path);
        let listed = if path.is_absolute() {
            path.to_path_buf()
        } else {
            run.join(path)
        };
        if listed.canonicalize().ok().as_deref() == Some(file) {
            found = Some(entry);
        }
    }
    let entry = found.ok_or_else(|| {
        format!(
            "{} lies in the run directory {} but its manifest.jsonl does not list it, so it \
             cannot be verified: give a file the run registered (e.g. its outputs/STAGE/final/\
             {MODEL_FILE}), or copy it out of the run directory to load it unverified",
            file.display(),
            run.display()
        )
    })?;
    Ok(Entry {
        manifest,
        id: entry.id,
        kind: entry.kind,
        sha256: entry.sha256,
        lineage: entry.lineage,
    })
}

hone_sdk::export_stages!(Load);

#[cfg(test)]
mod tests {
    use super::*;

    fn temp(label: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("hone-artifact-{label}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// A run directory with one registered reward model.
    fn run_with_model(label: &str) -> (PathBuf, PathBuf) {
        let run = temp(label);
        let ckpt = run.join("outputs/rm/member-0");
        std::fs::create_dir_all(&ckpt).unwrap();
        std::fs::write(ckpt.join(MODEL_FILE), b"weights").unwrap();
        std::fs::write(ckpt.join("reward.json"), b"{}").unwrap();
        let sha = hone_sdk::fs::sha256_hex(b"weights");
        let line = serde_json::json!({
            "id": "rm/member-0/model.safetensors@0", "kind": "reward-model",
            "path": "outputs/rm/member-0/model.safetensors", "sha256": sha,
            "lineage": ["shared init: scratch:init_seed=1"], "inputs": [],
        });
        std::fs::write(run.join("manifest.jsonl"), format!("{line}\n")).unwrap();
        std::fs::write(run.join(".hone-run"), "{}").unwrap();
        (run, ckpt)
    }

    #[test]
    fn a_registered_checkpoint_is_verified_and_keeps_its_lineage() {
        let (run, ckpt) = run_with_model("ok");
        let found = find(&ckpt, "auto").unwrap();
        assert_eq!(found.kind, "reward-model");
        let (id, lineage, from) = found.origin.unwrap();
        assert_eq!(id, "rm/member-0/model.safetensors@0");
        assert_eq!(lineage, ["shared init: scratch:init_seed=1"]);
        assert_eq!(from, run.canonicalize().unwrap());
        // A kind the manifest contradicts is refused.
        let e = find(&ckpt, "policy").unwrap_err();
        assert!(e.contains("recorded it as a reward-model"), "{e}");
        std::fs::remove_dir_all(run).unwrap();
    }

    #[test]
    fn a_tampered_checkpoint_is_refused_naming_both_hashes() {
        let (run, ckpt) = run_with_model("tampered");
        std::fs::write(ckpt.join(MODEL_FILE), b"weightz").unwrap();
        let e = find(&ckpt, "auto").unwrap_err();
        assert!(
            e.contains(&hone_sdk::fs::sha256_hex(b"weightz"))
                && e.contains(&hone_sdk::fs::sha256_hex(b"weights"))
                && e.contains("refusing to load it"),
            "{e}"
        );
        std::fs::remove_dir_all(run).unwrap();
    }

    #[test]
    fn unlisted_missing_and_bare_files() {
        let (run, ckpt) = run_with_model("unlisted");
        std::fs::write(ckpt.join("other.bin"), b"x").unwrap();
        let e = find(&ckpt.join("other.bin"), "dataset").unwrap_err();
        assert!(e.contains("does not list it"), "{e}");
        let e = find(&run.join("absent"), "auto").unwrap_err();
        assert!(e.contains("does not exist"), "{e}");
        let e = find(&run.join("outputs"), "auto").unwrap_err();
        assert!(e.contains("holds no model.safetensors"), "{e}");
        // Outside any run: loaded unverified, kind from the files.
        let bare = temp("bare");
        std::fs::write(bare.join(MODEL_FILE), b"w").unwrap();
        let e = find(&bare, "auto").unwrap_err();
        assert!(e.contains("set `kind`"), "{e}");
        std::fs::write(bare.join("config.json"), b"{}").unwrap();
        let found = find(&bare, "auto").unwrap();
        assert_eq!((found.kind.as_str(), found.origin), ("policy", None));
        std::fs::remove_dir_all(run).unwrap();
        std::fs::remove_dir_all(bare).unwrap();
    }
}
