//! Fused CPU ops with their own backward pass: layer norm (normalisation and
//! affine part), the scaled causal softmax of attention, and GELU (tanh
//! approximation).
//!
//! candle's fused `layer_norm` / `softmax_last_dim` have no backward pass and
//! its GELU backward is a chain of a dozen element-wise ops; these are one
//! pass over the data each way. The fast paths cover f32 / f64 tensors on the
//! CPU (made contiguous first); anything else (another device or dtype) falls
//! back to the composition of differentiable primitives, which is also what
//! the tests compare against.

use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Shape, Tensor, WithDType, D,
};

type CResult<T> = candle_core::Result<T>;

/// Elements below which an op runs on the calling thread alone.
const MIN_PER_THREAD: usize = 16 * 1024;

fn fast_path(x: &Tensor) -> bool {
    x.device().is_cpu() && matches!(x.dtype(), DType::F32 | DType::F64) && x.rank() >= 1
}

/// The elements of a contiguous `l` in `s` (the fused ops make their
/// inputs contiguous first).
pub(crate) fn slice<'a, T>(s: &'a [T], l: &Layout) -> CResult<&'a [T]> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&s[a..b]),
        None => candle_core::bail!("fused op needs a contiguous input"),
    }
}

fn row_len(l: &Layout) -> CResult<usize> {
    match l.dims().last() {
        Some(&n) if n > 0 => Ok(n),
        _ => candle_core::bail!("fused op needs a non-empty last dimension"),
    }
}

/// The float types of the fast paths.
pub(crate) trait Real: WithDType {
    fn exp(self) -> Self;
    fn sqrt(self) -> Self;
    /// tanh, written so that a loop over it vectorises (see [`tanh_f32`]).
    fn tanh(self) -> Self;
    /// erf, written so that a loop over it vectorises (see [`erf_f32`]).
    fn erf(self) -> Self;
    fn neg_infinity() -> Self;
    fn fmax(self, other: Self) -> Self;
}

macro_rules! real {
    ($t:ty, $exp:expr, $tanh:expr, $erf:expr) => {
        impl Real for $t {
            #[inline(always)]
            fn exp(self) -> Self {
                $exp(self)
            }
            fn sqrt(self) -> Self {
                <$t>::sqrt(self)
            }
            #[inline(always)]
            fn tanh(self) -> Self {
                $tanh(self)
            }
            #[inline(always)]
            fn erf(self) -> Self {
                $erf(self)
            }
            fn neg_infinity() -> Self {
                <$t>::NEG_INFINITY
            }
            fn fmax(self, other: Self) -> Self {
                <$t>::max(self, other)
            }
        }
    };
}
real!(f32, exp_f32, tanh_f32, erf_f32);
real!(f64, f64::exp, f64::tanh, candle_core::cpu::erf::erf_f64);

/// erf for f32, branch-free: Abramowitz and Stegun's 7.1.26,
/// `1 - t (a1 + t (a2 + ... + t a5)) e^(-x^2)` with `t = 1 / (1 + p |x|)`,
/// its sign copied from x. Its absolute error is below 1.5e-7 in exact
/// arithmetic, and below 1e-6 with [`exp_f32`] in f32 (the test checks).
/// libm's `erff` is a call per element with branches, and was 15 % of
/// MiniLM's forward pass in BERT's exact GELU.
#[inline(always)]
fn erf_f32(x: f32) -> f32 {
    let ax = x.abs();
    let t = 1.0 / (1.0 + 0.327_591_1 * ax);
    let p = 1.061_405_4;
    let p = p * t + -1.453_152_1;
    let p = p * t + 1.421_413_8;
    let p = p * t + -0.284_496_74;
    let p = p * t + 0.254_829_6;
    (1.0 - p * t * exp_f32(-ax * ax)).copysign(x)
}

/// e^x for f32, branch-free so that loops over it vectorise (libm's `expf`
/// is a call per element): Cephes' `expf`, x = n ln 2 + r with |r| <= ln 2 / 2,
/// a degree-5 polynomial for e^r, and 2^n put straight into the exponent
/// bits. Relative error below 3e-7 on [-87.3, 88.3] (the test checks); 0
/// below (where f32 turns subnormal) and +inf above (an early overflow: the
/// true one is at 88.72; softmax and cross-entropy only take x <= 0).
#[inline(always)]
fn exp_f32(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // ln 2 in two parts, so n * LN2_HI is exact.
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Adding and subtracting 1.5 * 2^23 rounds to the nearest integer.
    const ROUND: f32 = 12_582_912.0;
    let xc = x.clamp(-87.3, 88.3);
    let n = (xc * LOG2E + ROUND) - ROUND;
    let r = xc - n * LN2_HI - n * LN2_LO;
    let p = 1.987_569_1e-4;
    let p = p * r + 1.398_199_9e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 1.666_666_5e-1;
    let p = p * r + 0.5;
    let er = p * r * r + r + 1.0;
    // 2^n from the bits: n + 127 lands in the low mantissa bits of
    // n + 127 + 2^23, and the shift moves them into the exponent. (`n as
    // i32` would be a saturating conversion, scalar code per element.)
    let two_n = f32::from_bits((n + 127.0 + 8_388_608.0).to_bits() << 23);
    let y = er * two_n;
    if x < -87.3 {
        0.0
    } else if x > 88.3 {
        f32::INFINITY
    } else {
        // NaN falls through the comparisons and the clamp keeps it.
        y
    }
}

