//! A linear layer, `y = x W^T + b`, as one op with its own backward pass.
//!
//! candle's `Linear` is a chain of graph nodes (the weight's transpose, a
//! reshape, the matmul, a reshape back, the bias broadcast and its add), and
//! candle accumulates each node's gradient into a fresh zeroed buffer. Its
//! backward also reduces the bias gradient over the broadcast rows with
//! candle's generic strided sum, one output column at a time through 2,048
//! rows: 17 % of a training step of the benchmark GPT. Here the forward is
//! one gemm into rows pre-filled with the bias, and the backward is two gemms
//! and a row-by-row column sum. Other devices and dtypes fall back to
//! candle's `Linear`, which is also what the tests compare against.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Module, Shape};
use candle_core::{Tensor, WithDType};

use crate::matmul::{gemm, Mat, MatMut, Threads};
use crate::ops::slice;

type CResult<T> = candle_core::Result<T>;

/// `y = x W^T + b` over the last dimension of `x`, with weight `[out, in]`
/// and bias `[out]`: `candle_nn::Linear` with a fused CPU path.
#[derive(Clone, Debug)]
pub struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
    /// A LoRA update on the (then frozen) weight.
    adapter: Option<crate::lora::Lora>,
}

impl Linear {
    /// A layer of `weight` `[out, in]` and an optional `bias` `[out]`.
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self {
            weight,
            bias,
            adapter: None,
        }
    }

    /// This layer with a LoRA `adapter`: the weight and bias are detached
    /// (frozen, so no backward pass computes their gradients) and the
    /// adapter's update is added to the output.
    pub fn with_adapter(self, adapter: crate::lora::Lora) -> Self {
        Self {
            weight: self.weight.detach(),
            bias: self.bias.map(|b| b.detach()),
            adapter: Some(adapter),
        }
    }

    /// This layer frozen: the weight and bias detached, so no backward pass
    /// computes their gradients (an adapter, if any, still trains).
    pub fn frozen(self) -> Self {
        Self {
            weight: self.weight.detach(),
            bias: self.bias.map(|b| b.detach()),
            adapter: self.adapter,
        }
    }

    /// The LoRA adapter, if the layer has one.
    pub fn adapter(&self) -> Option<&crate::lora::Lora> {
        self.adapter.as_ref()
    }

    /// The weight, `[out, in]`.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// The bias, `[out]`, if the layer has one.
    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    fn fused(&self, x: &Tensor) -> bool {
        let same = |t: &Tensor| t.dtype() == x.dtype() && t.device().is_cpu();
        x.device().is_cpu()
            && matches!(x.dtype(), DType::F32 | DType::F64)
            && x.rank() >= 1
            && x.elem_count() > 0
            && same(&self.weight)
            && self.weight.rank() == 2
            && self.weight.dim(1).ok() == x.dims().last().copied()
            && self.bias.as_ref().is_none_or(|b| same(b) && b.rank() == 1)
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> CResult<Tensor> {
        let y = self.forward_base(x)?;
        match &self.adapter {
            None => Ok(y),
            Some(a) => y + a.forward(x)?,
        }
    }
}

impl Linear {
    /// `x W^T + b`, without the adapter.
    fn forward_base(&self, x: &Tensor) -> CResult<Tensor> {
        if !self.fused(x) {
            return candle_nn::Linear::new(self.weight.clone(), self.bias.clone()).forward(x);
        }
        let (x, w) = (x.contiguous()?, self.weight.contiguous()?);
        match &self.bias {
            Some(b) => x.apply_op3(&w, &b.contiguous()?, FusedLinear),
            None => x.apply_op2(&w, FusedLinear),
        }
    }
}

/// The last dimension of `l` and the number of rows before it.
fn rows_cols(l: &Layout) -> CResult<(usize, usize)> {
    match l.dims().last() {
        Some(&c) if c > 0 => Ok((l.shape().elem_count() / c, c)),
        _ => candle_core::bail!("hone-linear: empty last dimension in {:?}", l.dims()),
    }
}

/// `l`'s shape with its last dimension replaced by `last`.
fn with_last(l: &Layout, last: usize) -> Shape {
    let mut dims = l.dims().to_vec();
    if let Some(d) = dims.last_mut() {
        *d = last;
    }
    Shape::from(dims)
}

/// Inputs of at most this many rows take the path for decoding in
/// [`forward`].
const FEW_ROWS: usize = 64;

