//! Self-attention as one op with its own backward pass: causal (the GPT),
//! or over each sequence's real keys only (BERT, padded batches).
//!
//! Written from candle primitives, attention is a dozen graph nodes: three
//! narrow/transpose/copy chains that cut q, k and v out of the packed
//! projections, two batched matmuls, the softmax and a transpose back. Their
//! backward pads each narrow's gradient with zeros to the full width, adds
//! the three, and accumulates every node's gradient into a fresh buffer.
//! Here each batch element's heads read q, k and v straight out of the packed
//! `[T, 3D]` rows (strided gemm views, no copies) and write their outputs
//! into their columns of `[T, D]`; the backward recomputes the attention
//! probabilities from q and k (as FlashAttention does, instead of keeping a
//! `[B, H, T, T]` tensor alive between the passes) and writes dq, dk and dv
//! into their columns of the packed gradient. Batch elements run on
//! candle's threads, each product on one.
//!
//! Off the CPU, or for dtypes other than f32/f64, the composition of
//! primitives runs instead; it is also the tests' reference.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Shape, Tensor};

use crate::matmul::{gemm, Mat, MatMut, Threads};
use crate::ops::{dot, par_rows, simd, slice, softmax_in_place, Real};

type CResult<T> = candle_core::Result<T>;

/// softmax(q k^T / sqrt(hd) + causal mask) v for every head, from the
/// packed projections `qkv` `[B, T, 3D]` (q, then k, then v, each `n_heads`
/// heads of `D / n_heads`), as `[B, T, D]` with the heads side by side.
pub(crate) fn causal_self_attention(qkv: &Tensor, n_heads: usize) -> CResult<Tensor> {
    let (_, t, d3) = qkv.dims3()?;
    if n_heads == 0 || d3 % (3 * n_heads) != 0 {
        candle_core::bail!("attention: width {d3} is not 3 x {n_heads} heads");
    }
    let fast = qkv.device().is_cpu() && matches!(qkv.dtype(), DType::F32 | DType::F64);
    if fast && t > 0 && qkv.elem_count() > 0 {
        qkv.contiguous()?.apply_op1(SelfAttention {
            n_heads,
            keys: Keys::Causal,
        })
    } else {
        reference(qkv, n_heads)
    }
}

/// softmax(q k^T / sqrt(hd)) v for every head, not causal, over a padded
/// batch: `qkv` `[B, T, 3D]` packed as for [`causal_self_attention`], and
/// the queries of batch element b see its first `lengths[b]` keys (the
/// rest is padding; padding queries see the same keys, as in Hugging
/// Face's BERT, and their outputs are the caller's to ignore). `[B, T, D]`.
pub(crate) fn padded_self_attention(
    qkv: &Tensor,
    n_heads: usize,
    lengths: &[usize],
) -> CResult<Tensor> {
    let (b, t, d3) = qkv.dims3()?;
    if n_heads == 0 || d3 % (3 * n_heads) != 0 {
        candle_core::bail!("attention: width {d3} is not 3 x {n_heads} heads");
    }
    if lengths.len() != b || lengths.iter().any(|&n| n == 0 || n > t) {
        candle_core::bail!(
            "attention: key lengths {lengths:?} for a batch of {b} sequences of {t} positions \
             (each in 1..={t})"
        );
    }
    let fast = qkv.device().is_cpu() && matches!(qkv.dtype(), DType::F32 | DType::F64);
    if fast && qkv.elem_count() > 0 {
        qkv.contiguous()?.apply_op1(SelfAttention {
            n_heads,
            keys: Keys::First(lengths.to_vec()),
        })
    } else {
        padded_reference(qkv, n_heads, lengths)
    }
}