/// tanh for f32 as a rational function, the approximation of Eigen and XLA
/// (an odd polynomial of degree 13 over an even one of degree 6, on the input
/// clamped to +-7.9988, where tanh is 1 in f32). Its absolute error is below
/// 1e-6 (the test checks). libm's `tanhf` is a call per element and was
/// 15 % of a training step in GELU; this one is branch-free, so the loops
/// over it vectorise. (Plain `*` and `+`, not `mul_add`: without the
/// `fma` target feature, `mul_add` is a library call per element.)
#[inline(always)]
fn tanh_f32(x: f32) -> f32 {
    let x = x.clamp(-7.998_811_7, 7.998_811_7);
    let x2 = x * x;
    let p = x2 * -2.760_768_5e-16 + 2.000_188e-13;
    let p = x2 * p + -8.604_672e-11;
    let p = x2 * p + 5.122_297e-8;
    let p = x2 * p + 1.485_722_4e-5;
    let p = x2 * p + 6.372_619_3e-4;
    let p = x2 * p + 4.893_524_6e-3;
    let q = x2 * 1.198_258_4e-6 + 1.185_347_1e-4;
    let q = x2 * q + 2.268_434_6e-3;
    let q = x2 * q + 4.893_525e-3;
    x * p / q
}

/// Lanes of the reductions below. A float sum in one accumulator is a
/// chain the compiler must keep in order (it may not reassociate), so it
/// runs one element at a time; eight independent accumulators let it use
/// vector registers.
const LANES: usize = 8;

/// The sum of `xs`, eight lanes at a time.
#[inline(always)]
pub(crate) fn sum<T: Real>(xs: &[T]) -> T {
    let mut acc = [T::zero(); LANES];
    let chunks = xs.chunks_exact(LANES);
    let rest = chunks.remainder();
    for chunk in chunks {
        for (a, &v) in acc.iter_mut().zip(chunk) {
            *a += v;
        }
    }
    rest.iter()
        .fold(acc.iter().fold(T::zero(), |s, &a| s + a), |s, &v| s + v)
}

/// The dot product of `a` and `b` (of equal length), eight lanes at a time.
#[inline(always)]
pub(crate) fn dot<T: Real>(a: &[T], b: &[T]) -> T {
    let mut acc = [T::zero(); LANES];
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for ((s, &u), &v) in acc.iter_mut().zip(x).zip(y) {
            *s += u * v;
        }
    }
    let head = acc.iter().fold(T::zero(), |s, &v| s + v);
    ra.iter().zip(rb).fold(head, |s, (&u, &v)| s + u * v)
}

/// The largest element of `xs` (-inf if empty), eight lanes at a time.
#[inline(always)]
pub(crate) fn max<T: Real>(xs: &[T]) -> T {
    let mut acc = [T::neg_infinity(); LANES];
    let chunks = xs.chunks_exact(LANES);
    let rest = chunks.remainder();
    for chunk in chunks {
        for (a, &v) in acc.iter_mut().zip(chunk) {
            *a = a.fmax(v);
        }
    }
    let head = acc.iter().fold(T::neg_infinity(), |m, &a| m.fmax(a));
    rest.iter().fold(head, |m, &v| m.fmax(v))
}

/// Turns the scores `row` into softmax(scale * row) in place (scale > 0).
#[inline(always)]
pub(crate) fn softmax_in_place<T: Real>(row: &mut [T], scale: T) {
    let max = max(row) * scale;
    for v in row.iter_mut() {
        *v = (*v * scale - max).exp();
    }
    let inv = T::one() / sum(row);
    for v in row.iter_mut() {
        *v *= inv;
    }
}

fn c<T: Real>(v: f64) -> T {
    T::from_f64(v)
}

/// Runs `f` compiled for the widest vector instructions the CPU has
/// (AVX-512, else AVX2 with FMA, else the baseline SSE2 of x86-64): the
/// kernels that `f` inlines get 16 or 8 lanes where the crate's build
/// target only promises 4. `f` and what it calls must inline into the
/// wrapper for that: `#[inline(always)]` helpers, and `#[inline(always)]`
/// on the closure itself. A closure is a function of its own, and one LLVM
/// leaves out of line is compiled for the baseline (the fused kernels ran
/// 4 lanes wide that way until the attribute went on).
#[inline(always)]
pub(crate) fn simd<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx512f,avx2,fma")]
        unsafe fn avx512<R>(f: impl FnOnce() -> R) -> R {
            f()
        }
        #[target_feature(enable = "avx2,fma")]
        unsafe fn avx2<R>(f: impl FnOnce() -> R) -> R {
            f()
        }
        let has_avx2 = std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma");
        if has_avx2 && std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has the features the wrapper enables.
            return unsafe { avx512(f) };
        }
        if has_avx2 {
            // SAFETY: as above.
            return unsafe { avx2(f) };
        }
    }
    f()
}

