//! The growing buffers of a KV cache, shared by hone's GPT and the Llama
//! port: a decoding step writes into room already there instead of
//! concatenating (and so copying) every earlier key and value.

use candle_core::Tensor;

/// Writes `k` and `v` (`[B, H, T, HD]`, positions `offset..offset + T`)
/// into the slot's buffers, growing them by whole chunks of `chunk`
/// positions when full, and returns views of positions `0..offset + T`.
/// The buffers are written in place, so a cache built on them is for
/// inference: no gradient flows through it, and a copy of the slot would
/// share them.
pub fn append(
    slot: &mut Option<(Tensor, Tensor)>,
    k: &Tensor,
    v: &Tensor,
    offset: usize,
    chunk: usize,
) -> candle_core::Result<(Tensor, Tensor)> {
    let (b, h, t, hd) = k.dims4()?;
    let end = offset + t;
    let room = slot.as_ref().map_or(0, |(kb, _)| kb.dim(2).unwrap_or(0));
    if room < end {
        let cap = end.div_ceil(chunk.max(1)) * chunk.max(1);
        let kb = Tensor::zeros((b, h, cap, hd), k.dtype(), k.device())?;
        let vb = kb.zeros_like()?;
        if let Some((old_k, old_v)) = slot.take() {
            if offset > 0 {
                kb.slice_set(&old_k.narrow(2, 0, offset)?.contiguous()?, 2, 0)?;
                vb.slice_set(&old_v.narrow(2, 0, offset)?.contiguous()?, 2, 0)?;
            }
        }
        *slot = Some((kb, vb));
    }
    let (kb, vb) = slot.as_ref().expect("made above");
    kb.slice_set(&k.contiguous()?, 2, offset)?;
    vb.slice_set(&v.contiguous()?, 2, offset)?;
    Ok((kb.narrow(2, 0, end)?, vb.narrow(2, 0, end)?))
}