/// [`padded_self_attention`] from differentiable primitives: an additive
/// mask of 0 for real keys and the dtype's lowest value for padding.
pub(crate) fn padded_reference(qkv: &Tensor, n_heads: usize, lengths: &[usize]) -> CResult<Tensor> {
    let (b, t, _) = qkv.dims3()?;
    let mask: Vec<f32> = lengths
        .iter()
        .flat_map(|&n| (0..t).map(move |j| if j < n { 0.0 } else { f32::MIN }))
        .collect();
    let mask = Tensor::from_vec(mask, (b, 1, 1, t), qkv.device())?.to_dtype(qkv.dtype())?;
    masked_reference(qkv, n_heads, &mask)
}

/// softmax(q k^T / sqrt(hd) + mask) v from differentiable primitives, for
/// packed `qkv` `[B, T, 3D]` and an additive `mask` that broadcasts to
/// `[B, H, T, T]`: any mask, not only padding at the end.
pub(crate) fn masked_reference(qkv: &Tensor, n_heads: usize, mask: &Tensor) -> CResult<Tensor> {
    let (b, t, d3) = qkv.dims3()?;
    let (q, k, v) = split_heads(qkv, n_heads)?;
    let hd = d3 / 3 / n_heads;
    let scores = (q.matmul(&k.t()?)? / (hd as f64).sqrt())?.broadcast_add(mask)?;
    let att = candle_nn::ops::softmax(&scores, candle_core::D::Minus1)?;
    att.matmul(&v)?.transpose(1, 2)?.reshape((b, t, d3 / 3))
}

/// q, k and v, each `[B, H, T, HD]`, out of the packed `[B, T, 3D]`.
fn split_heads(qkv: &Tensor, n_heads: usize) -> CResult<(Tensor, Tensor, Tensor)> {
    let (b, t, d3) = qkv.dims3()?;
    let qkv = qkv.reshape((b, t, 3, n_heads, d3 / 3 / n_heads))?;
    let heads = |i: usize| -> CResult<Tensor> {
        qkv.narrow(2, i, 1)?
            .squeeze(2)?
            .transpose(1, 2)?
            .contiguous()
    };
    Ok((heads(0)?, heads(1)?, heads(2)?))
}

/// Which keys each query sees.
#[derive(Clone)]
enum Keys {
    /// Query i sees keys 0..=i.
    Causal,
    /// Every query of batch element b sees keys 0..n_b.
    First(Vec<usize>),
}

impl Keys {
    /// The keys of batch element `e`'s queries.
    fn of(&self, e: usize) -> Seen {
        match self {
            Keys::Causal => Seen::Causal,
            Keys::First(n) => Seen::First(n[e]),
        }
    }
}

/// [`Keys`] of one batch element.
#[derive(Clone, Copy)]
enum Seen {
    Causal,
    First(usize),
}

/// The same attention from differentiable primitives.
pub(crate) fn reference(qkv: &Tensor, n_heads: usize) -> CResult<Tensor> {
    let (b, t, d3) = qkv.dims3()?;
    let (d, hd) = (d3 / 3, d3 / 3 / n_heads);
    let (q, k, v) = split_heads(qkv, n_heads)?;
    let scale = 1.0 / (hd as f64).sqrt();
    let att = crate::ops::causal_softmax(&q.matmul(&k.t()?)?, scale)?;
    att.matmul(&v)?.transpose(1, 2)?.reshape((b, t, d))
}

