//! Policy-gradient objectives on a policy's own samples: group baselines
//! (RLOO, GRPO, Dr. GRPO), the clipped surrogate, and the k3 KL estimator.

use crate::{Error, Result};
use candle_core::Tensor;

/// How a group's rewards become advantages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Baseline {
    /// RLOO (Ahmadian et al.): A_i = r_i − mean of the others' rewards.
    Rloo,
    /// GRPO (Shao et al.): A_i = (r_i − mean) / (std + 1e-4); the loss
    /// averages each sequence's tokens.
    Grpo,
    /// Dr. GRPO (Liu et al.): A_i = r_i − mean, no std; the loss divides by
    /// a constant instead of each sequence's length (no length bias).
    DrGrpo,
}

impl Baseline {
    /// The baseline named in a config (`rloo`, `grpo`, `dr_grpo`).
    pub fn parse(name: &str) -> Option<Baseline> {
        match name {
            "rloo" => Some(Baseline::Rloo),
            "grpo" => Some(Baseline::Grpo),
            "dr_grpo" => Some(Baseline::DrGrpo),
            _ => None,
        }
    }
}

/// The advantages of one prompt's group of sampled rewards. A group of one
/// has no baseline to compare with: its advantage is 0 (it teaches nothing).
pub fn group_advantages(rewards: &[f64], baseline: Baseline) -> Vec<f64> {
    let k = rewards.len();
    if k < 2 {
        return vec![0.0; k];
    }
    let sum: f64 = rewards.iter().sum();
    let mean = sum / k as f64;
    match baseline {
        Baseline::Rloo => rewards
            .iter()
            .map(|r| r - (sum - r) / (k - 1) as f64)
            .collect(),
        Baseline::DrGrpo => rewards.iter().map(|r| r - mean).collect(),
        Baseline::Grpo => {
            let var = rewards.iter().map(|r| (r - mean).powi(2)).sum::<f64>() / (k - 1) as f64;
            let std = var.sqrt();
            rewards.iter().map(|r| (r - mean) / (std + 1e-4)).collect()
        }
    }
}

/// The k3 estimator of KL(π‖π_ref) per token, from log π and log π_ref:
/// exp(ref − logp) − (ref − logp) − 1, unbiased and never negative
/// (Schulman, "Approximating KL divergence").
pub fn k3(logp: &Tensor, ref_logp: &Tensor) -> Result<Tensor> {
    let d = (ref_logp - logp)?;
    Ok(((d.exp()? - &d)? - 1.0)?)
}