/// Runs `f(first_row, rows)` over `out` split into groups of whole rows of
/// length `n`, one group per thread (candle's thread count, i.e.
/// RAYON_NUM_THREADS), and returns the results in row order. The groups run
/// on rayon's global pool, the one candle's matmul (gemm) runs on: its
/// threads are awake after a product, where fresh threads would cost a spawn
/// each and contend with them for the cores.
pub(crate) fn par_rows<T: Send, R: Send>(
    out: &mut [T],
    n: usize,
    f: impl Fn(usize, &mut [T]) -> R + Sync,
) -> Vec<R> {
    use rayon::prelude::*;
    let rows = out.len() / n;
    let threads = candle_core::utils::get_num_threads()
        .min(rows)
        .min(out.len() / MIN_PER_THREAD)
        .max(1);
    if threads == 1 {
        return vec![simd(
            #[inline(always)]
            || f(0, out),
        )];
    }
    let per = rows.div_ceil(threads);
    out.par_chunks_mut(per * n)
        .enumerate()
        .map(|(i, rows)| {
            simd(
                #[inline(always)]
                || f(i * per, rows),
            )
        })
        .collect()
}

/// Mean and 1/sqrt(var + eps) of one row.
fn moments<T: Real>(x: &[T], eps: f64) -> (T, T) {
    let n: T = c(x.len() as f64);
    let mean = sum(x) / n;
    let mut acc = [T::zero(); LANES];
    let chunks = x.chunks_exact(LANES);
    let rest = chunks.remainder();
    for chunk in chunks {
        for (a, &v) in acc.iter_mut().zip(chunk) {
            *a += (v - mean) * (v - mean);
        }
    }
    let var = rest
        .iter()
        .fold(sum(&acc), |s, &v| s + (v - mean) * (v - mean))
        / n;
    (mean, T::one() / (var + c(eps)).sqrt())
}

fn ln_fwd<T: Real>(x: &[T], w: &[T], b: &[T], eps: f64) -> Vec<T> {
    let n = w.len();
    let mut out = vec![T::zero(); x.len()];
    par_rows(
        &mut out,
        n,
        #[inline(always)]
        |r0, out| {
            for (i, yr) in out.chunks_exact_mut(n).enumerate() {
                let xr = &x[(r0 + i) * n..(r0 + i + 1) * n];
                let (mean, rstd) = moments(xr, eps);
                for j in 0..n {
                    yr[j] = (xr[j] - mean) * rstd * w[j] + b[j];
                }
            }
        },
    );
    out
}

/// Gradients of layer norm, packed as [dx (x.len()), dw (D), db (D)]:
/// with xhat = (x - mean) * rstd and gh = g * w,
/// dx = rstd * (gh - mean(gh) - xhat * mean(gh * xhat)),
/// dw = sum over rows of g * xhat, db = sum over rows of g.
fn ln_bwd<T: Real>(x: &[T], w: &[T], g: &[T], eps: f64) -> Vec<T> {
    let n = w.len();
    let m = x.len();
    let mut out = vec![T::zero(); m + 2 * n];
    let (dx, dwb) = out.split_at_mut(m);
    let partials = par_rows(
        dx,
        n,
        #[inline(always)]
        |r0, dx| {
            let mut dw = vec![T::zero(); n];
            let mut db = vec![T::zero(); n];
            let mut xhat = vec![T::zero(); n];
            let mut gh = vec![T::zero(); n];
            let inv_n: T = c(1.0 / n as f64);
            for (i, dr) in dx.chunks_exact_mut(n).enumerate() {
                let xr = &x[(r0 + i) * n..(r0 + i + 1) * n];
                let gr = &g[(r0 + i) * n..(r0 + i + 1) * n];
                let (mean, rstd) = moments(xr, eps);
                for j in 0..n {
                    let xh = (xr[j] - mean) * rstd;
                    xhat[j] = xh;
                    gh[j] = gr[j] * w[j];
                    dw[j] += gr[j] * xh;
                    db[j] += gr[j];
                }
                let (mg, mgx) = (sum(&gh) * inv_n, dot(&gh, &xhat) * inv_n);
                for j in 0..n {
                    dr[j] = rstd * (gr[j] * w[j] - mg - xhat[j] * mgx);
                }
            }
            (dw, db)
        },
    );
    let (dw, db) = dwb.split_at_mut(n);
    for (pw, pb) in partials {
        for j in 0..n {
            dw[j] += pw[j];
            db[j] += pb[j];
        }
    }
    out
}

/// Layer norm over the last dimension: x [..., D], weight [D], bias [D].
struct LayerNormOp {
    eps: f64,
}

fn check_affine(l1: &Layout, l2: &Layout, l3: &Layout, what: &str) -> CResult<usize> {
    let n = row_len(l1)?;
    if l2.dims() != [n] || l3.dims() != [n] {
        candle_core::bail!(
            "{what}: weight {:?} and bias/grad {:?} do not match the last dimension {n}",
            l2.dims(),
            l3.dims()
        );
    }
    Ok(n)
}

