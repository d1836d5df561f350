//! hone's model core on candle: a byte tokenizer, a GPT-style causal LM with
//! a KV cache, reward and value heads, checkpoints, training utilities and
//! sampling.
//!
//! Every layer is differentiable: candle's fused layer norm, softmax-last-dim
//! and SDPA ops have no backward pass and would silently stop gradients, so
//! layers are written from candle primitives, except layer norm, the causal
//! softmax of attention and GELU, which are this crate's fused CPU ops with
//! their own backward pass (`ops`, checked against the primitives), and the
//! linear layer (`linear`, one gemm each way, checked against candle's).

pub mod adamw;
mod attention;
pub mod batches;
pub mod checkpoint;
pub mod device;
mod error;
pub mod fused;
pub mod gpt;
pub mod heads;
pub mod kv_buffers;
pub mod linear;
pub mod lora;
mod matmul;
mod ops;
pub mod picked_logprobs;
pub mod policy_gradient;
pub mod ppo;
pub mod preference;
pub mod reward;
pub mod sample;
pub mod tokenizer;
pub mod train;

pub use candle_core::{DType, Device, Tensor, Var};
pub use candle_nn::{VarBuilder, VarMap};
pub use error::{Error, Result};
