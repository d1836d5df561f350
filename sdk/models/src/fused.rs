//! hone's fused ops for models outside this crate (hone_pretrained's BERT):
//! each one op with its own backward pass, on the CPU in f32 and f64, and
//! the composition of candle primitives it replaces elsewhere. candle's own
//! fused layer norm and softmax have no backward pass, and its element-wise
//! GELU calls libm once per element; the models of this crate call the same
//! ops directly.

use candle_core::{Result, Tensor};

/// Layer norm over the last dimension, weight and bias `[D]`: differentiable
/// in all three.
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    crate::ops::layer_norm(x, weight, bias, eps)
}

/// GELU in its exact form, `x Phi(x)` (candle's `gelu_erf`, BERT's).
pub fn gelu_erf(x: &Tensor) -> Result<Tensor> {
    crate::ops::gelu_erf(x)
}

/// GELU, tanh approximation (candle's `gelu`).
pub fn gelu(x: &Tensor) -> Result<Tensor> {
    crate::ops::gelu(x)
}

/// Self-attention over a padded batch, not causal, with its backward pass:
/// `qkv` `[B, T, 3D]` holds each position's query, key and value
/// projections side by side (each `n_heads` heads of `D / n_heads`), and
/// the queries of batch element b see its first `lengths[b]` keys, the
/// rest being padding (each length in `1..=T`). Returns `[B, T, D]`, the
/// heads side by side; padding positions' outputs are the caller's to
/// ignore, as in Hugging Face's BERT.
pub fn padded_self_attention(qkv: &Tensor, n_heads: usize, lengths: &[usize]) -> Result<Tensor> {
    crate::attention::padded_self_attention(qkv, n_heads, lengths)
}

/// The same attention from differentiable primitives under any additive
/// `mask` broadcasting to `[B, n_heads, T, T]` (0 where a query sees a key,
/// a very negative value where it does not): for masks that are not
/// padding at the end, which [`padded_self_attention`] covers fast.
pub fn masked_self_attention(qkv: &Tensor, n_heads: usize, mask: &Tensor) -> Result<Tensor> {
    crate::attention::masked_reference(qkv, n_heads, mask)
}