/// Attention of `T` new positions over `S` cached ones, for generation:
/// queries from `qkv` `[B, T, 3D]` (packed as for [`causal_self_attention`]),
/// keys and values `[B, H, S, HD]` (the cache, the new positions' already
/// written at the end; any strides with contiguous rows, so views into the
/// cache's buffers need no copy). Query i is position S - T + i and sees
/// keys 0..=S - T + i. Returns `[B, T, D]`. Inference only: the fused path
/// has no backward pass (a backward through it fails with candle's
/// "backward not supported"), and the cache the keys come from is written
/// in place.
pub(crate) fn cached_attention(
    qkv: &Tensor,
    k: &Tensor,
    v: &Tensor,
    n_heads: usize,
) -> CResult<Tensor> {
    let (b, t, d3) = qkv.dims3()?;
    let (kb, kh, s, hd) = k.dims4()?;
    if n_heads == 0
        || hd == 0
        || kb != b
        || kh != n_heads
        || hd * n_heads * 3 != d3
        || v.dims() != k.dims()
        || s < t
    {
        candle_core::bail!(
            "cached attention: queries {:?} ({n_heads} heads) against keys {:?} and values {:?}",
            qkv.dims(),
            k.dims(),
            v.dims()
        );
    }
    let fast = qkv.device().is_cpu()
        && matches!(qkv.dtype(), DType::F32 | DType::F64)
        && k.dtype() == qkv.dtype()
        && v.dtype() == qkv.dtype()
        && k.stride()[3] == 1
        && v.stride()[3] == 1;
    if fast && t > 0 && b > 0 {
        // apply_op3 (not _no_bwd): the op is recorded, so a backward
        // through it fails loudly instead of stopping the gradient.
        return qkv
            .contiguous()?
            .apply_op3(k, v, CachedAttention { n_heads });
    }
    let q = qkv
        .reshape((b, t, 3, n_heads, hd))?
        .narrow(2, 0, 1)?
        .squeeze(2)?
        .transpose(1, 2)?
        .contiguous()?;
    let scale = 1.0 / (hd as f64).sqrt();
    let att = crate::ops::causal_softmax(&q.matmul(&k.contiguous()?.t()?)?, scale)?;
    att.matmul(&v.contiguous()?)?
        .transpose(1, 2)?
        .reshape((b, t, d3 / 3))
}

/// [`cached_attention`] on the CPU.
struct CachedAttention {
    n_heads: usize,
}

/// A `[B, H, S, HD]` view: its buffer, start, strides of B, H and S.
struct Heads<'a, T> {
    data: &'a [T],
    start: usize,
    strides: [usize; 3],
}

impl<'a, T> Heads<'a, T> {
    fn new(data: &'a [T], l: &Layout) -> Self {
        let st = l.stride();
        Self {
            data,
            start: l.start_offset(),
            strides: [st[0], st[1], st[2]],
        }
    }

    /// Head `h` of batch element `b`, `[S, HD]`, or transposed `[HD, S]`.
    fn head(&self, b: usize, h: usize, transposed: bool) -> Mat<'a, T> {
        let at = self.start + b * self.strides[0] + h * self.strides[1];
        if transposed {
            Mat::strided(self.data, at, 1, self.strides[2])
        } else {
            Mat::strided(self.data, at, self.strides[2], 1)
        }
    }
}

fn cached_forward<T: Real>(
    qkv: &[T],
    ql: &Layout,
    k: Heads<T>,
    v: Heads<T>,
    s: usize,
    n_heads: usize,
) -> CResult<(Vec<T>, Shape)> {
    let (b, dims) = Dims::of(ql, n_heads)?;
    let (t, d, hd) = (dims.t, dims.d, dims.hd);
    let scale: T = dims.scale();
    let threads = inner_threads(b);
    let mut y = vec![T::zero(); b * t * d];
    par_rows(&mut y, t * d, |b0, ys| {
        let mut p = vec![T::zero(); t * s];
        for (i, y) in ys.chunks_exact_mut(t * d).enumerate() {
            let e = b0 + i;
            let x = &qkv[e * t * 3 * d..(e + 1) * t * 3 * d];
            for h in 0..n_heads {
                let (q, kt) = (dims.part(x, 0, h), k.head(e, h, true));
                gemm((t, s, hd), MatMut::rows(&mut p, s), false, q, kt, threads);
                simd(
                    #[inline(always)]
                    || causal_rows(&mut p, s, s - t, scale),
                );
                let out = MatMut::strided(y, h * hd, d);
                gemm(
                    (t, hd, s),
                    out,
                    false,
                    Mat::rows(&p, s),
                    v.head(e, h, false),
                    threads,
                );
            }
        }
    });
    Ok((y, Shape::from((b, t, d))))
}

