//! AdamW (Loshchilov and Hutter) whose state can be taken out and put back,
//! so that a learner's snapshot at a round boundary holds its optimizer
//! moments and step count, not only its weights: a resumed run then takes
//! the same steps as an uninterrupted one. candle-nn's `AdamW` keeps its
//! moments private. The arithmetic is candle-nn's, operation for operation
//! (a test checks that both give the same weights), so swapping one for
//! the other changes no result.

use crate::{Error, Result, Tensor, Var};
use candle_core::backprop::GradStore;
pub use candle_nn::ParamsAdamW;
use serde::{Deserialize, Serialize};

/// One variable and its first and second moments.
struct Slot {
    var: Var,
    m: Tensor,
    v: Tensor,
}

/// AdamW over a fixed list of variables.
pub struct AdamW {
    slots: Vec<Slot>,
    step: u64,
    params: ParamsAdamW,
}

/// What [`AdamW::state`] takes out: the step count and each variable's
/// moments, in the optimizer's variable order, as f32.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdamWState {
    /// Steps taken (the bias corrections depend on it).
    pub step: u64,
    /// (first moment, second moment) of each variable, flattened.
    pub moments: Vec<(Vec<f32>, Vec<f32>)>,
}

impl AdamW {
    /// AdamW over `vars` with zero moments.
    pub fn new(vars: Vec<Var>, params: ParamsAdamW) -> Result<Self> {
        let slots = vars
            .into_iter()
            .map(|var| {
                let m = var.as_tensor().zeros_like()?;
                let v = m.clone();
                Ok(Slot { var, m, v })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(AdamW {
            slots,
            step: 0,
            params,
        })
    }

    /// Steps taken so far.
    pub fn steps(&self) -> u64 {
        self.step
    }

    /// One step on `grads`; a variable without a gradient keeps its weights
    /// and moments (as in candle-nn).
    pub fn step(&mut self, grads: &GradStore) -> Result<()> {
        self.step += 1;
        let p = &self.params;
        let (beta1, beta2) = (p.beta1, p.beta2);
        let t = i32::try_from(self.step).unwrap_or(i32::MAX);
        let scale_m = 1f64 / (1f64 - beta1.powi(t));
        let scale_v = 1f64 / (1f64 - beta2.powi(t));
        for slot in &mut self.slots {
            let theta = &slot.var;
            let Some(g) = grads.get(theta) else { continue };
            let next_m = ((&slot.m * beta1)? + (g * (1.0 - beta1))?)?;
            let next_v = ((&slot.v * beta2)? + (g.sqr()? * (1.0 - beta2))?)?;
            let m_hat = (&next_m * scale_m)?;
            let v_hat = (&next_v * scale_v)?;
            let decayed = (theta.as_tensor() * (1f64 - p.lr * p.weight_decay))?;
            let adjusted = (m_hat / (v_hat.sqrt()? + p.eps)?)?;
            theta.set(&(decayed - (adjusted * p.lr)?)?)?;
            slot.m = next_m;
            slot.v = next_v;
        }
        Ok(())
    }

    /// The step count and every moment, for a snapshot.
    pub fn state(&self) -> Result<AdamWState> {
        let flat = |t: &Tensor| -> Result<Vec<f32>> {
            Ok(t.flatten_all()?.to_dtype(crate::DType::F32)?.to_vec1()?)
        };
        Ok(AdamWState {
            step: self.step,
            moments: self
                .slots
                .iter()
                .map(|s| Ok((flat(&s.m)?, flat(&s.v)?)))
                .collect::<Result<_>>()?,
        })
    }

    /// Puts back what [`AdamW::state`] took out of an optimizer over the
    /// same variables; a state of another shape is refused, not truncated.
    pub fn restore(&mut self, state: &AdamWState) -> Result<()> {
        if state.moments.len() != self.slots.len() {
            return Err(Error::Invalid(format!(
                "optimizer state holds {} variables, the optimizer {}",
                state.moments.len(),
                self.slots.len()
            )));
        }
        let mut restored = Vec::with_capacity(self.slots.len());
        for (i, (slot, (m, v))) in self.slots.iter().zip(&state.moments).enumerate() {
            let shape = slot.var.shape();
            if m.len() != shape.elem_count() || v.len() != shape.elem_count() {
                return Err(Error::Invalid(format!(
                    "optimizer state of variable {i} holds {} and {} values for shape {:?}",
                    m.len(),
                    v.len(),
                    shape.dims()
                )));
            }
            let dtype = slot.var.dtype();
            let device = slot.var.device();
            restored.push((
                Tensor::from_slice(m, shape, device)?.to_dtype(dtype)?,
                Tensor::from_slice(v, shape, device)?.to_dtype(dtype)?,
            ));
        }
        for (slot, (m, v)) in self.slots.iter_mut().zip(restored) {
            slot.m = m;
            slot.v = v;
        }
        self.step = state.step;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Device;
    use candle_nn::Optimizer;

    fn vars() -> Vec<Var> {
        vec![
            Var::new(&[[1.0f32, -2.0], [0.5, 3.0]], &Device::Cpu).unwrap(),
            Var::new(&[0.25f32, -0.75, 2.0], &Device::Cpu).unwrap(),
        ]
    }

    /// A loss whose gradient changes from step to step.
    fn loss(vars: &[Var]) -> Tensor {
        let a = vars[0].as_tensor().sqr().unwrap().sum_all().unwrap();
        let b = (vars[1].as_tensor() * 3.0)
            .unwrap()
            .sin()
            .unwrap()
            .sum_all()
            .unwrap();
        (a + b).unwrap()
    }

    fn values(vars: &[Var]) -> Vec<Vec<f32>> {
        vars.iter()
            .map(|v| v.as_tensor().flatten_all().unwrap().to_vec1().unwrap())
            .collect()
    }

    fn params() -> ParamsAdamW {
        ParamsAdamW {
            lr: 0.05,
            weight_decay: 0.01,
            ..Default::default()
        }
    }

    #[test]
    fn it_takes_candle_nn_s_steps_exactly() {
        let (ours, theirs) = (vars(), vars());
        let mut a = AdamW::new(ours.clone(), params()).unwrap();
        let mut b = candle_nn::AdamW::new(theirs.clone(), params()).unwrap();
        for _ in 0..5 {
            a.step(&loss(&ours).backward().unwrap()).unwrap();
            b.step(&loss(&theirs).backward().unwrap()).unwrap();
        }
        assert_eq!(values(&ours), values(&theirs));
        assert_eq!(a.steps(), 5);
    }

    #[test]
    fn a_restored_optimizer_takes_the_same_steps_as_one_that_never_stopped() {
        let straight = vars();
        let mut opt = AdamW::new(straight.clone(), params()).unwrap();
        for _ in 0..6 {
            opt.step(&loss(&straight).backward().unwrap()).unwrap();
        }
        // Three steps, then the weights and the state go into a fresh one.
        let first = vars();
        let mut opt = AdamW::new(first.clone(), params()).unwrap();
        for _ in 0..3 {
            opt.step(&loss(&first).backward().unwrap()).unwrap();
        }
        let state = opt.state().unwrap();
        let resumed = vars();
        for (to, from) in resumed.iter().zip(&first) {
            to.set(from.as_tensor()).unwrap();
        }
        let mut opt = AdamW::new(resumed.clone(), params()).unwrap();
        opt.restore(&state).unwrap();
        for _ in 0..3 {
            opt.step(&loss(&resumed).backward().unwrap()).unwrap();
        }
        assert_eq!(values(&resumed), values(&straight));
        // Without the state, the bias correction restarts: not the same.
        let fresh = vars();
        for (to, from) in fresh.iter().zip(&first) {
            to.set(from.as_tensor()).unwrap();
        }
        let mut opt = AdamW::new(fresh.clone(), params()).unwrap();
        for _ in 0..3 {
            opt.step(&loss(&fresh).backward().unwrap()).unwrap();
        }
        assert_ne!(values(&fresh), values(&straight));
    }

    #[test]
    fn a_state_of_another_shape_is_refused() {
        let mut opt = AdamW::new(vars(), params()).unwrap();
        let mut state = opt.state().unwrap();
        state.moments.pop();
        assert!(opt.restore(&state).is_err());
        let mut state = opt.state().unwrap();
        state.moments[1].0.push(0.0);
        let err = opt.restore(&state).unwrap_err().to_string();
        assert!(err.contains("variable 1"), "{err}");
    }
}