impl CustomOp3 for LayerNormOp {
    fn name(&self) -> &'static str {
        "hone-layer-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        check_affine(l1, l2, l3, self.name())?;
        let out = match (s1, s2, s3) {
            (CpuStorage::F32(x), CpuStorage::F32(w), CpuStorage::F32(b)) => CpuStorage::F32(
                ln_fwd(slice(x, l1)?, slice(w, l2)?, slice(b, l3)?, self.eps),
            ),
            (CpuStorage::F64(x), CpuStorage::F64(w), CpuStorage::F64(b)) => CpuStorage::F64(
                ln_fwd(slice(x, l1)?, slice(w, l2)?, slice(b, l3)?, self.eps),
            ),
            _ => candle_core::bail!("hone-layer-norm: f32 or f64 only, all of one dtype"),
        };
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        // x [..., D] and grad [..., D] against weight [D]: the op takes the
        // grad as its third argument, shaped like x.
        let packed = x.apply_op3_no_bwd(w, &grad, &LayerNormBwd { eps: self.eps })?;
        let (m, n) = (x.elem_count(), w.elem_count());
        let dx = packed.narrow(0, 0, m)?.reshape(x.shape())?;
        let dw = packed.narrow(0, m, n)?.reshape(w.shape())?;
        let db = packed.narrow(0, m + n, n)?.reshape(b.shape())?;
        Ok((Some(dx), Some(dw), Some(db)))
    }
}

/// (x, weight, grad of the output) -> [dx, dweight, dbias] flattened.
struct LayerNormBwd {
    eps: f64,
}

impl CustomOp3 for LayerNormBwd {
    fn name(&self) -> &'static str {
        "hone-layer-norm-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        let n = row_len(l1)?;
        if l2.dims() != [n] || l3.shape() != l1.shape() {
            candle_core::bail!("hone-layer-norm-bwd: shape mismatch");
        }
        let out = match (s1, s2, s3) {
            (CpuStorage::F32(x), CpuStorage::F32(w), CpuStorage::F32(g)) => CpuStorage::F32(
                ln_bwd(slice(x, l1)?, slice(w, l2)?, slice(g, l3)?, self.eps),
            ),
            (CpuStorage::F64(x), CpuStorage::F64(w), CpuStorage::F64(g)) => CpuStorage::F64(
                ln_bwd(slice(x, l1)?, slice(w, l2)?, slice(g, l3)?, self.eps),
            ),
            _ => candle_core::bail!("hone-layer-norm-bwd: f32 or f64 only, all of one dtype"),
        };
        let len = l1.shape().elem_count() + 2 * n;
        Ok((out, Shape::from(len)))
    }
}

/// Layer norm from primitives: the fallback and the tests' reference.
pub(crate) fn layer_norm_reference(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
) -> CResult<Tensor> {
    let mean = x.mean_keepdim(D::Minus1)?;
    let centred = x.broadcast_sub(&mean)?;
    let var = centred.sqr()?.mean_keepdim(D::Minus1)?;
    centred
        .broadcast_div(&(var + eps)?.sqrt()?)?
        .broadcast_mul(weight)?
        .broadcast_add(bias)
}

/// Layer norm over the last dimension with weight and bias [D], differentiable
/// in all three.
pub(crate) fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> CResult<Tensor> {
    let d = x.dims().last().copied().unwrap_or(0);
    let fits = weight.dims() == [d]
        && bias.dims() == [d]
        && d > 0
        && weight.dtype() == x.dtype()
        && bias.dtype() == x.dtype()
        && weight.device().same_device(x.device())
        && bias.device().same_device(x.device());
    if fast_path(x) && fits {
        x.contiguous()?.apply_op3(
            &weight.contiguous()?,
            &bias.contiguous()?,
            LayerNormOp { eps },
        )
    } else {
        layer_norm_reference(x, weight, bias, eps)
    }
}

/// softmax(scale * x + causal mask) of each row; rows are [T, S] blocks
/// where query i sees keys 0..=S-T+i.
fn causal_sm_fwd<T: Real>(x: &[T], t: usize, s: usize, scale: f64) -> Vec<T> {
    let mut out = vec![T::zero(); x.len()];
    let scale: T = c(scale);
    let offset = s - t;
    par_rows(
        &mut out,
        s,
        #[inline(always)]
        |r0, out| {
            for (i, yr) in out.chunks_exact_mut(s).enumerate() {
                let r = r0 + i;
                let xr = &x[r * s..(r + 1) * s];
                let seen = offset + r % t + 1;
                yr[..seen].copy_from_slice(&xr[..seen]);
                softmax_in_place(&mut yr[..seen], scale);
                // Masked keys keep their zero.
            }
        },
    );
    out
}

