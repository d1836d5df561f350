//! `log softmax(logits)[target]` per row, as one op with its own backward:
//! the token log-probabilities every loss over a language model's outputs
//! starts from (cross-entropy, DPO's sequence sums, policy-gradient ratios).
//!
//! Composed from candle primitives (`log_softmax`, then `gather`), a row of
//! a 49,152-token vocabulary (SmolLM2's) goes through five full-width
//! tensors forward and as many backward, each freshly allocated and zeroed:
//! in a SmolLM2 training step that was a fifth of the time, in page faults
//! alone. Here the forward reads each row twice (its max, then the sum of
//! exponentials) and writes one number; the backward writes the row's
//! gradient once, `g · (onehot(target) - softmax(row))`, with the row's
//! log-sum-exp recovered from the output (`logit[target] - out`), so
//! nothing is kept between the passes.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Shape, Tensor};

use crate::ops::{max, par_rows, simd, slice, sum, Real};

type CResult<T> = candle_core::Result<T>;

/// `log softmax(logits)[i, targets[i]]` for logits `[N, V]`: `[N]`,
/// differentiable in the logits. On other devices and dtypes, the
/// composition of candle primitives.
pub fn picked_logprobs(logits: &Tensor, targets: &[u32]) -> CResult<Tensor> {
    let (n, v) = logits.dims2()?;
    if targets.len() != n {
        candle_core::bail!("picked_logprobs: {n} rows but {} targets", targets.len());
    }
    if let Some(t) = targets.iter().find(|&&t| t as usize >= v) {
        candle_core::bail!("picked_logprobs: target {t} outside a vocabulary of {v}");
    }
    let fused = logits.device().is_cpu()
        && matches!(
            logits.dtype(),
            candle_core::DType::F32 | candle_core::DType::F64
        );
    if !fused || n == 0 {
        return reference(logits, targets);
    }
    logits.contiguous()?.apply_op1(Picked {
        targets: targets.to_vec(),
    })
}

/// The primitives' composition: the fallback and the tests' reference.
pub(crate) fn reference(logits: &Tensor, targets: &[u32]) -> CResult<Tensor> {
    let lp = candle_nn::ops::log_softmax(logits, candle_core::D::Minus1)?;
    let t = Tensor::new(targets, logits.device())?.unsqueeze(1)?;
    lp.gather(&t, 1)?.squeeze(1)
}

struct Picked {
    targets: Vec<u32>,
}

/// log(sum(exp(row - max))) + max: the row's log-sum-exp.
#[inline(always)]
fn log_sum_exp<T: Real>(row: &[T], scratch: &mut [T]) -> T {
    let m = max(row);
    for (s, &x) in scratch.iter_mut().zip(row) {
        *s = (x - m).exp();
    }
    T::from_f64(sum(scratch).to_f64().ln()) + m
}

fn forward<T: Real>(logits: &[T], v: usize, targets: &[u32]) -> Vec<T> {
    use rayon::prelude::*;
    let n = targets.len();
    let rows = |first: usize, out: &mut [T]| {
        let mut scratch = vec![T::zero(); v];
        for (k, o) in out.iter_mut().enumerate() {
            let i = first + k;
            let row = &logits[i * v..(i + 1) * v];
            *o = row[targets[i] as usize] - log_sum_exp(row, &mut scratch);
        }
    };
    let mut out = vec![T::zero(); n];
    // The rows split over candle's threads on rayon's pool, as par_rows
    // splits a row-shaped output (here one number a row).
    let threads = candle_core::utils::get_num_threads().min(n).max(1);
    let per = n.div_ceil(threads);
    out.par_chunks_mut(per).enumerate().for_each(|(c, chunk)| {
        simd(
            #[inline(always)]
            || rows(c * per, chunk),
        )
    });
    out
}