impl CustomOp3 for CachedAttention {
    fn name(&self) -> &'static str {
        "hone-cached-attention"
    }

    fn cpu_fwd(
        &self,
        q: &CpuStorage,
        ql: &Layout,
        k: &CpuStorage,
        kl: &Layout,
        v: &CpuStorage,
        vl: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        let s = kl.dims()[2];
        match (q, k, v) {
            (CpuStorage::F32(q), CpuStorage::F32(k), CpuStorage::F32(v)) => {
                let (k, v) = (Heads::new(k, kl), Heads::new(v, vl));
                let (y, shape) = cached_forward(slice(q, ql)?, ql, k, v, s, self.n_heads)?;
                Ok((CpuStorage::F32(y), shape))
            }
            (CpuStorage::F64(q), CpuStorage::F64(k), CpuStorage::F64(v)) => {
                let (k, v) = (Heads::new(k, kl), Heads::new(v, vl));
                let (y, shape) = cached_forward(slice(q, ql)?, ql, k, v, s, self.n_heads)?;
                Ok((CpuStorage::F64(y), shape))
            }
            _ => candle_core::bail!("hone-cached-attention: f32 or f64 only, one dtype"),
        }
    }
}

/// The shape of one call: T positions, width D, H heads of HD.
#[derive(Clone, Copy)]
struct Dims {
    t: usize,
    d: usize,
    heads: usize,
    hd: usize,
}

impl Dims {
    fn of(l: &Layout, n_heads: usize) -> CResult<(usize, Self)> {
        let (b, t, d3) = l.shape().dims3()?;
        let d = d3 / 3;
        Ok((
            b,
            Self {
                t,
                d,
                heads: n_heads,
                hd: d / n_heads,
            },
        ))
    }

    /// Head `h`'s q (`part` 0), k (1) or v (2) in one element's `[T, 3D]`.
    fn part<'a, T>(&self, qkv: &'a [T], part: usize, h: usize) -> Mat<'a, T> {
        Mat::strided(qkv, part * self.d + h * self.hd, 3 * self.d, 1)
    }

    /// Its transpose, `[HD, T]`.
    fn part_t<'a, T>(&self, qkv: &'a [T], part: usize, h: usize) -> Mat<'a, T> {
        Mat::strided(qkv, part * self.d + h * self.hd, 1, 3 * self.d)
    }

    fn scale<T: Real>(&self) -> T {
        T::from_f64(1.0 / (self.hd as f64).sqrt())
    }
}

/// `p [T, T]` = the softmax of `scale * q k^T` over the keys `seen` for
/// head `h` of one batch element; unseen keys get 0.
fn probabilities<T: Real>(
    qkv: &[T],
    dims: Dims,
    h: usize,
    seen: Seen,
    p: &mut [T],
    threads: Threads,
) {
    let t = dims.t;
    let (q, kt) = (dims.part(qkv, 0, h), dims.part_t(qkv, 1, h));
    gemm((t, t, dims.hd), MatMut::rows(p, t), false, q, kt, threads);
    let scale: T = dims.scale();
    match seen {
        Seen::Causal => simd(
            #[inline(always)]
            || causal_rows(p, t, 0, scale),
        ),
        Seen::First(n) => simd(
            #[inline(always)]
            || first_rows(p, t, n, scale),
        ),
    }
}

/// Each row of `p` (rows `s` wide) becomes the softmax of `scale` times its
/// first `n` entries, the rest 0.
#[inline(always)]
fn first_rows<T: Real>(p: &mut [T], s: usize, n: usize, scale: T) {
    for row in p.chunks_exact_mut(s) {
        let (seen, masked) = row.split_at_mut(n);
        softmax_in_place(seen, scale);
        masked.fill(T::zero());
    }
}

