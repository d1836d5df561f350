//! Checkpoints: a directory of `model.safetensors`, `config.json` and
//! `tokenizer.json`, each written atomically.

use crate::gpt::{Gpt, GptConfig};
use crate::tokenizer::Tokenizer;
use crate::{DType, Device, Error, Result, Tensor, VarBuilder, VarMap};
use std::path::Path;

/// Name of the weights file in a checkpoint directory.
pub const WEIGHTS: &str = "model.safetensors";
/// Name of the config file in a checkpoint directory.
pub const CONFIG: &str = "config.json";

/// Writes `dir/model.safetensors` (the VarMap), `dir/config.json` and
/// `dir/tokenizer.json`, each atomically. Returns the sha256 hex of
/// model.safetensors.
pub fn save<C: serde::Serialize>(
    dir: &Path,
    varmap: &VarMap,
    config: &C,
    tokenizer: &dyn Tokenizer,
) -> Result<String> {
    std::fs::create_dir_all(dir).map_err(|e| Error::file(dir, e))?;
    let weights = dir.join(WEIGHTS);
    // VarMap writes only to a path: write a temporary file beside the target,
    // sync it, then rename over the target.
    let tmp = dir.join(format!(".{WEIGHTS}.tmp-{}", std::process::id()));
    varmap
        .save(&tmp)
        .map_err(|e| Error::file(&weights, format!("cannot write weights: {e}")))?;
    std::fs::File::open(&tmp)
        .and_then(|f| f.sync_all())
        .and_then(|_| std::fs::rename(&tmp, &weights))
        .map_err(|e| Error::file(&weights, e))?;
    let config_path = dir.join(CONFIG);
    let json = serde_json::to_vec_pretty(config)?;
    hone_sdk::fs::atomic_write(&config_path, &json).map_err(|e| Error::file(&config_path, e))?;
    tokenizer.save(dir)?;
    hone_sdk::fs::sha256_file(&weights).map_err(|e| Error::file(&weights, e))
}

/// Reads `dir/config.json` into `C`; errors name the file.
pub fn load_config<C: serde::de::DeserializeOwned>(dir: &Path) -> Result<C> {
    let path = dir.join(CONFIG);
    let text = std::fs::read_to_string(&path).map_err(|e| Error::file(&path, e))?;
    serde_json::from_str(&text).map_err(|e| Error::file(&path, e))
}

/// Loads `dir/model.safetensors` into an existing VarMap whose variables were
/// created by building the model with [`VarBuilder::from_varmap`].
pub fn load_weights(dir: &Path, varmap: &mut VarMap) -> Result<()> {
    let path = dir.join(WEIGHTS);
    if !path.is_file() {
        return Err(Error::file(&path, "no such file"));
    }
    varmap.load(&path).map_err(|e| Error::file(&path, e))
}

/// Builds a [`Gpt`] (f32) from `dir` (config and weights) on `device`,
/// returning its VarMap too so that it can be trained further.
pub fn load_gpt(dir: &Path, device: &Device) -> Result<(Gpt, VarMap)> {
    let cfg: GptConfig = load_config(dir)?;
    let mut varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, device);
    let gpt = Gpt::new(&cfg, vb)?;
    load_weights(dir, &mut varmap)?;
    Ok((gpt, varmap))
}

/// Every variable of a VarMap by name (sorted), with its shape and its
/// values as f32: a checkpoint held in memory, for a stage's snapshot.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct WeightsState(pub Vec<(String, Vec<usize>, Vec<f32>)>);

/// The weights of `varmap`, for a snapshot.
pub fn weights_state(varmap: &VarMap) -> Result<WeightsState> {
    let data = varmap.data().lock().expect("VarMap lock poisoned");
    let mut names: Vec<&String> = data.keys().collect();
    names.sort();
    names
        .into_iter()
        .map(|name| {
            let t = data[name].as_tensor();
            let values = t.flatten_all()?.to_dtype(DType::F32)?.to_vec1()?;
            Ok((name.clone(), t.dims().to_vec(), values))
        })
        .collect::<Result<_>>()
        .map(WeightsState)
}

