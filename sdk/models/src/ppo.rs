//! PPO's pieces beyond the clipped surrogate (in `policy_gradient`):
//! per-token rewards with a KL penalty, generalised advantage estimation,
//! whitening, the clipped value loss, the adaptive KL controller, and the
//! diagnostics PPO runs are judged by (entropy, explained variance).
//! Following Ziegler et al. 2019 ("Fine-Tuning Language Models from Human
//! Preferences") and the "N implementation details of RLHF with PPO".

use crate::{Error, Result};
use candle_core::{Tensor, D};

/// How a sampled token's KL(π‖π_ref) is estimated from its two log-probs
/// (Schulman, "Approximating KL divergence").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KlEstimator {
    /// k1 = log π − log π_ref: unbiased, but negative on some tokens, so a
    /// sum over few tokens can read below 0.
    K1,
    /// k3 = exp(ref − logp) − (ref − logp) − 1: unbiased and never negative.
    K3,
}

impl KlEstimator {
    /// The estimator named in a config (`k1`, `k3`).
    pub fn parse(name: &str) -> Option<KlEstimator> {
        match name {
            "k1" => Some(KlEstimator::K1),
            "k3" => Some(KlEstimator::K3),
            _ => None,
        }
    }

    /// The estimate on one token sampled from π.
    pub fn per_token(self, logp: f32, ref_logp: f32) -> f32 {
        match self {
            KlEstimator::K1 => logp - ref_logp,
            KlEstimator::K3 => {
                let d = ref_logp - logp;
                d.exp() - d - 1.0
            }
        }
    }
}

/// One sequence's per-token rewards: −β·KL on every token, plus the
/// sequence's scalar `score` on its last token (where the reward model saw
/// the whole response).
pub fn token_rewards(
    score: f32,
    logp: &[f32],
    ref_logp: &[f32],
    beta: f32,
    estimator: KlEstimator,
) -> Vec<f32> {
    let mut rewards: Vec<f32> = logp
        .iter()
        .zip(ref_logp)
        .map(|(&l, &r)| -beta * estimator.per_token(l, r))
        .collect();
    if let Some(last) = rewards.last_mut() {
        *last += score;
    }
    rewards
}

/// Generalised advantage estimation (Schulman et al. 2016) over one
/// sequence: δ_t = r_t + γ·V_{t+1} − V_t with V after the last token 0 (the
/// episode ends), A_t = δ_t + γλ·A_{t+1}. Returns the advantages and the
/// returns A_t + V_t, the value head's targets.
pub fn gae(
    rewards: &[f32],
    values: &[f32],
    gamma: f32,
    lambda: f32,
) -> Result<(Vec<f32>, Vec<f32>)> {
    if rewards.len() != values.len() {
        return Err(Error::Invalid(format!(
            "gae: {} rewards for {} values",
            rewards.len(),
            values.len()
        )));
    }
    let n = rewards.len();
    let mut advantages = vec![0f32; n];
    let (mut next_value, mut next_advantage) = (0f32, 0f32);
    for t in (0..n).rev() {
        let delta = rewards[t] + gamma * next_value - values[t];
        next_advantage = delta + gamma * lambda * next_advantage;
        advantages[t] = next_advantage;
        next_value = values[t];
    }
    let returns = advantages.iter().zip(values).map(|(a, v)| a + v).collect();
    Ok((advantages, returns))
}

/// Shifts and scales `xs` in place to mean 0 and standard deviation 1 (the
/// population std, plus 1e-8). Whitening the advantages of a rollout batch
/// keeps the step size independent of the reward's scale.
pub fn whiten(xs: &mut [f32]) {
    if xs.is_empty() {
        return;
    }
    let (mean, std) = mean_std(xs);
    for x in xs {
        *x = ((f64::from(*x) - mean) / (std + 1e-8)) as f32;
    }
}

/// The mean and population standard deviation of `xs` (0, 0 when empty).
pub fn mean_std(xs: &[f32]) -> (f64, f64) {
    if xs.is_empty() {
        return (0.0, 0.0);
    }
    let n = xs.len() as f64;
    let mean = xs.iter().map(|&x| f64::from(x)).sum::<f64>() / n;
    let var = xs
        .iter()
        .map(|&x| (f64::from(x) - mean).powi(2))
        .sum::<f64>()
        / n;
    (mean, var.sqrt())
}

