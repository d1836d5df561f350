//! Device selection by name.

use crate::{Device, Error, Result};

/// The message when CUDA is requested from a build without the `cuda` feature.
pub const NO_CUDA: &str = "hone was built without CUDA: on a machine with the CUDA toolkit, rebuild the built-in stages with `cargo build --release --features hone-lm/cuda` (a stage of your own: enable the `cuda` feature of hone-models)";

/// `"cpu"` gives [`Device::Cpu`]; `"cuda"` / `"cuda:N"` give CUDA device 0 /
/// N when compiled with the feature `cuda`, and otherwise an error naming
/// the feature.
pub fn device(name: &str) -> Result<Device> {
    let name = name.trim();
    let ordinal = match name {
        "cpu" => return Ok(Device::Cpu),
        "cuda" => 0,
        _ => match name.strip_prefix("cuda:") {
            Some(n) => n.parse::<usize>().map_err(|_| {
                Error::Device(format!(
                    "device {name:?}: the CUDA ordinal {n:?} is not a number (write e.g. \"cuda:0\")"
                ))
            })?,
            None => {
                return Err(Error::Device(format!(
                    "unknown device {name:?}: expected \"cpu\", \"cuda\" or \"cuda:N\""
                )))
            }
        },
    };
    cuda(ordinal)
}

#[cfg(feature = "cuda")]
fn cuda(ordinal: usize) -> Result<Device> {
    Ok(Device::new_cuda(ordinal)?)
}

#[cfg(not(feature = "cuda"))]
fn cuda(_ordinal: usize) -> Result<Device> {
    Err(Error::Device(NO_CUDA.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_is_cpu() {
        assert!(device("cpu").unwrap().is_cpu());
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn cuda_without_feature_names_the_feature() {
        for name in ["cuda", "cuda:1"] {
            let err = device(name).unwrap_err().to_string();
            assert!(err.contains("--features hone-lm/cuda"), "{err}");
        }
    }

    #[test]
    fn unknown_device_is_an_error() {
        let err = device("tpu").unwrap_err().to_string();
        assert!(err.contains("tpu"), "{err}");
        assert!(device("cuda:x").is_err());
    }
}