/// Each row i of `p` (rows `s` wide) becomes the softmax of `scale` times
/// its first `offset + i + 1` entries (the keys query i sees), the rest 0.
#[inline(always)]
fn causal_rows<T: Real>(p: &mut [T], s: usize, offset: usize, scale: T) {
    for (i, row) in p.chunks_exact_mut(s).enumerate() {
        let (seen, masked) = row.split_at_mut(offset + i + 1);
        softmax_in_place(seen, scale);
        masked.fill(T::zero());
    }
}

/// `dp` becomes the scores' gradient, `scale * p * (dp - rowsum(dp * p))`,
/// row by row (`s` wide); masked entries have p = 0, so theirs is 0.
#[inline(always)]
fn softmax_grad_rows<T: Real>(p: &[T], dp: &mut [T], s: usize, scale: T) {
    for (pr, dr) in p.chunks_exact(s).zip(dp.chunks_exact_mut(s)) {
        let dot = dot(pr, dr);
        for (dv, &pv) in dr.iter_mut().zip(pr) {
            *dv = scale * pv * (*dv - dot);
        }
    }
}

/// One batch element's `[T, D]` output from its `[T, 3D]` projections.
fn attend<T: Real>(qkv: &[T], y: &mut [T], dims: Dims, seen: Seen, p: &mut [T], threads: Threads) {
    let (t, hd) = (dims.t, dims.hd);
    for h in 0..dims.heads {
        probabilities(qkv, dims, h, seen, p, threads);
        let v = dims.part(qkv, 2, h);
        gemm(
            (t, hd, t),
            MatMut::strided(y, h * hd, dims.d),
            false,
            Mat::rows(p, t),
            v,
            threads,
        );
    }
}

/// One batch element's `[T, 3D]` gradient from its projections and the
/// gradient `dy` `[T, D]` of its output.
fn attend_bwd<T: Real>(
    qkv: &[T],
    dy: &[T],
    dqkv: &mut [T],
    dims: Dims,
    seen: Seen,
    (p, dp): (&mut [T], &mut [T]),
    threads: Threads,
) {
    let (t, d, hd) = (dims.t, dims.d, dims.hd);
    let scale: T = dims.scale();
    for h in 0..dims.heads {
        probabilities(qkv, dims, h, seen, p, threads);
        let dy_h = || Mat::strided(dy, h * hd, d, 1);
        // dv = p^T dy
        let dv = MatMut::strided(dqkv, 2 * d + h * hd, 3 * d);
        gemm(
            (t, hd, t),
            dv,
            false,
            Mat::transposed(p, t),
            dy_h(),
            threads,
        );
        // dp = dy v^T
        let vt = dims.part_t(qkv, 2, h);
        gemm((t, t, hd), MatMut::rows(dp, t), false, dy_h(), vt, threads);
        simd(
            #[inline(always)]
            || softmax_grad_rows(p, dp, t, scale),
        );
        // dq = ds k, dk = ds^T q
        let dq = MatMut::strided(dqkv, h * hd, 3 * d);
        gemm(
            (t, hd, t),
            dq,
            false,
            Mat::rows(dp, t),
            dims.part(qkv, 1, h),
            threads,
        );
        let dk = MatMut::strided(dqkv, d + h * hd, 3 * d);
        gemm(
            (t, hd, t),
            dk,
            false,
            Mat::transposed(dp, t),
            dims.part(qkv, 0, h),
            threads,
        );
    }
}

/// Batch elements go to candle's threads, one product to one thread; a
/// batch smaller than the thread count gives the products the threads.
fn inner_threads(batch: usize) -> Threads {
    if batch >= candle_core::utils::get_num_threads() {
        Threads::One
    } else {
        Threads::Candle
    }
}

