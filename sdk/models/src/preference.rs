//! Pairwise preference objectives, shared by every stage that learns from
//! (chosen, rejected) pairs: the Bradley–Terry reward-model loss today, the
//! DPO family next (its loss is the same logistic form on implicit rewards).

use crate::Result;
use candle_core::Tensor;

/// log σ(x), stably and with the exact gradient σ(−x) everywhere:
/// −log(1 + e^(−x)) where x ≥ 0 and x − log(1 + e^x) where x < 0, each
/// branch fed only its own side of x so neither overflows. (The one-line
/// form −(relu(−x) + log(1 + e^(−|x|))) has the right values but a zero
/// gradient at x = 0, where relu and abs have no derivative: a pair whose
/// rewards tie would not train.)
pub fn log_sigmoid(x: &Tensor) -> Result<Tensor> {
    let zero = x.zeros_like()?;
    let positive = x.ge(&zero)?;
    let xp = positive.where_cond(x, &zero)?;
    let xn = positive.where_cond(&zero, x)?;
    let pos = (xp.neg()?.exp()? + 1.0)?.log()?.neg()?;
    let neg = (&xn - (xn.exp()? + 1.0)?.log()?)?;
    Ok(positive.where_cond(&pos, &neg)?)
}

/// Per-pair Bradley–Terry losses [B]:
/// `−w · [(1 − ε) log σ(d − m) + ε log σ(−(d − m))]`, where `d` is the
/// reward difference r(chosen) − r(rejected), `m` the pair's margin, `w` its
/// weight and `ε` its label-smoothing epsilon (conservative/robust BT: with
/// probability ε the label is taken to be wrong). All [B].
pub fn bradley_terry_losses(
    diff: &Tensor,
    margin: &Tensor,
    weight: &Tensor,
    epsilon: &Tensor,
) -> Result<Tensor> {
    let x = (diff - margin)?;
    let agree = (log_sigmoid(&x)? * (1.0 - epsilon)?)?;
    let disagree = (log_sigmoid(&x.neg()?)? * epsilon)?;
    Ok(((agree + disagree)? * weight)?.neg()?)
}

/// The DPO family of losses on a policy's and a reference's sequence
/// log-probabilities (summed over response tokens).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DpoLoss {
    /// DPO (Rafailov et al.): −log σ(z), z = β·[(π_c − ref_c) − (π_r − ref_r)] − m.
    Sigmoid,
    /// IPO (Azar et al.): (z − ½)² / β², which regresses the log-ratio gap
    /// to 1/(2β) instead of pushing it to infinity.
    Ipo,
    /// Conservative DPO (cDPO): with probability ε the label is wrong,
    /// −(1 − ε)·log σ(z) − ε·log σ(−z).
    Robust,
    /// SimPO (Meng et al.), reference-free: z = β·(π_c/|y_c| − π_r/|y_r|) − γ − m,
    /// length-normalised log-probabilities and a target margin γ.
    Simpo,
}

impl DpoLoss {
    /// The loss named in a config (`sigmoid`, `ipo`, `robust`, `simpo`).
    pub fn parse(name: &str) -> Option<DpoLoss> {
        match name {
            "sigmoid" => Some(DpoLoss::Sigmoid),
            "ipo" => Some(DpoLoss::Ipo),
            "robust" => Some(DpoLoss::Robust),
            "simpo" => Some(DpoLoss::Simpo),
            _ => None,
        }
    }

    /// Whether it needs the reference's log-probabilities.
    pub fn uses_reference(self) -> bool {
        self != DpoLoss::Simpo
    }
}

/// The constants of a [`DpoLoss`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DpoParams {
    /// β: the strength of the implicit KL constraint (the reward scale).
    pub beta: f64,
    /// ε of [`DpoLoss::Robust`] for pairs without their own (the batch's
    /// `epsilon` carries each pair's).
    pub label_smoothing: f64,
    /// γ of [`DpoLoss::Simpo`].
    pub gamma: f64,
}