/// `x [.., k] w[n, k]^T + b [n]`.
fn forward<T: WithDType>(
    (x, xl): (&[T], &Layout),
    (w, wl): (&[T], &Layout),
    b: Option<&[T]>,
) -> CResult<(Vec<T>, Shape)> {
    let (n, k) = wl.shape().dims2()?;
    let (m, xk) = rows_cols(xl)?;
    if xk != k || b.is_some_and(|b| b.len() != n) {
        candle_core::bail!(
            "hone-linear: input {:?}, weight [{n}, {k}], bias of {:?}",
            xl.dims(),
            b.map(<[T]>::len)
        );
    }
    let (x, w) = (Mat::rows(x, k), Mat::transposed(w, k));
    if m > FEW_ROWS {
        let mut y = match b {
            Some(b) => b.repeat(m),
            None => vec![T::zero(); m * n],
        };
        gemm(
            (m, n, k),
            MatMut::rows(&mut y, n),
            b.is_some(),
            x,
            w,
            Threads::Candle,
        );
        return Ok((y, with_last(xl, n)));
    }
    // A few rows (a decoding step): gemm, asked for a row-major result,
    // computes its transpose and would repack the whole weight on every
    // call; a column-major result keeps the weight in place and only the
    // few input rows get packed. Then transpose (m x n, small) into y.
    let mut yt = vec![T::zero(); m * n];
    gemm(
        (m, n, k),
        MatMut::columns(&mut yt, m),
        false,
        x,
        w,
        Threads::Candle,
    );
    let mut y = vec![T::zero(); m * n];
    for (i, row) in y.chunks_exact_mut(n).enumerate() {
        for (j, out) in row.iter_mut().enumerate() {
            *out = yt[j * m + i] + b.map_or(T::zero(), |b| b[j]);
        }
    }
    Ok((y, with_last(xl, n)))
}

impl CustomOp2 for FusedLinear {
    fn name(&self) -> &'static str {
        "hone-linear"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        xl: &Layout,
        w: &CpuStorage,
        wl: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        match (x, w) {
            (CpuStorage::F32(x), CpuStorage::F32(w)) => {
                let (y, s) = forward((slice(x, xl)?, xl), (slice(w, wl)?, wl), None)?;
                Ok((CpuStorage::F32(y), s))
            }
            (CpuStorage::F64(x), CpuStorage::F64(w)) => {
                let (y, s) = forward((slice(x, xl)?, xl), (slice(w, wl)?, wl), None)?;
                Ok((CpuStorage::F64(y), s))
            }
            _ => candle_core::bail!("hone-linear: f32 or f64 only, one dtype"),
        }
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>)> {
        let g = grad.detach().contiguous()?;
        // candle asks for every argument's gradient, and keeps only those
        // of the arguments it tracks: skip the others' gemms (a frozen
        // weight, a LoRA layer's base weight, detached cached states).
        Ok((
            x.track_op()
                .then(|| g.apply_op2_no_bwd(&w.detach(), &Grad::Input))
                .transpose()?,
            w.track_op()
                .then(|| g.apply_op2_no_bwd(&x.detach(), &Grad::Weight))
                .transpose()?,
        ))
    }
}

impl CustomOp3 for FusedLinear {
    fn name(&self) -> &'static str {
        "hone-linear"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        xl: &Layout,
        w: &CpuStorage,
        wl: &Layout,
        b: &CpuStorage,
        bl: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        match (x, w, b) {
            (CpuStorage::F32(x), CpuStorage::F32(w), CpuStorage::F32(b)) => {
                let b = Some(slice(b, bl)?);
                let (y, s) = forward((slice(x, xl)?, xl), (slice(w, wl)?, wl), b)?;
                Ok((CpuStorage::F32(y), s))
            }
            (CpuStorage::F64(x), CpuStorage::F64(w), CpuStorage::F64(b)) => {
                let b = Some(slice(b, bl)?);
                let (y, s) = forward((slice(x, xl)?, xl), (slice(w, wl)?, wl), b)?;
                Ok((CpuStorage::F64(y), s))
            }
            _ => candle_core::bail!("hone-linear: f32 or f64 only, one dtype"),
        }
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let g = grad.detach().contiguous()?;
        // As above: only the tracked arguments' gradients.
        Ok((
            x.track_op()
                .then(|| g.apply_op2_no_bwd(&w.detach(), &Grad::Input))
                .transpose()?,
            w.track_op()
                .then(|| g.apply_op2_no_bwd(&x.detach(), &Grad::Weight))
                .transpose()?,
            b.track_op()
                .then(|| g.apply_op1_no_bwd(&ColumnSums))
                .transpose()?,
        ))
    }
}

/// The forward and backward of [`Linear`] on the CPU.
struct FusedLinear;

/// A gradient of [`FusedLinear`] from the output's gradient `g [.., n]` and
/// one forward input.
enum Grad {
    /// `g w` with `w [n, k]`: the input's gradient, `[.., k]`.
    Input,
    /// `g^T x` with `x [.., k]`: the weight's gradient, `[n, k]`.
    Weight,
}

