//! Streamed weight averaging of safetensors files (WARM).

use hone_models::{DType, Device, Tensor};
use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};

/// What a merge did.
#[derive(Debug, Clone, PartialEq)]
pub struct MergeStats {
    /// Number of models averaged.
    pub members: usize,
    /// Number of tensors in each model.
    pub tensors: usize,
    /// Number of scalar parameters in each model.
    pub parameters: usize,
}

/// Why a merge failed.
#[derive(Debug, Clone, PartialEq)]
pub enum MergeError {
    /// Input `other` does not match input 0 (tensor names or shapes); says what differs.
    Mismatch {
        /// Index of the input that differs from input 0.
        other: usize,
        /// What differs.
        what: String,
    },
    /// Bad arguments, or a file could not be read or written.
    Other(String),
}

impl fmt::Display for MergeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MergeError::Mismatch { other, what } => {
                write!(f, "input {other} does not match input 0: {what}")
            }
            MergeError::Other(msg) => f.write_str(msg),
        }
    }
}

impl std::error::Error for MergeError {}

fn other(e: impl fmt::Display) -> MergeError {
    MergeError::Other(e.to_string())
}

/// Writes to `out` the weighted average `sum_i weights[i] * inputs[i]` of
/// safetensors files with the same tensor names and shapes. Weights are
/// normalised to sum to 1. Streamed: one input is loaded at a time and
/// added into f32 running sums, so peak memory is about two models whatever
/// the number of inputs. The output keeps input 0's dtypes and is written
/// atomically (a temporary file renamed over `out`).
pub fn merge(inputs: &[PathBuf], weights: &[f64], out: &Path) -> Result<MergeStats, MergeError> {
    if inputs.is_empty() {
        return Err(other("merge: no inputs"));
    }
    if weights.len() != inputs.len() {
        return Err(other(format!(
            "merge: {} weights for {} inputs",
            weights.len(),
            inputs.len()
        )));
    }
    let total: f64 = weights.iter().sum();
    if weights.iter().any(|w| !w.is_finite() || *w < 0.0) || total <= 0.0 {
        return Err(other(format!(
            "merge: weights must be non-negative with a positive sum, found {weights:?}"
        )));
    }
    let device = Device::Cpu;
    let load = |path: &Path| {
        candle_core::safetensors::load(path, &device)
            .map_err(|e| other(format!("cannot read {}: {e}", path.display())))
    };
    let first = load(&inputs[0])?;
    let dtypes: HashMap<String, DType> =
        first.iter().map(|(k, t)| (k.clone(), t.dtype())).collect();
    let scale = |t: &Tensor, w: f64| -> Result<Tensor, MergeError> {
        t.to_dtype(DType::F32)
            .and_then(|t| t * (w / total))
            .map_err(other)
    };
    let mut sums: HashMap<String, Tensor> = HashMap::with_capacity(first.len());
    for (name, t) in &first {
        sums.insert(name.clone(), scale(t, weights[0])?);
    }
    drop(first);
    for (i, path) in inputs.iter().enumerate().skip(1) {
        let model = load(path)?;
        let mismatch = |what: String| MergeError::Mismatch { other: i, what };
        let mut missing: Vec<&String> = sums.keys().filter(|k| !model.contains_key(*k)).collect();
        let mut extra: Vec<&String> = model.keys().filter(|k| !sums.contains_key(*k)).collect();
        if !missing.is_empty() || !extra.is_empty() {
            missing.sort();
            extra.sort();
            return Err(mismatch(format!(
                "tensor names differ (missing {missing:?}, extra {extra:?})"
            )));
        }
        let mut names: Vec<String> = model.keys().cloned().collect();
        names.sort();
        for name in &names {
            let (t, sum) = (&model[name], &sums[name]);
            if t.dims() != sum.dims() {
                return Err(mismatch(format!(
                    "tensor {name} has shape {:?} here but {:?} in input 0",
                    t.dims(),
                    sum.dims()
                )));
            }
        }
        for name in names {
            let add = scale(&model[&name], weights[i])?;
            let sum = sums.remove(&name).expect("checked above");
            sums.insert(name, (sum + add).map_err(other)?);
        }
    }
    let parameters = sums.values().map(Tensor::elem_count).sum();
    let mut merged = HashMap::with_capacity(sums.len());
    for (name, t) in sums {
        let dtype = dtypes[&name];
        merged.insert(name, t.to_dtype(dtype).map_err(other)?);
    }
    let tensors = merged.len();
    let dir = out.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)
        .map_err(|e| other(format!("cannot create {}: {e}", dir.display())))?;
    let name = out
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    candle_core::safetensors::save(&merged, &tmp)
        .map_err(|e| other(format!("cannot write {}: {e}", out.display())))?;
    std::fs::File::open(&tmp)
        .and_then(|f| f.sync_all())
        .and_then(|_| std::fs::rename(&tmp, out))
        .map_err(|e| other(format!("cannot write {}: {e}", out.display())))?;
    Ok(MergeStats {
        members: inputs.len(),
        tensors,
        parameters,
    })
}
