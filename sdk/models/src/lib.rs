//! hone's model core on candle: a byte tokenizer, a GPT-style causal LM with
//! a KV cache, reward and value heads, checkpoints, training utilities and
//! sampling.
//!
//! Every layer is written from differentiable candle primitives: candle's
//! fused layer norm, softmax-last-dim and SDPA ops have no backward pass and
//! would silently stop gradients.

pub mod checkpoint;
pub mod device;
mod error;
pub mod gpt;
pub mod heads;
pub mod reward;
pub mod sample;
pub mod tokenizer;
pub mod train;

pub use candle_core::{DType, Device, Tensor, Var};
pub use candle_nn::{VarBuilder, VarMap};
pub use error::{Error, Result};