/// dx = scale * y * (g - sum(g * y)); zero where y is masked (y = 0).
fn causal_sm_bwd<T: Real>(y: &[T], g: &[T], s: usize, scale: f64) -> Vec<T> {
    let mut out = vec![T::zero(); y.len()];
    let scale: T = c(scale);
    par_rows(
        &mut out,
        s,
        #[inline(always)]
        |r0, out| {
            for (i, dr) in out.chunks_exact_mut(s).enumerate() {
                let r = r0 + i;
                let yr = &y[r * s..(r + 1) * s];
                let gr = &g[r * s..(r + 1) * s];
                let dot = dot(yr, gr);
                for j in 0..s {
                    dr[j] = scale * yr[j] * (gr[j] - dot);
                }
            }
        },
    );
    out
}

/// Attention probabilities from scores [..., T, S].
struct CausalSoftmax {
    scale: f64,
}

impl CustomOp1 for CausalSoftmax {
    fn name(&self) -> &'static str {
        "hone-causal-softmax"
    }

    fn cpu_fwd(&self, st: &CpuStorage, l: &Layout) -> CResult<(CpuStorage, Shape)> {
        let dims = l.dims();
        if dims.len() < 2 || dims[dims.len() - 1] < dims[dims.len() - 2] {
            candle_core::bail!("hone-causal-softmax: need [..., T, S] with S >= T, got {dims:?}");
        }
        let (t, s) = (dims[dims.len() - 2], dims[dims.len() - 1]);
        if t == 0 {
            candle_core::bail!("hone-causal-softmax: empty input");
        }
        let out = match st {
            CpuStorage::F32(v) => CpuStorage::F32(causal_sm_fwd(slice(v, l)?, t, s, self.scale)),
            CpuStorage::F64(v) => CpuStorage::F64(causal_sm_fwd(slice(v, l)?, t, s, self.scale)),
            _ => candle_core::bail!("hone-causal-softmax: f32 or f64 only"),
        };
        Ok((out, l.shape().clone()))
    }

    fn bwd(&self, _arg: &Tensor, res: &Tensor, grad: &Tensor) -> CResult<Option<Tensor>> {
        let grad = grad.contiguous()?;
        Ok(Some(res.apply_op2_no_bwd(
            &grad,
            &CausalSoftmaxBwd { scale: self.scale },
        )?))
    }
}

/// (softmax output y, grad of y) -> grad of the scores.
struct CausalSoftmaxBwd {
    scale: f64,
}

impl CustomOp2 for CausalSoftmaxBwd {
    fn name(&self) -> &'static str {
        "hone-causal-softmax-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        let s = row_len(l1)?;
        if l1.shape() != l2.shape() {
            candle_core::bail!("hone-causal-softmax-bwd: shape mismatch");
        }
        let out = match (s1, s2) {
            (CpuStorage::F32(y), CpuStorage::F32(g)) => {
                CpuStorage::F32(causal_sm_bwd(slice(y, l1)?, slice(g, l2)?, s, self.scale))
            }
            (CpuStorage::F64(y), CpuStorage::F64(g)) => {
                CpuStorage::F64(causal_sm_bwd(slice(y, l1)?, slice(g, l2)?, s, self.scale))
            }
            _ => candle_core::bail!("hone-causal-softmax-bwd: f32 or f64 only"),
        };
        Ok((out, l1.shape().clone()))
    }
}

/// Additive mask [T,S]: query i (at position S-T+i) sees keys 0..=S-T+i.
pub(crate) fn causal_mask(
    t: usize,
    s: usize,
    dtype: DType,
    device: &candle_core::Device,
) -> CResult<Tensor> {
    let offset = s - t;
    let mask: Vec<f32> = (0..t)
        .flat_map(|i| {
            (0..s).map(move |j| {
                if j <= offset + i {
                    0.0
                } else {
                    f32::NEG_INFINITY
                }
            })
        })
        .collect();
    Tensor::from_vec(mask, (t, s), device)?.to_dtype(dtype)
}

/// The causal softmax from primitives: the fallback and the tests' reference.
pub(crate) fn causal_softmax_reference(scores: &Tensor, scale: f64) -> CResult<Tensor> {
    let (t, s) = (scores.dim(D::Minus2)?, scores.dim(D::Minus1)?);
    let mut att = (scores * scale)?;
    if t > 1 {
        att = att.broadcast_add(&causal_mask(t, s, scores.dtype(), scores.device())?)?;
    }
    candle_nn::ops::softmax(&att, D::Minus1)
}

/// softmax(scale * scores + causal mask) over the last dimension of scores
/// [..., T, S] (S >= T; the T queries are the last T of the S positions),
/// differentiable.
pub(crate) fn causal_softmax(scores: &Tensor, scale: f64) -> CResult<Tensor> {
    let dims = scores.dims();
    let ok =
        dims.len() >= 2 && dims[dims.len() - 2] > 0 && dims[dims.len() - 1] >= dims[dims.len() - 2];
    if fast_path(scores) && ok {
        scores.contiguous()?.apply_op1(CausalSoftmax { scale })
    } else {
        causal_softmax_reference(scores, scale)
    }
}

const SQRT_TWO_OVER_PI: f64 = 0.797_884_560_802_865_4;
const GELU_A: f64 = 0.044715;