#[cfg(test)]
thread_local! {
    /// Gradient products computed on this thread, for the tests that check
    /// which ones a backward pass skips: (input, weight).
    static GRADS_COMPUTED: std::cell::Cell<(usize, usize)> = const { std::cell::Cell::new((0, 0)) };
}

fn grad<T: WithDType>(
    wrt: &Grad,
    (g, gl): (&[T], &Layout),
    (o, ol): (&[T], &Layout),
) -> CResult<(Vec<T>, Shape)> {
    #[cfg(test)]
    GRADS_COMPUTED.with(|c| {
        let (i, w) = c.get();
        c.set(match wrt {
            Grad::Input => (i + 1, w),
            Grad::Weight => (i, w + 1),
        });
    });
    let (m, n) = rows_cols(gl)?;
    match wrt {
        Grad::Input => {
            let (wn, k) = ol.shape().dims2()?;
            if wn != n {
                candle_core::bail!(
                    "hone-linear-grad: {:?} against weight [{wn}, {k}]",
                    gl.dims()
                );
            }
            let mut gx = vec![T::zero(); m * k];
            let (g, w) = (Mat::rows(g, n), Mat::rows(o, k));
            gemm(
                (m, k, n),
                MatMut::rows(&mut gx, k),
                false,
                g,
                w,
                Threads::Candle,
            );
            Ok((gx, with_last(gl, k)))
        }
        Grad::Weight => {
            let (xm, k) = rows_cols(ol)?;
            if xm != m {
                candle_core::bail!(
                    "hone-linear-grad: {:?} against input {:?}",
                    gl.dims(),
                    ol.dims()
                );
            }
            let mut gw = vec![T::zero(); n * k];
            let (gt, x) = (Mat::transposed(g, n), Mat::rows(o, k));
            gemm(
                (n, k, m),
                MatMut::rows(&mut gw, k),
                false,
                gt,
                x,
                Threads::Candle,
            );
            Ok((gw, Shape::from((n, k))))
        }
    }
}

impl CustomOp2 for Grad {
    fn name(&self) -> &'static str {
        "hone-linear-grad"
    }

    fn cpu_fwd(
        &self,
        g: &CpuStorage,
        gl: &Layout,
        o: &CpuStorage,
        ol: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        match (g, o) {
            (CpuStorage::F32(g), CpuStorage::F32(o)) => {
                let (v, s) = grad(self, (slice(g, gl)?, gl), (slice(o, ol)?, ol))?;
                Ok((CpuStorage::F32(v), s))
            }
            (CpuStorage::F64(g), CpuStorage::F64(o)) => {
                let (v, s) = grad(self, (slice(g, gl)?, gl), (slice(o, ol)?, ol))?;
                Ok((CpuStorage::F64(v), s))
            }
            _ => candle_core::bail!("hone-linear-grad: f32 or f64 only, one dtype"),
        }
    }
}

/// `g [.., n]` -> its sums over every row, `[n]`: the bias's gradient.
struct ColumnSums;

fn column_sums<T: WithDType>(g: &[T], gl: &Layout) -> CResult<(Vec<T>, Shape)> {
    let (_, n) = rows_cols(gl)?;
    let mut sums = vec![T::zero(); n];
    // Row by row, so the inner loop runs over contiguous memory.
    for row in g.chunks_exact(n) {
        for (s, &v) in sums.iter_mut().zip(row) {
            *s += v;
        }
    }
    Ok((sums, Shape::from(n)))
}