/// A batch of pairs' sequence log-probabilities, all [B]: the policy's, the
/// reference's (ignored by SimPO), the response lengths in tokens (used by
/// SimPO), and each pair's margin `m` and weight `w` (from `rm.strength`;
/// 0 and 1 for a plain pair).
pub struct DpoBatch<'a> {
    /// log π(y_c | x).
    pub policy_chosen: &'a Tensor,
    /// log π(y_r | x).
    pub policy_rejected: &'a Tensor,
    /// log π_ref(y_c | x).
    pub reference_chosen: &'a Tensor,
    /// log π_ref(y_r | x).
    pub reference_rejected: &'a Tensor,
    /// |y_c| in tokens.
    pub chosen_len: &'a Tensor,
    /// |y_r| in tokens.
    pub rejected_len: &'a Tensor,
    /// Subtracted from the logit z.
    pub margin: &'a Tensor,
    /// Multiplies the pair's loss.
    pub weight: &'a Tensor,
    /// Each pair's ε for [`DpoLoss::Robust`] (ignored by the others).
    pub epsilon: &'a Tensor,
}

/// Per-pair losses [B] and the implicit rewards of chosen and rejected [B]
/// each (β·(π − ref), or β·π/|y| for SimPO), as TRL reports them. The margin
/// shifts the logit z in every loss, so a pair the reward-model ensemble is
/// sure of must be won by more; the weight scales the pair's loss.
pub fn dpo_losses(loss: DpoLoss, p: DpoParams, b: &DpoBatch) -> Result<(Tensor, Tensor, Tensor)> {
    let (chosen, rejected) = match loss {
        DpoLoss::Simpo => (
            ((b.policy_chosen / b.chosen_len.maximum(1.0)?)? * p.beta)?,
            ((b.policy_rejected / b.rejected_len.maximum(1.0)?)? * p.beta)?,
        ),
        _ => (
            ((b.policy_chosen - b.reference_chosen)? * p.beta)?,
            ((b.policy_rejected - b.reference_rejected)? * p.beta)?,
        ),
    };
    let gap = (&chosen - &rejected)?;
    let zeros = gap.zeros_like()?;
    let losses = match loss {
        DpoLoss::Sigmoid => bradley_terry_losses(&gap, b.margin, b.weight, &zeros)?,
        DpoLoss::Robust => bradley_terry_losses(&gap, b.margin, b.weight, b.epsilon)?,
        DpoLoss::Simpo => {
            let margin = (b.margin + p.gamma)?;
            bradley_terry_losses(&gap, &margin, b.weight, &zeros)?
        }
        DpoLoss::Ipo => {
            let z = ((gap - b.margin)? - 0.5)?;
            ((z.sqr()? / (p.beta * p.beta))? * b.weight)?
        }
    };
    Ok((losses, chosen, rejected))
}

/// The credit of one pair: 1 when the reward difference agrees with the
/// label (chosen scored higher), 0 when it disagrees, ½ on a tie — a
/// model that cannot tell the two apart is right half the time, not never.
pub fn pair_credit(diff: f64, chosen_is_better: bool) -> f64 {
    if diff == 0.0 {
        0.5
    } else if (diff > 0.0) == chosen_is_better {
        1.0
    } else {
        0.0
    }
}

