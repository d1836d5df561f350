//! Pairwise preference objectives, shared by every stage that learns from
//! (chosen, rejected) pairs: the Bradley–Terry reward-model loss today, the
//! DPO family next (its loss is the same logistic form on implicit rewards).

use crate::Result;
use candle_core::Tensor;

/// log σ(x), stably: −(relu(−x) + log(1 + exp(−|x|))). (candle's sigmoid
/// then log would overflow for large |x| and has no fused backward to rely
/// on; this is composed of differentiable primitives.)
pub fn log_sigmoid(x: &Tensor) -> Result<Tensor> {
    let soft = (x.neg()?.relu()? + (x.abs()?.neg()?.exp()? + 1.0)?.log()?)?;
    Ok(soft.neg()?)
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

    #[test]
    fn a_tie_counts_half() {
        assert_eq!(pair_accuracy([1.0, -1.0, 0.0, 2.0]), Some(2.5 / 4.0));
        assert_eq!(pair_accuracy([]), None);
        assert_eq!(pair_credit(-1.0, false), 1.0);
    }
}