/// The clipped surrogate per token [B,T] (to minimise):
/// −min(ρ·A, clip(ρ, 1 − ε, 1 + ε)·A), ρ = exp(logp − old_logp). The
/// advantages are one per sequence [B] (group baselines, broadcast over its
/// tokens) or one per token [B,T] (PPO's GAE).
pub fn clipped_surrogate(
    logp: &Tensor,
    old_logp: &Tensor,
    advantages: &Tensor,
    clip: f64,
) -> Result<Tensor> {
    if !(0.0..1.0).contains(&clip) || clip == 0.0 {
        return Err(Error::Invalid(format!(
            "clip must be in (0, 1), got {clip}"
        )));
    }
    let ratio = (logp - old_logp)?.exp()?;
    let a = if advantages.rank() == 1 {
        advantages.unsqueeze(1)?.broadcast_as(ratio.shape())?
    } else if advantages.dims() == ratio.dims() {
        advantages.clone()
    } else {
        return Err(Error::Invalid(format!(
            "clipped_surrogate: advantages {:?} fit neither [B] nor the log-probs' {:?}",
            advantages.dims(),
            ratio.dims()
        )));
    };
    let unclipped = (&ratio * &a)?;
    let clipped = (ratio.clamp(1.0 - clip, 1.0 + clip)? * &a)?;
    Ok(unclipped.minimum(&clipped)?.neg()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn group_advantages_match_their_definitions() {
        let r = [1.0, 0.0, 0.0, 3.0];
        let rloo = group_advantages(&r, Baseline::Rloo);
        assert_eq!(
            rloo,
            [1.0 - 1.0, 0.0 - 4.0 / 3.0, 0.0 - 4.0 / 3.0, 3.0 - 1.0 / 3.0]
        );
        let dr = group_advantages(&r, Baseline::DrGrpo);
        assert_eq!(dr, [0.0, -1.0, -1.0, 2.0]);
        let g = group_advantages(&r, Baseline::Grpo);
        let std = (6.0f64 / 3.0).sqrt();
        for (got, want) in g.iter().zip([0.0, -1.0 / std, -1.0 / std, 2.0 / std]) {
            assert!((got - want).abs() < 1e-3, "{g:?}");
        }
        assert_eq!(group_advantages(&[5.0], Baseline::Grpo), [0.0]);
        // Equal rewards teach nothing.
        assert!(group_advantages(&[2.0; 3], Baseline::Grpo)
            .iter()
            .all(|a| a.abs() < 1e-9));
    }

    #[test]
    fn k3_is_the_kl_of_two_known_distributions_in_expectation() {
        // p = (0.7, 0.3) sampled, q = (0.4, 0.6) the reference: E_p[k3] = KL(p||q).
        let (p, q) = ([0.7f64, 0.3], [0.4f64, 0.6]);
        let kl: f64 = p.iter().zip(&q).map(|(a, b)| a * (a / b).ln()).sum();
        let lp = Tensor::new(&[[p[0].ln() as f32, p[1].ln() as f32]], &Device::Cpu).unwrap();
        let lq = Tensor::new(&[[q[0].ln() as f32, q[1].ln() as f32]], &Device::Cpu).unwrap();
        let per = k3(&lp, &lq).unwrap().to_vec2::<f32>().unwrap()[0].clone();
        let expected: f64 = per.iter().zip(&p).map(|(k, w)| f64::from(*k) * w).sum();
        assert!((expected - kl).abs() < 1e-6, "{expected} vs {kl}");
        assert!(per.iter().all(|k| *k >= 0.0));
        // k1 = logp − ref would be the same in expectation but negative per sample.
        let k1: f64 = p.iter().zip(&q).map(|(a, b)| a * (a.ln() - b.ln())).sum();
        assert!((k1 - kl).abs() < 1e-12);
    }

    #[test]
    fn a_zero_advantage_at_ratio_one_gives_no_gradient_and_clipping_stops_it() {
        let logp = Var::new(&[[-1.0f32, -2.0]], &Device::Cpu).unwrap();
        let old = Tensor::new(&[[-1.0f32, -2.0]], &Device::Cpu).unwrap();
        let zero = Tensor::new(&[0.0f32], &Device::Cpu).unwrap();
        let l = clipped_surrogate(logp.as_tensor(), &old, &zero, 0.2).unwrap();
        let g = l.sum_all().unwrap().backward().unwrap();
        let g = g.get(&logp).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(g, [[0.0, 0.0]]);
        // At ratio 1 and A = 1, dL/dlogp = −1 per token.
        let one = Tensor::new(&[1.0f32], &Device::Cpu).unwrap();
        let l = clipped_surrogate(logp.as_tensor(), &old, &one, 0.2).unwrap();
        let g = l.sum_all().unwrap().backward().unwrap();
        assert_eq!(
            g.get(&logp).unwrap().to_vec2::<f32>().unwrap(),
            [[-1.0, -1.0]]
        );
        // Past 1 + ε with a positive advantage, the clipped term holds: no gradient.
        let far = Tensor::new(&[[-1.5f32, -2.5]], &Device::Cpu).unwrap();
        let l = clipped_surrogate(logp.as_tensor(), &far, &one, 0.2).unwrap();
        let g = l.sum_all().unwrap().backward().unwrap();
        assert_eq!(
            g.get(&logp).unwrap().to_vec2::<f32>().unwrap(),
            [[0.0, 0.0]]
        );
    }
}
