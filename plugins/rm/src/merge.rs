//! Streamed weight averaging of safetensors files (WARM).

use candle_core::safetensors::MmapedSafetensors;
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
/// normalised to sum to 1. Streamed: one input at a time is memory-mapped
/// and added into f32 running sums (`sum += w * x`, one pass per tensor),
/// so peak memory is about two models whatever the number of inputs. The output keeps input 0's dtypes and is written
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
    // Running sums: for each tensor its shape, input 0's dtype and an f32
    // buffer. Each input is memory-mapped and added in one fused pass,
    // `sum += w * x`, tensor by tensor: resident memory is the sums plus the
    // pages of the one input being read.
    let mut sums: HashMap<String, (Vec<usize>, DType, Vec<f32>)> = HashMap::new();
    for (i, path) in inputs.iter().enumerate() {
        let w = (weights[i] / total) as f32;
        // SAFETY: the map is only read; hone writes checkpoints atomically
        // (temporary file, then rename), so a mapped file is never rewritten
        // in place while this merge reads it.
        let file = unsafe { MmapedSafetensors::new(path) }
            .map_err(|e| other(format!("cannot read {}: {e}", path.display())))?;
        let mut views = file.tensors();
        views.sort_by(|a, b| a.0.cmp(&b.0));
        let mismatch = |what: String| MergeError::Mismatch { other: i, what };
        if i > 0 {
            let mut missing: Vec<&String> = sums
                .keys()
                .filter(|k| views.binary_search_by(|v| v.0.cmp(k)).is_err())
                .collect();
            let mut extra: Vec<&String> = views
                .iter()
                .map(|v| &v.0)
                .filter(|k| !sums.contains_key(*k))
                .collect();
            if !missing.is_empty() || !extra.is_empty() {
                missing.sort();
                extra.sort();
                return Err(mismatch(format!(
                    "tensor names differ (missing {missing:?}, extra {extra:?})"
                )));
            }
            for (name, view) in &views {
                let shape = &sums[name].0;
                if view.shape() != shape.as_slice() {
                    return Err(mismatch(format!(
                        "tensor {name} has shape {:?} here but {shape:?} in input 0",
                        view.shape()
                    )));
                }
            }
        }
        for (name, view) in views {
            let dtype = DType::try_from(view.dtype())
                .map_err(|e| other(format!("{}: tensor {name}: {e}", path.display())))?;
            let (_, _, sum) = sums.entry(name.clone()).or_insert_with(|| {
                let n = view.shape().iter().product();
                (view.shape().to_vec(), dtype, vec![0.0; n])
            });
            if dtype == DType::F32 {
                for (s, x) in sum.iter_mut().zip(view.data().chunks_exact(4)) {
                    *s += w * f32::from_le_bytes([x[0], x[1], x[2], x[3]]);
                }
            } else {
                let values: Vec<f32> = file
                    .load(&name, &Device::Cpu)
                    .and_then(|t| t.to_dtype(DType::F32)?.flatten_all()?.to_vec1())
                    .map_err(|e| other(format!("{}: tensor {name}: {e}", path.display())))?;
                for (s, x) in sum.iter_mut().zip(values) {
                    *s += w * x;
                }
            }
        }
    }
    let parameters = sums.values().map(|(_, _, v)| v.len()).sum();
    let mut merged = HashMap::with_capacity(sums.len());
    for (name, (shape, dtype, sum)) in sums {
        let t = Tensor::from_vec(sum, shape, &Device::Cpu)
            .and_then(|t| t.to_dtype(dtype))
            .map_err(other)?;
        merged.insert(name, t);
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
