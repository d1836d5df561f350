//! Demonstrations to training data: tokenization with the response mask,
//! the seeded hold-out split, seeded batch order, padding.

use hone_models::tokenizer::Tokenizer;
use hone_models::{Device, Tensor};
use hone_sdk::text::seeded_unit;

/// A prompt and the response to imitate.
pub(super) struct Demo {
    pub id: String,
    pub prompt: String,
    pub response: String,
}

/// One training sequence: `inputs[t]` predicts `targets[t]`, and `mask[t]`
/// is 1 where that target is a response token (or the closing EOS).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Example {
    pub inputs: Vec<u32>,
    pub targets: Vec<u32>,
    pub mask: Vec<f32>,
}

/// Tokenizes `BOS prompt response EOS` into an [`Example`] of at most
/// `context` positions. Too long a sequence loses the start of the prompt
/// first (the turn being answered is at its end), then the end of the
/// response.
pub(crate) fn tokenize(
    tok: &dyn Tokenizer,
    prompt: &str,
    response: &str,
    context: usize,
) -> Example {
    let mut ids = vec![tok.bos_id()];
    ids.extend(tok.encode(prompt));
    let mut response_ids = tok.encode(response);
    response_ids.push(tok.eos_id());
    example_of(ids, &response_ids, context)
}

/// The [`Example`] of a tokenized prompt (with whatever it starts with: a
/// BOS, a chat template) and response (with whatever ends it: an EOS, a
/// chat turn's end), cut to `context` positions as [`tokenize`] says.
pub(crate) fn example_of(mut ids: Vec<u32>, response: &[u32], context: usize) -> Example {
    let response_start = ids.len();
    ids.extend_from_slice(response);
    // Keep one token before the response, so its first token is predicted.
    let cut = ids
        .len()
        .saturating_sub(context + 1)
        .min(response_start.saturating_sub(1));
    let mut ids = ids.split_off(cut);
    ids.truncate(context + 1);
    let response_start = response_start - cut;
    Example {
        inputs: ids[..ids.len() - 1].to_vec(),
        targets: ids[1..].to_vec(),
        mask: (1..ids.len())
            .map(|t| if t >= response_start { 1.0 } else { 0.0 })
            .collect(),
    }
}

/// Splits demos into training and held-out sets by a seeded draw per id, so
/// the split does not depend on arrival order. With several demos and a
/// non-zero fraction, at least one is held out.
fn split(demos: &[Demo], seed: u64, eval_fraction: f64) -> (Vec<&Demo>, Vec<&Demo>) {
    let mut sorted: Vec<&Demo> = demos.iter().collect();
    sorted.sort_by(|a, b| a.id.cmp(&b.id));
    let holdout = |d: &Demo| seeded_unit(seed, &format!("holdout:{}", d.id));
    let (mut eval, mut train): (Vec<&Demo>, Vec<&Demo>) =
        sorted.into_iter().partition(|d| holdout(d) < eval_fraction);
    if eval.is_empty() && eval_fraction > 0.0 && train.len() > 1 {
        let i = (0..train.len())
            .min_by(|&a, &b| holdout(train[a]).total_cmp(&holdout(train[b])))
            .unwrap_or(0);
        eval.push(train.remove(i));
    }
    (train, eval)
}

/// Splits and tokenizes demos (`encode` turns one into its sequence, as
/// the model reads it): the training batches and the held-out examples.
pub(super) fn prepare<E>(
    demos: &[Demo],
    mut encode: impl FnMut(&Demo) -> Result<Example, E>,
    seed: u64,
    eval_fraction: f64,
) -> Result<(Batches, Vec<Example>), E> {
    let (train, eval) = split(demos, seed, eval_fraction);
    let mut encoded = Vec::with_capacity(train.len());
    for d in train {
        encoded.push((d.id.clone(), encode(d)?));
    }
    let eval = eval.into_iter().map(encode).collect::<Result<_, E>>()?;
    Ok((Batches::new(encoded, seed), eval))
}

/// Cycles through the training examples, reshuffled (seeded by id) every
/// epoch ([`hone_models::batches::Batches`] over their ids).
pub(super) struct Batches {
    examples: Vec<Example>,
    order: hone_models::batches::Batches,
}