fn forward<T: Real>(
    qkv: &[T],
    l: &Layout,
    n_heads: usize,
    keys: &Keys,
) -> CResult<(Vec<T>, Shape)> {
    let (b, dims) = Dims::of(l, n_heads)?;
    let (t, d) = (dims.t, dims.d);
    let threads = inner_threads(b);
    let mut y = vec![T::zero(); b * t * d];
    par_rows(&mut y, t * d, |b0, ys| {
        let mut p = vec![T::zero(); t * t];
        for (i, y) in ys.chunks_exact_mut(t * d).enumerate() {
            let x = &qkv[(b0 + i) * t * 3 * d..(b0 + i + 1) * t * 3 * d];
            attend(x, y, dims, keys.of(b0 + i), &mut p, threads);
        }
    });
    Ok((y, Shape::from((b, t, d))))
}

fn backward<T: Real>(
    qkv: &[T],
    dy: &[T],
    l: &Layout,
    n_heads: usize,
    keys: &Keys,
) -> CResult<Vec<T>> {
    let (b, dims) = Dims::of(l, n_heads)?;
    let (t, d) = (dims.t, dims.d);
    if dy.len() != b * t * d {
        candle_core::bail!(
            "hone-attention-bwd: gradient of {} for [{b}, {t}, {d}]",
            dy.len()
        );
    }
    let threads = inner_threads(b);
    let mut dqkv = vec![T::zero(); b * t * 3 * d];
    par_rows(&mut dqkv, t * 3 * d, |b0, dxs| {
        let (mut p, mut dp) = (vec![T::zero(); t * t], vec![T::zero(); t * t]);
        for (i, dx) in dxs.chunks_exact_mut(t * 3 * d).enumerate() {
            let e = b0 + i;
            let x = &qkv[e * t * 3 * d..(e + 1) * t * 3 * d];
            let g = &dy[e * t * d..(e + 1) * t * d];
            attend_bwd(x, g, dx, dims, keys.of(e), (&mut p, &mut dp), threads);
        }
    });
    Ok(dqkv)
}

/// [`causal_self_attention`] and [`padded_self_attention`] on the CPU.
struct SelfAttention {
    n_heads: usize,
    keys: Keys,
}

impl CustomOp1 for SelfAttention {
    fn name(&self) -> &'static str {
        "hone-attention"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> CResult<(CpuStorage, Shape)> {
        match s {
            CpuStorage::F32(v) => {
                let (y, shape) = forward(slice(v, l)?, l, self.n_heads, &self.keys)?;
                Ok((CpuStorage::F32(y), shape))
            }
            CpuStorage::F64(v) => {
                let (y, shape) = forward(slice(v, l)?, l, self.n_heads, &self.keys)?;
                Ok((CpuStorage::F64(y), shape))
            }
            _ => candle_core::bail!("hone-attention: f32 or f64 only"),
        }
    }

    fn bwd(&self, qkv: &Tensor, _y: &Tensor, grad: &Tensor) -> CResult<Option<Tensor>> {
        let grad = grad.detach().contiguous()?;
        let bwd = SelfAttentionBwd {
            n_heads: self.n_heads,
            keys: self.keys.clone(),
        };
        Ok(Some(qkv.detach().apply_op2_no_bwd(&grad, &bwd)?))
    }
}

/// (qkv, gradient of the output) -> gradient of qkv.
struct SelfAttentionBwd {
    n_heads: usize,
    keys: Keys,
}