impl CustomOp1 for ColumnSums {
    fn name(&self) -> &'static str {
        "hone-column-sums"
    }

    fn cpu_fwd(&self, g: &CpuStorage, gl: &Layout) -> CResult<(CpuStorage, Shape)> {
        match g {
            CpuStorage::F32(g) => {
                let (v, s) = column_sums(slice(g, gl)?, gl)?;
                Ok((CpuStorage::F32(v), s))
            }
            CpuStorage::F64(g) => {
                let (v, s) = column_sums(slice(g, gl)?, gl)?;
                Ok((CpuStorage::F64(v), s))
            }
            _ => candle_core::bail!("hone-column-sums: f32 or f64 only"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn backward_skips_the_gradients_of_untracked_arguments() {
        let computed = || GRADS_COMPUTED.with(|c| c.get());
        let x = Var::from_tensor(&randn(&[80, 8], DType::F32)).unwrap();
        let w = Var::from_tensor(&randn(&[6, 8], DType::F32)).unwrap();
        let b = Var::from_tensor(&randn(&[6], DType::F32)).unwrap();
        let run = |x: &Tensor, w: &Tensor, b: Option<&Tensor>| {
            let before = computed();
            let y = Linear::new(w.clone(), b.cloned()).forward(x).unwrap();
            let grads = y.sqr().unwrap().sum_all().unwrap().backward().unwrap();
            let after = computed();
            (grads, (after.0 - before.0, after.1 - before.1))
        };
        // Both tracked: both products.
        let (grads, n) = run(x.as_tensor(), w.as_tensor(), Some(b.as_tensor()));
        assert_eq!(n, (1, 1));
        assert!(grads.get(w.as_tensor()).is_some() && grads.get(b.as_tensor()).is_some());
        // A frozen weight (and bias): the input's gradient only.
        let (w0, b0) = (w.as_tensor().detach(), b.as_tensor().detach());
        let (grads, n) = run(x.as_tensor(), &w0, Some(&b0));
        assert_eq!(n, (1, 0));
        assert!(grads.get(x.as_tensor()).is_some());
        // A detached input (cached frozen states): the weight's only.
        let (grads, n) = run(&x.as_tensor().detach(), w.as_tensor(), None);
        assert_eq!(n, (0, 1));
        assert!(grads.get(w.as_tensor()).is_some());
    }

    fn randn(shape: &[usize], dtype: DType) -> Tensor {
        Tensor::randn(0f64, 1.0, shape, &Device::Cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap()
    }

    fn max_rel(a: &Tensor, reference: &Tensor) -> f64 {
        let diff = (a - reference)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap();
        let scale = reference.abs().unwrap().flatten_all().unwrap();
        let max = |t: Tensor| {
            t.max(0)
                .unwrap()
                .to_dtype(DType::F64)
                .unwrap()
                .to_scalar::<f64>()
                .unwrap()
        };
        max(diff) / max(scale).max(1e-12)
    }

    /// The output and the gradients of x, w (and b) of the fused layer or
    /// candle's, backpropagating a fixed weighting (sin of the index) of
    /// the output.
    fn run(x: &Tensor, w: &Tensor, b: Option<&Tensor>, fused: bool) -> Vec<Tensor> {
        let vars: Vec<Var> = [Some(x), Some(w), b]
            .into_iter()
            .flatten()
            .map(|t| Var::from_tensor(t).unwrap())
            .collect();
        let t: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let bias = t.get(2).cloned();
        let y = if fused {
            Linear::new(t[1].clone(), bias).forward(&t[0]).unwrap()
        } else {
            candle_nn::Linear::new(t[1].clone(), bias)
                .forward(&t[0])
                .unwrap()
        };
        let fixed = Tensor::arange(0u32, y.elem_count() as u32, &Device::Cpu)
            .unwrap()
            .to_dtype(y.dtype())
            .unwrap()
            .sin()
            .unwrap()
            .reshape(y.dims())
            .unwrap();
        let loss = (&y * &fixed).unwrap().sum_all().unwrap();
        let grads = loss.backward().unwrap();
        let mut out = vec![y];
        out.extend(t.iter().map(|t| grads.get(t).expect("a gradient").clone()));
        out
    }

    #[test]
    fn matches_candle_linear_forward_and_gradients() {
        for dtype in [DType::F32, DType::F64] {
            for (x_shape, n, bias) in [
                (&[4usize, 7, 5][..], 3usize, true),
                (&[2, 3, 4, 6][..], 9, true),
                (&[33, 16][..], 1, true),
                (&[5, 40][..], 24, false),
                // More than FEW_ROWS rows: the other path.
                (&[3, 40, 8][..], 12, true),
                (&[130, 9][..], 5, false),
            ] {
                let k = x_shape[x_shape.len() - 1];
                let x = randn(x_shape, dtype);
                let w = randn(&[n, k], dtype);
                let b = bias.then(|| randn(&[n], dtype));
                let fused = run(&x, &w, b.as_ref(), true);
                let reference = run(&x, &w, b.as_ref(), false);
                assert_eq!(fused.len(), reference.len());
                for (i, (a, r)) in fused.iter().zip(&reference).enumerate() {
                    assert_eq!(a.dims(), r.dims(), "output {i}");
                    let rel = max_rel(a, r);
                    assert!(
                        rel < 1e-5,
                        "{dtype:?} {x_shape:?} output {i} differs by {rel}"
                    );
                }
            }
        }
    }

    #[test]
    fn a_strided_input_is_made_contiguous() {
        let x = randn(&[6, 4], DType::F32).t().unwrap();
        let w = randn(&[3, 6], DType::F32);
        let y = Linear::new(w.clone(), None).forward(&x).unwrap();
        let r = candle_nn::Linear::new(w, None).forward(&x).unwrap();
        assert!(max_rel(&y, &r) < 1e-6);
    }

    #[test]
    fn a_shape_mismatch_is_an_error() {
        let x = randn(&[2, 5], DType::F32);
        let w = randn(&[3, 4], DType::F32);
        assert!(Linear::new(w, None).forward(&x).is_err());
    }
}