fn gelu_fwd<T: Real>(x: &[T]) -> Vec<T> {
    let mut out = vec![T::zero(); x.len()];
    let (k, a, half): (T, T, T) = (c(SQRT_TWO_OVER_PI), c(GELU_A), c(0.5));
    par_rows(
        &mut out,
        1,
        #[inline(always)]
        |r0, out| {
            for (y, &v) in out.iter_mut().zip(&x[r0..]) {
                // The same expression as candle's `gelu` (tanh approximation).
                *y = half * v * (T::one() + (k * v * (T::one() + a * v * v)).tanh());
            }
        },
    );
    out
}

/// dx = g * (0.5 (1 + t) + 0.5 x (1 - t^2) k (1 + 3 a x^2)),
/// t = tanh(k x (1 + a x^2)).
fn gelu_bwd<T: Real>(x: &[T], g: &[T]) -> Vec<T> {
    let mut out = vec![T::zero(); x.len()];
    let (k, a, half, three): (T, T, T, T) = (c(SQRT_TWO_OVER_PI), c(GELU_A), c(0.5), c(3.0));
    par_rows(
        &mut out,
        1,
        #[inline(always)]
        |r0, out| {
            for ((d, &v), &gv) in out.iter_mut().zip(&x[r0..]).zip(&g[r0..]) {
                let th = (k * v * (T::one() + a * v * v)).tanh();
                let dy = half * (T::one() + th)
                    + half * v * (T::one() - th * th) * k * (T::one() + three * a * v * v);
                *d = gv * dy;
            }
        },
    );
    out
}

/// GELU: the tanh approximation (candle's `gelu`), or with `exact` the erf
/// form (candle's `gelu_erf`).
struct Gelu {
    exact: bool,
}

impl Gelu {
    fn fwd<T: Real>(&self, x: &[T]) -> Vec<T> {
        if self.exact {
            gelu_erf_fwd(x)
        } else {
            gelu_fwd(x)
        }
    }

    fn bwd<T: Real>(&self, x: &[T], g: &[T]) -> Vec<T> {
        if self.exact {
            gelu_erf_bwd(x, g)
        } else {
            gelu_bwd(x, g)
        }
    }
}

impl CustomOp1 for Gelu {
    fn name(&self) -> &'static str {
        if self.exact {
            "hone-gelu-erf"
        } else {
            "hone-gelu"
        }
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> CResult<(CpuStorage, Shape)> {
        let out = match s {
            CpuStorage::F32(v) => CpuStorage::F32(self.fwd(slice(v, l)?)),
            CpuStorage::F64(v) => CpuStorage::F64(self.fwd(slice(v, l)?)),
            _ => candle_core::bail!("{}: f32 or f64 only", self.name()),
        };
        Ok((out, l.shape().clone()))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> CResult<Option<Tensor>> {
        let grad = grad.contiguous()?;
        let bwd = GeluBwd { exact: self.exact };
        Ok(Some(arg.apply_op2_no_bwd(&grad, &bwd)?))
    }
}

/// (x, grad of gelu(x)) -> grad of x.
struct GeluBwd {
    exact: bool,
}

impl CustomOp2 for GeluBwd {
    fn name(&self) -> &'static str {
        if self.exact {
            "hone-gelu-erf-bwd"
        } else {
            "hone-gelu-bwd"
        }
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        if l1.shape() != l2.shape() {
            candle_core::bail!("{}: shape mismatch", self.name());
        }
        let op = Gelu { exact: self.exact };
        let out = match (s1, s2) {
            (CpuStorage::F32(x), CpuStorage::F32(g)) => {
                CpuStorage::F32(op.bwd(slice(x, l1)?, slice(g, l2)?))
            }
            (CpuStorage::F64(x), CpuStorage::F64(g)) => {
                CpuStorage::F64(op.bwd(slice(x, l1)?, slice(g, l2)?))
            }
            _ => candle_core::bail!("{}: f32 or f64 only", self.name()),
        };
        Ok((out, l1.shape().clone()))
    }
}

/// GELU (tanh approximation, as candle's `gelu`), differentiable.
pub(crate) fn gelu(x: &Tensor) -> CResult<Tensor> {
    if fast_path(x) && x.elem_count() > 0 {
        x.contiguous()?.apply_op1(Gelu { exact: false })
    } else {
        x.gelu()
    }
}

const FRAC_1_SQRT_2: f64 = std::f64::consts::FRAC_1_SQRT_2;
/// 1 / sqrt(2 pi), the standard normal density at 0.
const FRAC_1_SQRT_2PI: f64 = 0.398_942_280_401_432_7;

/// x Phi(x) = 0.5 x (1 + erf(x / sqrt 2)): BERT's GELU (candle's `gelu_erf`).
fn gelu_erf_fwd<T: Real>(x: &[T]) -> Vec<T> {
    let mut out = vec![T::zero(); x.len()];
    let (r, half): (T, T) = (c(FRAC_1_SQRT_2), c(0.5));
    par_rows(
        &mut out,
        1,
        #[inline(always)]
        |r0, out| {
            for (y, &v) in out.iter_mut().zip(&x[r0..]) {
                *y = half * v * (T::one() + (v * r).erf());
            }
        },
    );
    out
}