impl CustomOp2 for SelfAttentionBwd {
    fn name(&self) -> &'static str {
        "hone-attention-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        let out = match (s1, s2) {
            (CpuStorage::F32(x), CpuStorage::F32(g)) => CpuStorage::F32(backward(
                slice(x, l1)?,
                slice(g, l2)?,
                l1,
                self.n_heads,
                &self.keys,
            )?),
            (CpuStorage::F64(x), CpuStorage::F64(g)) => CpuStorage::F64(backward(
                slice(x, l1)?,
                slice(g, l2)?,
                l1,
                self.n_heads,
                &self.keys,
            )?),
            _ => candle_core::bail!("hone-attention-bwd: f32 or f64 only, one dtype"),
        };
        Ok((out, l1.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn max_rel(a: &Tensor, reference: &Tensor) -> f64 {
        let max = |t: Tensor| {
            t.abs()
                .unwrap()
                .flatten_all()
                .unwrap()
                .max(0)
                .unwrap()
                .to_dtype(DType::F64)
                .unwrap()
                .to_scalar::<f64>()
                .unwrap()
        };
        max((a - reference).unwrap()) / max(reference.clone()).max(1e-12)
    }

    /// Output and qkv's gradient under a fixed weighting of the output.
    fn run(qkv: &Tensor, attention: &dyn Fn(&Tensor) -> CResult<Tensor>) -> (Tensor, Tensor) {
        let var = Var::from_tensor(qkv).unwrap();
        let y = attention(var.as_tensor()).unwrap();
        let weights = Tensor::arange(0u32, y.elem_count() as u32, &Device::Cpu)
            .unwrap()
            .to_dtype(y.dtype())
            .unwrap()
            .sin()
            .unwrap()
            .reshape(y.dims())
            .unwrap();
        let grads = (&y * &weights)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let g = grads.get(var.as_tensor()).expect("a gradient").clone();
        (y, g)
    }

    #[test]
    fn matches_the_primitives_forward_and_backward() {
        // One position, a batch smaller than the threads, several threads'
        // worth of batch elements, one head.
        for (shape, heads) in [
            ((2usize, 1usize, 12usize), 2usize),
            ((1, 9, 24), 4),
            ((5, 16, 48), 4),
            ((3, 7, 15), 1),
        ] {
            for dtype in [DType::F32, DType::F64] {
                let qkv = Tensor::randn(0f64, 1.0, shape, &Device::Cpu)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap();
                let (y1, g1) = run(&qkv, &|x| causal_self_attention(x, heads));
                let (y2, g2) = run(&qkv, &|x| reference(x, heads));
                assert_eq!(y1.dims(), y2.dims());
                assert_eq!(g1.dims(), g2.dims());
                let (fwd, bwd) = (max_rel(&y1, &y2), max_rel(&g1, &g2));
                assert!(fwd < 1e-5, "{shape:?} {dtype:?}: output differs by {fwd}");
                assert!(bwd < 1e-4, "{shape:?} {dtype:?}: gradient differs by {bwd}");
            }
        }
    }

    #[test]
    fn padded_attention_matches_the_primitives_forward_and_backward() {
        // Full-length rows, padded rows, a row of one real key; one head and
        // several; a batch smaller and larger than the threads.
        for (shape, heads, lengths) in [
            ((2usize, 5usize, 12usize), 2usize, vec![5usize, 3]),
            ((1, 9, 24), 4, vec![9]),
            ((5, 16, 48), 4, vec![16, 1, 7, 16, 12]),
            ((3, 7, 15), 1, vec![2, 7, 4]),
        ] {
            for dtype in [DType::F32, DType::F64] {
                let qkv = Tensor::randn(0f64, 1.0, shape, &Device::Cpu)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap();
                let (y1, g1) = run(&qkv, &|x| padded_self_attention(x, heads, &lengths));
                let (y2, g2) = run(&qkv, &|x| padded_reference(x, heads, &lengths));
                let (fwd, bwd) = (max_rel(&y1, &y2), max_rel(&g1, &g2));
                assert!(fwd < 1e-5, "{shape:?} {dtype:?}: output differs by {fwd}");
                assert!(bwd < 1e-4, "{shape:?} {dtype:?}: gradient differs by {bwd}");
                // Padding keys and values get no gradient: nothing sees them.
                let (b, t, d3) = shape;
                let g = g1.to_dtype(DType::F64).unwrap().to_vec3::<f64>().unwrap();
                for (e, &n) in lengths.iter().enumerate().take(b) {
                    for row in &g[e][n..t] {
                        assert!(row[d3 / 3..].iter().all(|&v| v == 0.0), "padding key {e}");
                    }
                }
            }
        }
    }

    #[test]
    fn padded_attention_rejects_lengths_outside_the_batch() {
        let qkv = Tensor::zeros((2, 4, 6), DType::F32, &Device::Cpu).unwrap();
        for lengths in [vec![4usize], vec![4, 0], vec![4, 5]] {
            let err = padded_self_attention(&qkv, 1, &lengths).unwrap_err();
            assert!(err.to_string().contains("key lengths"), "{err}");
        }
    }

    #[test]
    fn cached_attention_over_a_cache_view_matches_the_primitives() {
        // Keys and values as narrowed views of wider buffers (as the cache
        // keeps them), several new positions and one.
        for (b, heads, hd, t, s) in [
            (2usize, 2usize, 4usize, 3usize, 7usize),
            (3, 1, 5, 1, 6),
            (1, 4, 8, 5, 5),
        ] {
            let d = heads * hd;
            let randn = |shape: &[usize]| Tensor::randn(0f32, 1.0, shape, &Device::Cpu).unwrap();
            let qkv = randn(&[b, t, 3 * d]);
            let kbuf = randn(&[b, heads, s + 4, hd]);
            let vbuf = randn(&[b, heads, s + 4, hd]);
            let (k, v) = (kbuf.narrow(2, 0, s).unwrap(), vbuf.narrow(2, 0, s).unwrap());
            let fused = cached_attention(&qkv, &k, &v, heads).unwrap();
            let q = qkv
                .reshape((b, t, 3, heads, hd))
                .unwrap()
                .narrow(2, 0, 1)
                .unwrap()
                .squeeze(2)
                .unwrap()
                .transpose(1, 2)
                .unwrap()
                .contiguous()
                .unwrap();
            let scores = q.matmul(&k.contiguous().unwrap().t().unwrap()).unwrap();
            let att =
                crate::ops::causal_softmax_reference(&scores, 1.0 / (hd as f64).sqrt()).unwrap();
            let reference = att
                .matmul(&v.contiguous().unwrap())
                .unwrap()
                .transpose(1, 2)
                .unwrap()
                .reshape((b, t, d))
                .unwrap();
            let rel = max_rel(&fused, &reference);
            assert!(rel < 1e-5, "b {b} t {t} s {s}: differs by {rel}");
        }
        let qkv = Tensor::zeros((1, 2, 12), DType::F32, &Device::Cpu).unwrap();
        let k = Tensor::zeros((1, 2, 1, 2), DType::F32, &Device::Cpu).unwrap();
        let err = cached_attention(&qkv, &k, &k, 2).unwrap_err().to_string();
        assert!(err.contains("cached attention"), "{err}");
        // No backward pass: asking for one is an error, not a silent stop.
        let q =
            Var::from_tensor(&Tensor::ones((1, 1, 12), DType::F32, &Device::Cpu).unwrap()).unwrap();
        let kv = Tensor::ones((1, 2, 1, 2), DType::F32, &Device::Cpu).unwrap();
        let y = cached_attention(q.as_tensor(), &kv, &kv, 2).unwrap();
        assert!(y.sum_all().unwrap().backward().is_err());
    }

    #[test]
    fn a_width_that_does_not_split_into_heads_is_an_error() {
        let qkv = Tensor::zeros((1, 4, 12), DType::F32, &Device::Cpu).unwrap();
        let err = causal_self_attention(&qkv, 5).unwrap_err().to_string();
        assert!(err.contains("not 3 x 5 heads"), "{err}");
    }
}