/// The clipped value loss per token [B,T] (to minimise):
/// ½·max((V − R)², (V_old + clip(V − V_old, −ε, ε) − R)²), so the value
/// head, like the policy, cannot move far from where the rollout found it
/// in one batch. Also returns, per token, 1 where the clipped term is the
/// larger (the value clip fraction's numerator).
pub fn clipped_value_loss(
    values: &Tensor,
    old_values: &Tensor,
    returns: &Tensor,
    clip: f64,
) -> Result<(Tensor, Tensor)> {
    if !(clip > 0.0 && clip.is_finite()) {
        return Err(Error::Invalid(format!(
            "value clip must be above 0, got {clip}"
        )));
    }
    let unclipped = (values - returns)?.sqr()?;
    let moved = (values - old_values)?.clamp(-clip, clip)?;
    let clipped = ((old_values + moved)? - returns)?.sqr()?;
    let which = clipped.gt(&unclipped)?.to_dtype(values.dtype())?;
    Ok(((unclipped.maximum(&clipped)? * 0.5)?, which))
}

/// The entropy of the distribution at each position [B,T] of logits
/// [B,T,V]: −Σ p log p. A falling entropy is a policy collapsing onto few
/// answers.
pub fn entropy(logits: &Tensor) -> Result<Tensor> {
    let log_p = candle_nn::ops::log_softmax(logits, D::Minus1)?;
    Ok((log_p.exp()? * &log_p)?.sum(D::Minus1)?.neg()?)
}

/// The exact KL(π‖π_ref) at each position [B,T], from both models' logits
/// [B,T,V]: Σ_v π(v)·(log π(v) − log π_ref(v)). What the sampled estimators
/// estimate; never negative.
pub fn exact_kl(logits: &Tensor, ref_logits: &Tensor) -> Result<Tensor> {
    let log_p = candle_nn::ops::log_softmax(logits, D::Minus1)?;
    let log_q = candle_nn::ops::log_softmax(ref_logits, D::Minus1)?;
    Ok((log_p.exp()? * (&log_p - log_q)?)?.sum(D::Minus1)?)
}

/// 1 − Var(returns − values) / Var(returns): 1 for a perfect value head, 0
/// for one no better than a constant, below 0 for a worse one. 0 when the
/// returns do not vary.
pub fn explained_variance(values: &[f32], returns: &[f32]) -> f64 {
    let (_, std) = mean_std(returns);
    if std == 0.0 || values.len() != returns.len() {
        return 0.0;
    }
    let residual: Vec<f32> = returns.iter().zip(values).map(|(r, v)| r - v).collect();
    let (_, res_std) = mean_std(&residual);
    1.0 - (res_std * res_std) / (std * std)
}

/// The adaptive KL coefficient of Ziegler et al. 2019: after each batch of
/// `n` samples whose KL to the reference was `kl`, β is multiplied by
/// 1 + clip(kl / target − 1, −0.2, 0.2) · n / horizon, so the KL is steered
/// towards `target` over about `horizon` samples. A fixed β is the same
/// controller with no target.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct KlController {
    /// The coefficient in use.
    pub beta: f64,
    /// The KL (nats per sequence) to steer towards; `None` keeps β fixed.
    pub target: Option<f64>,
    /// Samples over which β adapts.
    pub horizon: f64,
}

impl KlController {
    /// Updates β after a batch of `n` samples with mean sequence KL `kl`.
    pub fn update(&mut self, kl: f64, n: usize) {
        let Some(target) = self.target else { return };
        if target <= 0.0 || self.horizon <= 0.0 || !kl.is_finite() {
            return;
        }
        let error = (kl / target - 1.0).clamp(-0.2, 0.2);
        // With n above 5 horizons the rule's factor would reach 0 or below
        // and flip β's sign (rewarding the KL): never more than halve it.
        self.beta *= (1.0 + error * n as f64 / self.horizon).max(0.5);
    }
}

/// Running mean and variance of a stream (Welford), so that rewards can be
/// normalised by the statistics of every round so far, not only this one.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RunningMoments {
    /// Values seen.
    pub count: u64,
    /// Their mean.
    pub mean: f64,
    /// Sum of squared deviations from the mean.
    pub m2: f64,
}

impl RunningMoments {
    /// Adds values.
    pub fn extend(&mut self, xs: impl IntoIterator<Item = f64>) {
        for x in xs {
            self.count += 1;
            let delta = x - self.mean;
            self.mean += delta / self.count as f64;
            self.m2 += delta * (x - self.mean);
        }
    }