impl Batches {
    fn new(examples: Vec<(String, Example)>, seed: u64) -> Self {
        let (ids, examples): (Vec<String>, Vec<Example>) = examples.into_iter().unzip();
        Batches {
            examples,
            order: hone_models::batches::Batches::new(ids, seed),
        }
    }

    pub(super) fn len(&self) -> usize {
        self.examples.len()
    }

    pub(super) fn next(&mut self, size: usize) -> Vec<Example> {
        self.order
            .next(size)
            .into_iter()
            .map(|i| self.examples[i].clone())
            .collect()
    }
}

/// Pads examples into inputs and targets [B,L] u32 and a loss mask [B,L] f32.
pub(crate) fn to_tensors(
    examples: &[Example],
    pad: u32,
    device: &Device,
) -> hone_models::Result<(Tensor, Tensor, Tensor)> {
    let len = examples
        .iter()
        .map(|e| e.inputs.len())
        .max()
        .unwrap_or(1)
        .max(1);
    let (mut inputs, mut targets, mut mask) = (Vec::new(), Vec::new(), Vec::new());
    for e in examples {
        let fill = len - e.inputs.len();
        inputs.extend(
            e.inputs
                .iter()
                .copied()
                .chain(std::iter::repeat_n(pad, fill)),
        );
        targets.extend(
            e.targets
                .iter()
                .copied()
                .chain(std::iter::repeat_n(pad, fill)),
        );
        mask.extend(e.mask.iter().copied().chain(std::iter::repeat_n(0.0, fill)));
    }
    let shape = (examples.len(), len);
    Ok((
        Tensor::from_vec(inputs, shape, device)?,
        Tensor::from_vec(targets, shape, device)?,
        Tensor::from_vec(mask, shape, device)?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use hone_models::tokenizer::ByteTokenizer;

    #[test]
    fn loss_mask_covers_only_the_response_and_eos() {
        let t = ByteTokenizer;
        let e = tokenize(&t, "ab", "xy", 64);
        assert_eq!(e.inputs, vec![256, 97, 98, 120, 121]);
        assert_eq!(e.targets, vec![97, 98, 120, 121, 257]);
        assert_eq!(e.mask, vec![0.0, 0.0, 1.0, 1.0, 1.0]);
        // Too long: the prompt loses its start, the response keeps its mask.
        let e = tokenize(&t, "0123456789", "xy", 6);
        assert_eq!(e.inputs, vec![54, 55, 56, 57, 120, 121]);
        assert_eq!(e.targets, vec![55, 56, 57, 120, 121, 257]);
        assert_eq!(e.mask, vec![0.0, 0.0, 0.0, 1.0, 1.0, 1.0]);
        // A response longer than the context keeps one prompt token and its own start.
        let e = tokenize(&t, "a", "0123456789", 4);
        assert_eq!(e.inputs, vec![97, 48, 49, 50]);
        assert_eq!(e.mask, vec![1.0; 4]);
    }

    #[test]
    fn split_and_order_depend_on_ids_and_seed_not_arrival() {
        let demo = |i: usize| Demo {
            id: format!("d{i}"),
            prompt: "q".into(),
            response: "a".into(),
        };
        let demos: Vec<Demo> = (0..100).map(demo).collect();
        let reversed: Vec<Demo> = (0..100).rev().map(demo).collect();
        let ids = |set: Vec<&Demo>| set.iter().map(|d| d.id.clone()).collect::<Vec<_>>();
        let (train, eval) = split(&demos, 3, 0.2);
        assert!((10..30).contains(&eval.len()), "{}", eval.len());
        assert_eq!(train.len() + eval.len(), 100);
        let (train_r, eval_r) = split(&reversed, 3, 0.2);
        assert_eq!(
            (ids(train.clone()), ids(eval.clone())),
            (ids(train_r), ids(eval_r))
        );
        assert_ne!(ids(eval), ids(split(&demos, 4, 0.2).1));
        // At least one held out, whatever the draws.
        assert_eq!(split(&demos[..2], 3, 0.01).1.len(), 1);
        let bytes = |d: &Demo| Ok::<_, ()>(tokenize(&ByteTokenizer, &d.prompt, &d.response, 16));
        let (mut a, mut b) = (
            prepare(&demos, bytes, 3, 0.2).unwrap().0,
            prepare(&reversed, bytes, 3, 0.2).unwrap().0,
        );
        assert_eq!(a.next(50), b.next(50));
    }
}