/// Sets the variables of `varmap` (built like the one the state came
/// from) to the weights in `state`; a missing, extra or reshaped variable
/// is an error naming it, and nothing is set.
pub fn restore_weights(varmap: &VarMap, state: &WeightsState) -> Result<()> {
    let data = varmap.data().lock().expect("VarMap lock poisoned");
    if data.len() != state.0.len() {
        return Err(Error::Invalid(format!(
            "the snapshot holds {} variables, the model {}",
            state.0.len(),
            data.len()
        )));
    }
    let mut values = Vec::with_capacity(state.0.len());
    for (name, dims, v) in &state.0 {
        let var = data.get(name).ok_or_else(|| {
            Error::Invalid(format!(
                "the snapshot's variable `{name}` is not in the model"
            ))
        })?;
        if var.dims() != dims.as_slice() || v.len() != var.elem_count() {
            return Err(Error::Invalid(format!(
                "variable `{name}` is {:?} in the model and {dims:?} in the snapshot",
                var.dims()
            )));
        }
        let t = Tensor::from_slice(v, dims.as_slice(), var.device())?.to_dtype(var.dtype())?;
        values.push((var, t));
    }
    for (var, t) in values {
        var.set(&t)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpt::tests::{ids, tiny};
    use crate::tokenizer::ByteTokenizer;

    fn temp_dir(name: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("hone-ckpt-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn save_then_load_gives_identical_logits() {
        let dir = temp_dir("roundtrip");
        let (gpt, varmap) = tiny(11);
        let sha = save(&dir, &varmap, gpt.config(), &ByteTokenizer).unwrap();
        assert_eq!(sha.len(), 64);
        assert_eq!(sha, hone_sdk::fs::sha256_file(&dir.join(WEIGHTS)).unwrap());
        let (loaded, _) = load_gpt(&dir, &Device::Cpu).unwrap();
        assert_eq!(loaded.config(), gpt.config());
        let x = ids(&[&[3, 1, 4, 1, 5]]);
        let a: Vec<f32> = gpt
            .forward(&x)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let b: Vec<f32> = loaded
            .forward(&x)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(a, b);
        assert!(crate::tokenizer::load_tokenizer(&dir).is_ok());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn weights_state_round_trips_and_refuses_another_model() {
        let (gpt, varmap) = tiny(11);
        let state = weights_state(&varmap).unwrap();
        let (other, other_vars) = tiny(12);
        let x = ids(&[&[3, 1, 4]]);
        let logits = |g: &Gpt| -> Vec<f32> {
            g.forward(&x)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap()
        };
        assert_ne!(logits(&gpt), logits(&other));
        restore_weights(&other_vars, &state).unwrap();
        assert_eq!(logits(&gpt), logits(&other));
        let mut missing = state.clone();
        missing.0.pop();
        assert!(restore_weights(&other_vars, &missing).is_err());
        let mut renamed = state.clone();
        renamed.0[0].0 = "nope".into();
        let err = restore_weights(&other_vars, &renamed)
            .unwrap_err()
            .to_string();
        assert!(err.contains("`nope`"), "{err}");
    }

    #[test]
    fn load_errors_name_the_file() {
        let dir = temp_dir("errors");
        let err = load_config::<GptConfig>(&dir).unwrap_err().to_string();
        assert!(err.contains("config.json"), "{err}");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(CONFIG), "{\"vocab_size\": 3}").unwrap();
        let err = load_config::<GptConfig>(&dir).unwrap_err().to_string();
        assert!(
            err.contains("config.json") && err.contains("d_model"),
            "{err}"
        );
        let mut varmap = VarMap::new();
        let err = load_weights(&dir, &mut varmap).unwrap_err().to_string();
        assert!(err.contains("model.safetensors"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