    /// The population standard deviation so far (0 before two values).
    pub fn std(&self) -> f64 {
        if self.count < 2 {
            0.0
        } else {
            (self.m2 / self.count as f64).sqrt()
        }
    }

    /// `x` in units of the stream: (x − mean) / std, or x − mean while the
    /// std is still 0.
    pub fn normalise(&self, x: f64) -> f64 {
        let std = self.std();
        if std > 0.0 {
            (x - self.mean) / std
        } else {
            x - self.mean
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn close(a: f32, b: f32) -> bool {
        (a - b).abs() < 1e-5
    }

    #[test]
    fn gae_matches_a_hand_computed_trajectory() {
        // Three tokens, rewards (0, 0, 1), values (0.5, 0.2, 0.4), γ 0.9, λ 0.8.
        // δ2 = 1 − 0.4 = 0.6;            A2 = 0.6
        // δ1 = 0 + 0.9·0.4 − 0.2 = 0.16; A1 = 0.16 + 0.72·0.6 = 0.592
        // δ0 = 0 + 0.9·0.2 − 0.5 = −0.32; A0 = −0.32 + 0.72·0.592 = 0.10624
        let (a, r) = gae(&[0.0, 0.0, 1.0], &[0.5, 0.2, 0.4], 0.9, 0.8).unwrap();
        for (got, want) in a.iter().zip([0.10624, 0.592, 0.6]) {
            assert!(close(*got, want), "{a:?}");
        }
        for (got, want) in r.iter().zip([0.60624, 0.792, 1.0]) {
            assert!(close(*got, want), "{r:?}");
        }
        // γ = λ = 1: the advantage is the reward-to-go minus the value.
        let (a, _) = gae(&[1.0, 2.0, 3.0], &[1.0, 1.0, 1.0], 1.0, 1.0).unwrap();
        assert_eq!(a, [5.0, 4.0, 2.0]);
        // λ = 0: one-step TD errors.
        let (a, _) = gae(&[1.0, 2.0], &[0.5, 0.25], 1.0, 0.0).unwrap();
        assert_eq!(a, [1.0 + 0.25 - 0.5, 2.0 - 0.25]);
        assert!(gae(&[1.0], &[], 1.0, 1.0).is_err());
    }

    #[test]
    fn token_rewards_put_the_score_last_and_the_kl_everywhere() {
        let r = token_rewards(2.0, &[-1.0, -2.0], &[-1.5, -2.0], 0.1, KlEstimator::K1);
        assert!(close(r[0], -0.05) && close(r[1], 2.0), "{r:?}");
        // k3 is never negative, so its penalty never pays the policy.
        let r = token_rewards(0.0, &[-2.0, -1.0], &[-1.0, -2.0], 1.0, KlEstimator::K3);
        assert!(r.iter().all(|&x| x <= 0.0), "{r:?}");
        assert!(close(r[0], -((1.0f32).exp() - 2.0)));
        assert!(close(r[1], -((-1.0f32).exp())));
        assert!(token_rewards(1.0, &[], &[], 0.1, KlEstimator::K1).is_empty());
    }

    #[test]
    fn k1_and_k3_estimate_the_exact_kl_of_two_known_distributions() {
        // π = (0.7, 0.2, 0.1), π_ref = (0.3, 0.3, 0.4): the expectation of
        // each estimator under π is the exact KL, which exact_kl computes.
        let (p, q) = ([0.7f32, 0.2, 0.1], [0.3f32, 0.3, 0.4]);
        let kl: f32 = p.iter().zip(&q).map(|(a, b)| a * (a / b).ln()).sum();
        for est in [KlEstimator::K1, KlEstimator::K3] {
            let e: f32 = p
                .iter()
                .zip(&q)
                .map(|(a, b)| a * est.per_token(a.ln(), b.ln()))
                .sum();
            assert!(close(e, kl), "{est:?}: {e} vs {kl}");
        }
        // k1 goes negative on a token the reference prefers; k3 does not.
        assert!(KlEstimator::K1.per_token(q[2].ln() - 1.0, q[2].ln()) < 0.0);
        assert!(KlEstimator::K3.per_token(0.1f32.ln(), 0.4f32.ln()) > 0.0);
        let logits = Tensor::new(&[[[p[0].ln(), p[1].ln(), p[2].ln()]]], &Device::Cpu).unwrap();
        // Logits need not be normalised: shift the reference's by a constant.
        let ref_logits = Tensor::new(
            &[[[q[0].ln() + 3.0, q[1].ln() + 3.0, q[2].ln() + 3.0]]],
            &Device::Cpu,
        )
        .unwrap();
        let exact = exact_kl(&logits, &ref_logits)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        assert!(close(exact[0][0], kl), "{exact:?} vs {kl}");
        let h = entropy(&logits).unwrap().to_vec2::<f32>().unwrap()[0][0];
        let want: f32 = -p.iter().map(|a| a * a.ln()).sum::<f32>();
        assert!(close(h, want), "{h} vs {want}");
    }

    #[test]
    fn the_value_loss_is_clipped_around_the_old_values() {
        let old = Tensor::new(&[[0.0f32, 0.0]], &Device::Cpu).unwrap();
        let ret = Tensor::new(&[[1.0f32, 1.0]], &Device::Cpu).unwrap();
        // One value within the clip (0.1), one moved past it towards the
        // return (0.5 with ε 0.2): the clipped term (0 + 0.2 − 1)² is larger,
        // and holds the value where it is (no gradient).
        let v = Var::new(&[[0.1f32, 0.5]], &Device::Cpu).unwrap();
        let (loss, which) = clipped_value_loss(v.as_tensor(), &old, &ret, 0.2).unwrap();
        let l = loss.to_vec2::<f32>().unwrap();
        assert!(
            close(l[0][0], 0.5 * 0.81) && close(l[0][1], 0.5 * 0.64),
            "{l:?}"
        );
        assert_eq!(which.to_vec2::<f32>().unwrap(), [[0.0, 1.0]]);
        let g = loss.sum_all().unwrap().backward().unwrap();
        let g = g.get(&v).unwrap().to_vec2::<f32>().unwrap();
        assert!(close(g[0][0], 0.1 - 1.0) && g[0][1] == 0.0, "{g:?}");
        assert!(clipped_value_loss(v.as_tensor(), &old, &ret, 0.0).is_err());
    }

    #[test]
    fn whitening_explained_variance_and_running_moments() {
        let mut xs = [1.0f32, 2.0, 3.0, 4.0];
        whiten(&mut xs);
        let (m, s) = mean_std(&xs);
        assert!(m.abs() < 1e-6 && (s - 1.0).abs() < 1e-6, "{m} {s}");
        let r = [1.0f32, 2.0, 3.0];
        assert!((explained_variance(&r, &r) - 1.0).abs() < 1e-9);
        assert!(explained_variance(&[2.0, 2.0, 2.0], &r).abs() < 1e-9);
        assert!(explained_variance(&[3.0, 2.0, 1.0], &r) < 0.0);
        assert_eq!(explained_variance(&r, &[1.0, 1.0, 1.0]), 0.0);
        let mut m = RunningMoments::default();
        m.extend([1.0, 2.0]);
        m.extend([3.0, 4.0]);
        assert!((m.mean - 2.5).abs() < 1e-12);
        assert!((m.std() - (1.25f64).sqrt()).abs() < 1e-12);
        assert!((m.normalise(2.5)).abs() < 1e-12);
    }

    #[test]
    fn the_adaptive_controller_steers_beta_towards_the_target() {
        let mut c = KlController {
            beta: 0.1,
            target: Some(6.0),
            horizon: 100.0,
        };
        // KL far above the target: the error is clipped at +0.2.
        c.update(60.0, 50);
        assert!((c.beta - 0.1 * 1.1).abs() < 1e-12, "{}", c.beta);
        // Half the target: the error is clipped at −0.2, so β falls by 10%.
        c.update(3.0, 50);
        assert!((c.beta - 0.11 * 0.9).abs() < 1e-12, "{}", c.beta);
        // Within 20% of the target, the step is proportional.
        c.update(6.6, 100);
        assert!((c.beta - 0.099 * 1.1).abs() < 1e-12, "{}", c.beta);
        let fixed_before = KlController {
            beta: 0.1,
            target: None,
            horizon: 100.0,
        };
        let mut fixed = fixed_before.clone();
        fixed.update(60.0, 50);
        assert_eq!(fixed, fixed_before);
        // A batch of more than 5 horizons below the target halves β, never
        // flips its sign.
        let mut big = KlController {
            beta: 0.1,
            target: Some(6.0),
            horizon: 100.0,
        };
        big.update(0.0, 600);
        assert_eq!(big.beta, 0.05);
    }
}