impl CustomOp1 for Picked {
    fn name(&self) -> &'static str {
        "hone-picked-logprobs"
    }

    fn cpu_fwd(&self, st: &CpuStorage, l: &Layout) -> CResult<(CpuStorage, Shape)> {
        let (n, v) = l.shape().dims2()?;
        let out = match st {
            CpuStorage::F32(x) => CpuStorage::F32(forward(slice(x, l)?, v, &self.targets)),
            CpuStorage::F64(x) => CpuStorage::F64(forward(slice(x, l)?, v, &self.targets)),
            _ => candle_core::bail!("hone-picked-logprobs: f32 or f64 only"),
        };
        Ok((out, Shape::from(n)))
    }

    fn bwd(&self, arg: &Tensor, res: &Tensor, grad: &Tensor) -> CResult<Option<Tensor>> {
        // (logits, [out, grad] side by side) -> the logits' gradient.
        let side = Tensor::stack(&[res.detach(), grad.detach().contiguous()?], 1)?;
        Ok(Some(arg.detach().apply_op2_no_bwd(
            &side,
            &PickedBwd {
                targets: self.targets.clone(),
            },
        )?))
    }
}

/// (logits [N, V], [out, grad] [N, 2]) -> `grad_i (onehot(t_i) - softmax_i)`.
struct PickedBwd {
    targets: Vec<u32>,
}

fn backward<T: Real>(logits: &[T], side: &[T], v: usize, targets: &[u32]) -> Vec<T> {
    let mut dx = vec![T::zero(); logits.len()];
    par_rows(&mut dx, v, |first, chunk| {
        for (k, d) in chunk.chunks_exact_mut(v).enumerate() {
            let i = first + k;
            let row = &logits[i * v..(i + 1) * v];
            let t = targets[i] as usize;
            let (out, g) = (side[2 * i], side[2 * i + 1]);
            let lse = row[t] - out;
            let minus_g = T::zero() - g;
            for (d, &x) in d.iter_mut().zip(row) {
                *d = minus_g * (x - lse).exp();
            }
            d[t] += g;
        }
    });
    dx
}

impl CustomOp2 for PickedBwd {
    fn name(&self) -> &'static str {
        "hone-picked-logprobs-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        let (_, v) = l1.shape().dims2()?;
        let out = match (s1, s2) {
            (CpuStorage::F32(x), CpuStorage::F32(s)) => {
                CpuStorage::F32(backward(slice(x, l1)?, slice(s, l2)?, v, &self.targets))
            }
            (CpuStorage::F64(x), CpuStorage::F64(s)) => {
                CpuStorage::F64(backward(slice(x, l1)?, slice(s, l2)?, v, &self.targets))
            }
            _ => candle_core::bail!("hone-picked-logprobs-bwd: f32 or f64 only"),
        };
        Ok((out, l1.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Var};

    fn max_abs(a: &Tensor, b: &Tensor) -> f64 {
        (a - b)
            .unwrap()
            .abs()
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

    #[test]
    fn forward_and_gradient_match_log_softmax_then_gather() {
        for (dtype, tol) in [(DType::F32, 1e-5), (DType::F64, 1e-12)] {
            // Enough rows and width for several threads; logits far apart
            // so the max matters.
            let (n, v) = (37, 3001);
            let x = (Tensor::randn(0f64, 4.0, (n, v), &Device::Cpu).unwrap())
                .to_dtype(dtype)
                .unwrap();
            let x = Var::from_tensor(&x).unwrap();
            let targets: Vec<u32> = (0..n).map(|i| ((i * 977) % v) as u32).collect();
            let weights = Tensor::randn(0f64, 1.0, n, &Device::Cpu)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let fused = picked_logprobs(x.as_tensor(), &targets).unwrap();
            let plain = reference(x.as_tensor(), &targets).unwrap();
            assert!(max_abs(&fused, &plain) < tol * 10.0, "{dtype:?} forward");
            let loss = |y: &Tensor| (y * &weights).unwrap().sum_all().unwrap();
            let g_fused = loss(&fused).backward().unwrap();
            let g_plain = loss(&plain).backward().unwrap();
            let (a, b) = (
                g_fused.get(x.as_tensor()).unwrap(),
                g_plain.get(x.as_tensor()).unwrap(),
            );
            assert!(max_abs(a, b) < tol, "{dtype:?} gradient: {}", max_abs(a, b));
        }
    }

    #[test]
    fn bad_targets_are_errors() {
        let x = Tensor::zeros((2, 5), DType::F32, &Device::Cpu).unwrap();
        assert!(picked_logprobs(&x, &[0]).is_err());
        assert!(picked_logprobs(&x, &[0, 5]).is_err());
    }
}