/// Accuracy of reward differences d = r(chosen) − r(rejected) against
/// labels that prefer chosen: the mean [`pair_credit`] (`None` when empty).
pub fn pair_accuracy(diffs: impl IntoIterator<Item = f64>) -> Option<f64> {
    let (mut credit, mut n) = (0.0, 0usize);
    for d in diffs {
        credit += pair_credit(d, true);
        n += 1;
    }
    (n > 0).then(|| credit / n as f64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn t(v: &[f32]) -> Tensor {
        Tensor::new(v, &Device::Cpu).unwrap()
    }

    #[test]
    fn log_sigmoid_has_its_gradient_at_zero_and_far_out() {
        let x = candle_core::Var::new(&[-100.0f32, 0.0, 100.0], &Device::Cpu).unwrap();
        let g = log_sigmoid(x.as_tensor())
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let g = g.get(&x).unwrap().to_vec1::<f32>().unwrap();
        assert!(
            (g[0] - 1.0).abs() < 1e-6 && (g[1] - 0.5).abs() < 1e-6 && g[2].abs() < 1e-6,
            "{g:?}"
        );
    }

    #[test]
    fn log_sigmoid_is_stable_and_exact() {
        let got = log_sigmoid(&t(&[-100.0, -1.0, 0.0, 1.0, 100.0]))
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let want = [
            -100.0f32,
            -1.313_261_7,
            -std::f32::consts::LN_2,
            -0.313_261_7,
            0.0,
        ];
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() < 1e-5, "{got:?}");
        }
    }

    #[test]
    fn bradley_terry_matches_its_formula() {
        let d = t(&[2.0, -1.0]);
        let loss = bradley_terry_losses(&d, &t(&[0.5, 0.0]), &t(&[1.0, 2.0]), &t(&[0.0, 0.1]))
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let ls = |x: f32| -(1.0 + (-x).exp()).ln();
        assert!((loss[0] + ls(1.5)).abs() < 1e-5, "{loss:?}");
        let want = -2.0 * (0.9 * ls(-1.0) + 0.1 * ls(1.0));
        assert!((loss[1] - want).abs() < 1e-5, "{loss:?}");
    }

    /// The four losses and dL/dπ_c for fixed log-probabilities, against the
    /// formulas worked by hand.
    #[test]
    fn dpo_losses_and_gradients_match_the_hand_computed_values() {
        use candle_core::Var;
        let (pc, pr, rc, rr) = (-4.0f64, -6.0, -5.0, -5.5);
        let (lc, lr, m, w) = (4.0f64, 3.0, 0.2, 1.5);
        let p = DpoParams {
            beta: 0.5,
            label_smoothing: 0.1,
            gamma: 0.3,
        };
        let sig = |x: f64| 1.0 / (1.0 + (-x).exp());
        let ls = |x: f64| sig(x).ln();
        // z for the reference-based losses, and for SimPO.
        let z = p.beta * ((pc - rc) - (pr - rr)) - m;
        let zs = p.beta * (pc / lc - pr / lr) - p.gamma - m;
        let cases = [
            (DpoLoss::Sigmoid, -w * ls(z), -w * p.beta * (1.0 - sig(z))),
            (
                DpoLoss::Robust,
                -w * ((1.0 - p.label_smoothing) * ls(z) + p.label_smoothing * ls(-z)),
                w * p.beta
                    * (-(1.0 - p.label_smoothing) * (1.0 - sig(z)) + p.label_smoothing * sig(z)),
            ),
            (
                DpoLoss::Ipo,
                w * (z - 0.5).powi(2) / (p.beta * p.beta),
                w * 2.0 * (z - 0.5) / p.beta,
            ),
            (
                DpoLoss::Simpo,
                -w * ls(zs),
                -w * (1.0 - sig(zs)) * p.beta / lc,
            ),
        ];
        let one = |x: f64| Tensor::new(&[x as f32], &candle_core::Device::Cpu).unwrap();
        for (loss, want, want_grad) in cases {
            let policy_chosen = Var::from_tensor(&one(pc)).unwrap();
            let batch = DpoBatch {
                policy_chosen: policy_chosen.as_tensor(),
                policy_rejected: &one(pr),
                reference_chosen: &one(rc),
                reference_rejected: &one(rr),
                chosen_len: &one(lc),
                rejected_len: &one(lr),
                margin: &one(m),
                weight: &one(w),
                epsilon: &one(p.label_smoothing),
            };
            let (l, chosen, _) = dpo_losses(loss, p, &batch).unwrap();
            let got = f64::from(l.to_vec1::<f32>().unwrap()[0]);
            assert!((got - want).abs() < 1e-5, "{loss:?}: {got} vs {want}");
            let grads = l.sum_all().unwrap().backward().unwrap();
            let g = f64::from(grads.get(&policy_chosen).unwrap().to_vec1::<f32>().unwrap()[0]);
            assert!(
                (g - want_grad).abs() < 1e-5,
                "{loss:?} gradient: {g} vs {want_grad}"
            );
            let reward = f64::from(chosen.to_vec1::<f32>().unwrap()[0]);
            let want_reward = match loss {
                DpoLoss::Simpo => p.beta * pc / lc,
                _ => p.beta * (pc - rc),
            };
            assert!((reward - want_reward).abs() < 1e-5, "{loss:?} reward");
        }
    }

    #[test]
    fn a_tie_counts_half() {
        assert_eq!(pair_accuracy([1.0, -1.0, 0.0, 2.0]), Some(2.5 / 4.0));
        assert_eq!(pair_accuracy([]), None);
        assert_eq!(pair_credit(-1.0, false), 1.0);
    }
}