/// dx = g (Phi(x) + x phi(x)), phi(x) = e^(-x^2 / 2) / sqrt(2 pi).
fn gelu_erf_bwd<T: Real>(x: &[T], g: &[T]) -> Vec<T> {
    let mut out = vec![T::zero(); x.len()];
    let (r, half, density): (T, T, T) = (c(FRAC_1_SQRT_2), c(0.5), c(FRAC_1_SQRT_2PI));
    par_rows(
        &mut out,
        1,
        #[inline(always)]
        |r0, out| {
            for ((d, &v), &gv) in out.iter_mut().zip(&x[r0..]).zip(&g[r0..]) {
                let cdf = half * (T::one() + (v * r).erf());
                *d = gv * (cdf + v * density * (T::zero() - half * v * v).exp());
            }
        },
    );
    out
}

/// GELU in its exact form, x Phi(x) (as candle's `gelu_erf`, BERT's
/// activation), differentiable.
pub(crate) fn gelu_erf(x: &Tensor) -> CResult<Tensor> {
    if fast_path(x) && x.elem_count() > 0 {
        x.contiguous()?.apply_op1(Gelu { exact: true })
    } else {
        x.gelu_erf()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn max_abs(a: &Tensor) -> f64 {
        a.abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
        max_abs(&(a - b).unwrap())
    }

    /// Max abs difference relative to the reference's largest entry.
    fn rel_diff(a: &Tensor, reference: &Tensor) -> f64 {
        max_diff(a, reference) / max_abs(reference).max(1e-12)
    }

    fn randn(shape: &[usize], std: f64, dtype: DType) -> Tensor {
        Tensor::randn(0f64, std, shape, &Device::Cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap()
    }

    /// Runs `f` on fresh variables holding `inputs`, backpropagates a random
    /// weighted sum of the output, and returns the output and the inputs'
    /// gradients.
    fn run(
        inputs: &[Tensor],
        weights: &Tensor,
        f: &dyn Fn(&[Tensor]) -> CResult<Tensor>,
    ) -> (Tensor, Vec<Tensor>) {
        let vars: Vec<Var> = inputs
            .iter()
            .map(|t| Var::from_tensor(t).unwrap())
            .collect();
        let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let y = f(&ts).unwrap();
        let loss = (&y * weights).unwrap().sum_all().unwrap();
        let grads = loss.backward().unwrap();
        let gs = ts
            .iter()
            .map(|t| grads.get(t).expect("no gradient").clone())
            .collect();
        (y, gs)
    }

    /// The fused op against the primitive composition: forward within 1e-5
    /// (absolute), gradients within 1e-4 (relative to the largest entry),
    /// in f32 and f64, and every gradient non-zero.
    fn compare(
        shapes: &[&[usize]],
        out_shape: &[usize],
        fused: &dyn Fn(&[Tensor]) -> CResult<Tensor>,
        reference: &dyn Fn(&[Tensor]) -> CResult<Tensor>,
    ) {
        for dtype in [DType::F32, DType::F64] {
            let inputs: Vec<Tensor> = shapes
                .iter()
                .map(|s| (randn(s, 1.5, dtype) + 0.3).unwrap())
                .collect();
            let weights = randn(out_shape, 1.0, dtype);
            let (y1, g1) = run(&inputs, &weights, fused);
            let (y2, g2) = run(&inputs, &weights, reference);
            assert_eq!(y1.dims(), y2.dims());
            let fwd = max_diff(&y1, &y2);
            assert!(fwd < 1e-5, "{dtype:?} forward differs by {fwd}");
            for (i, (a, b)) in g1.iter().zip(&g2).enumerate() {
                assert_eq!(a.dims(), b.dims());
                let rel = rel_diff(a, b);
                assert!(
                    rel < 1e-4,
                    "{dtype:?} gradient {i} differs by {rel} (relative)"
                );
                assert!(max_abs(a) > 0.0, "{dtype:?} gradient {i} is zero");
            }
        }
    }

    #[test]
    fn layer_norm_matches_primitives() {
        for shape in [&[3usize, 5, 37][..], &[2, 4000, 8], &[1, 64]] {
            let d = shape[shape.len() - 1];
            compare(
                &[shape, &[d], &[d]],
                shape,
                &|t| layer_norm(&t[0], &t[1], &t[2], 1e-5),
                &|t| layer_norm_reference(&t[0], &t[1], &t[2], 1e-5),
            );
        }
    }

    #[test]
    fn layer_norm_of_a_constant_row() {
        // var = 0: the row normalises to zeros, the output is the bias.
        let x = Tensor::ones((2, 16), DType::F32, &Device::Cpu).unwrap();
        let w = randn(&[16], 1.0, DType::F32);
        let b = randn(&[16], 1.0, DType::F32);
        let y = layer_norm(&x, &w, &b, 1e-5).unwrap();
        let r = layer_norm_reference(&x, &w, &b, 1e-5).unwrap();
        assert!(max_diff(&y, &r) < 1e-6);
    }

    #[test]
    fn causal_softmax_matches_primitives() {
        // Full attention (T = S), with a cache (S > T, incl. one query), and
        // a size that runs on several threads. The first row of each [T, S]
        // block with T = S has every key but one masked.
        for shape in [
            &[2usize, 3, 7, 7][..],
            &[2, 2, 5, 9],
            &[1, 3, 1, 6],
            &[4, 4, 64, 64],
        ] {
            compare(&[shape], shape, &|t| causal_softmax(&t[0], 0.35), &|t| {
                causal_softmax_reference(&t[0], 0.35)
            });
        }
    }

    #[test]
    fn causal_softmax_masks_and_normalises() {
        let x = randn(&[2, 5, 5], 3.0, DType::F32);
        let y = causal_softmax(&x, 1.0).unwrap();
        let y: Vec<Vec<Vec<f32>>> = y.to_vec3().unwrap();
        for block in &y {
            for (i, row) in block.iter().enumerate() {
                assert!(row[i + 1..].iter().all(|&p| p == 0.0), "{row:?}");
                assert!(row[..=i].iter().all(|&p| p > 0.0), "{row:?}");
                let sum: f32 = row.iter().sum();
                assert!((sum - 1.0).abs() < 1e-6);
            }
            assert_eq!(block[0][0], 1.0);
        }
    }

    #[test]
    fn tanh_f32_is_within_1e_6_of_tanh() {
        let mut worst = 0f64;
        for i in -200_000..=200_000 {
            let x = i as f32 * 1e-4;
            let err = (tanh_f32(x) as f64 - (x as f64).tanh()).abs();
            worst = worst.max(err);
        }
        assert!(worst < 1e-6, "tanh_f32 is off by {worst}");
        for x in [f32::MAX, f32::MIN, 1e30, -1e30, f32::INFINITY, 0.0] {
            let err = (tanh_f32(x) - x.tanh()).abs();
            assert!(err < 1e-6, "tanh_f32({x}) is off by {err}");
        }
        assert!(tanh_f32(f32::NAN).is_nan());
    }

    #[test]
    fn exp_f32_is_within_3e_7_of_exp() {
        let mut worst = 0f64;
        for i in -873_000..=883_000 {
            let x = i as f32 * 1e-4;
            let e = (x as f64).exp();
            worst = worst.max((exp_f32(x) as f64 - e).abs() / e);
        }
        assert!(worst < 3e-7, "exp_f32 is off by {worst} (relative)");
        assert_eq!(exp_f32(0.0), 1.0);
        assert_eq!(exp_f32(-100.0), 0.0);
        assert_eq!(exp_f32(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_f32(100.0), f32::INFINITY);
        assert!(exp_f32(f32::NAN).is_nan());
    }

    #[test]
    fn gelu_matches_primitives() {
        for shape in [&[3usize, 5, 37][..], &[64, 1024]] {
            compare(&[shape], shape, &|t| gelu(&t[0]), &|t| t[0].gelu());
        }
    }

    #[test]
    fn erf_f32_is_within_1e_6_of_erf() {
        let mut worst = 0f64;
        for i in -100_000..=100_000 {
            let x = i as f32 * 1e-4;
            let err = (erf_f32(x) as f64 - candle_core::cpu::erf::erf_f64(x as f64)).abs();
            worst = worst.max(err);
        }
        assert!(worst < 1e-6, "erf_f32 is off by {worst}");
        for (x, e) in [
            (f32::INFINITY, 1.0),
            (f32::NEG_INFINITY, -1.0),
            (0.0, 0.0),
            (1e30, 1.0),
        ] {
            assert!(
                (erf_f32(x) - e).abs() < 1e-6,
                "erf_f32({x}) = {}",
                erf_f32(x)
            );
        }
        assert!(erf_f32(f32::NAN).is_nan());
    }

    #[test]
    fn gelu_erf_matches_primitives() {
        for shape in [&[3usize, 5, 37][..], &[64, 1024]] {
            compare(&[shape], shape, &|t| gelu_erf(&t[0]), &|t| t[0].gelu_erf());
        }
    }

    #[test]
    fn non_contiguous_inputs() {
        let x = randn(&[6, 4], 1.0, DType::F32).t().unwrap();
        let w = randn(&[6], 1.0, DType::F32);
        let b = randn(&[6], 1.0, DType::F32);
        let y = layer_norm(&x, &w, &b, 1e-5).unwrap();
        let r = layer_norm_reference(&x, &w, &b, 1e-5).unwrap();
        assert!(max_diff(&y, &r) < 1e-5);
        let s = randn(&[2, 5, 5], 1.0, DType::F32).transpose(1, 2).unwrap();
        let y = causal_softmax(&s, 0.5).unwrap();
        let r = causal_softmax_reference(&s, 0.5).unwrap();
        assert!(max_diff(&y, &r) < 1e-6);
        let y = gelu(&x).unwrap();
        let r = x.gelu().unwrap();
        assert!(max_diff(&y, &r) < 1e-6);
    }
}
