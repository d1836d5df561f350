//! Sampling: a seeded PRNG, token selection (greedy, temperature, top-k,
//! top-p) and generation with the KV cache.

use crate::gpt::{Gpt, KvCache};
use crate::tokenizer::Tokenizer;
use crate::{DType, Device, Error, Result, Tensor};

/// A small seeded PRNG (splitmix64), so sampling is reproducible without
/// the rand crate.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator whose sequence is fixed by `seed`.
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        hone_sdk::text::splitmix64(&mut self.0)
    }

    /// Uniform in [0, 1).
    pub fn next_f64(&mut self) -> f64 {
        hone_sdk::text::unit(self.next_u64())
    }

    /// Standard normal (Box-Muller).
    pub fn next_normal(&mut self) -> f64 {
        let u1 = 1.0 - self.next_f64(); // in (0, 1]: ln is finite
        let u2 = self.next_f64();
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }
}

/// How to pick tokens and when to stop.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SamplingParams {
    /// Softmax temperature; 0 = greedy.
    pub temperature: f64,
    /// Keep only the k most likely tokens; 0 = off.
    pub top_k: usize,
    /// Keep the smallest set of most likely tokens whose probability reaches
    /// top_p; 1.0 = off.
    pub top_p: f64,
    /// Most tokens to generate.
    pub max_new_tokens: usize,
    /// Stop when the decoded text contains any of these (cut from the text).
    pub stop: Vec<String>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            max_new_tokens: 64,
            stop: Vec::new(),
        }
    }
}

/// Picks a token from logits [V] (any float dtype, any device): greedy when
/// temperature == 0, else from the temperature-scaled distribution truncated
/// by top-k and top-p. Returns the token and its log-probability under the
/// model's untruncated softmax at temperature 1 (what KL estimates need).
pub fn sample_token(logits: &Tensor, params: &SamplingParams, rng: &mut Rng) -> Result<(u32, f32)> {
    let logits: Vec<f32> = logits
        .flatten_all()?
        .to_dtype(DType::F32)?
        .to_device(&Device::Cpu)?
        .to_vec1()?;
    if logits.is_empty() {
        return Err(Error::Invalid("sample_token: empty logits".into()));
    }
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let log_norm = max
        + logits
            .iter()
            .map(|&l| (l as f64 - max).exp())
            .sum::<f64>()
            .ln();
    let log_prob = |tok: usize| (logits[tok] as f64 - log_norm) as f32;
    let token = if params.temperature <= 0.0 {
        argmax(&logits)
    } else {
        pick(&logits, params, rng)
    };
    Ok((token as u32, log_prob(token)))
}

fn argmax(logits: &[f32]) -> usize {
    (0..logits.len())
        .max_by(|&a, &b| logits[a].total_cmp(&logits[b]).then(b.cmp(&a)))
        .unwrap_or(0)
}

fn pick(logits: &[f32], params: &SamplingParams, rng: &mut Rng) -> usize {
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
    if params.top_k > 0 {
        order.truncate(params.top_k);
    }
    let top = logits[order[0]] as f64;
    let mut probs: Vec<f64> = order
        .iter()
        .map(|&i| ((logits[i] as f64 - top) / params.temperature).exp())
        .collect();
    let total: f64 = probs.iter().sum();
    if params.top_p < 1.0 {
        let mut cumulative = 0.0;
        let mut keep = probs.len();
        for (i, p) in probs.iter().enumerate() {
            cumulative += p / total;
            if cumulative >= params.top_p {
                keep = i + 1;
                break;
            }
        }
        probs.truncate(keep);
    }
    let total: f64 = probs.iter().sum();
    let mut u = rng.next_f64() * total;
    for (i, p) in probs.iter().enumerate() {
        if u < *p {
            return order[i];
        }
        u -= p;
    }
    order[probs.len() - 1]
}

/// Generates one completion of `prompt_ids` with the KV cache. The prompt
/// (BOS if empty) is cut from the left to leave room for `max_new_tokens`
/// within the context. Stops at EOS (kept in the ids, not the text),
/// `max_new_tokens`, a stop string in the decoded text (cut from the text;
/// its tokens stay in the ids) or the end of the context. Returns (text,
/// token ids, per-token log-probs).
pub fn generate(
    model: &Gpt,
    tok: &dyn Tokenizer,
    prompt_ids: &[u32],
    params: &SamplingParams,
    rng: &mut Rng,
    device: &Device,
) -> Result<(String, Vec<u32>, Vec<f32>)> {
    let context = model.config().context;
    let bos = [tok.bos_id()];
    let prompt = if prompt_ids.is_empty() {
        &bos[..]
    } else {
        prompt_ids
    };
    let room = context.saturating_sub(params.max_new_tokens).max(1);
    let prompt = &prompt[prompt.len().saturating_sub(room)..];

    let mut cache = KvCache::new(model.config().n_layers);
    let input = Tensor::from_vec(prompt.to_vec(), (1, prompt.len()), device)?;
    let mut logits = model.forward_cached(&input, &mut cache)?;
    let (mut ids, mut log_probs) = (Vec::new(), Vec::new());
    let mut text = String::new();
    while ids.len() < params.max_new_tokens {
        let last = logits.squeeze(0)?.get(logits.dim(1)? - 1)?;
        let (token, log_prob) = sample_token(&last, params, rng)?;
        ids.push(token);
        log_probs.push(log_prob);
        if token == tok.eos_id() {
            break;
        }
        text = tok.decode(&ids);
        if let Some(cut) = params
            .stop
            .iter()
            .filter(|s| !s.is_empty())
            .filter_map(|s| text.find(s.as_str()))
            .min()
        {
            text.truncate(cut);
            break;
        }
        if cache.len() >= context || ids.len() == params.max_new_tokens {
            break;
        }
        let input = Tensor::from_vec(vec![token], (1, 1), device)?;
        logits = model.forward_cached(&input, &mut cache)?;
    }
    Ok((text, ids, log_probs))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpt::tests::tiny;
    use crate::tokenizer::ByteTokenizer;

    fn params(temperature: f64, top_k: usize, top_p: f64) -> SamplingParams {
        SamplingParams {
            temperature,
            top_k,
            top_p,
            ..Default::default()
        }
    }

    #[test]
    fn rng_is_seeded_and_uniform() {
        let (mut a, mut b) = (Rng::new(42), Rng::new(42));
        let xs: Vec<f64> = (0..1000).map(|_| a.next_f64()).collect();
        let ys: Vec<f64> = (0..1000).map(|_| b.next_f64()).collect();
        assert_eq!(xs, ys);
        assert!(xs.iter().all(|x| (0.0..1.0).contains(x)));
        let mean = xs.iter().sum::<f64>() / 1000.0;
        assert!((mean - 0.5).abs() < 0.05, "{mean}");
    }

    #[test]
    fn greedy_and_top_1_pick_argmax_with_log_softmax() {
        let raw = [0.5f32, 2.0, -1.0, 1.5];
        let logits = Tensor::new(&raw, &Device::Cpu).unwrap();
        let mut rng = Rng::new(1);
        let (greedy, lp) = sample_token(&logits, &params(0.0, 0, 1.0), &mut rng).unwrap();
        assert_eq!(greedy, 1);
        let norm: f32 = raw.iter().map(|l| l.exp()).sum::<f32>().ln();
        assert!((lp - (2.0 - norm)).abs() < 1e-5);
        for _ in 0..20 {
            let (t, lp1) = sample_token(&logits, &params(1.5, 1, 1.0), &mut rng).unwrap();
            assert_eq!(t, greedy);
            assert!((lp1 - lp).abs() < 1e-6);
        }
        // top_p small keeps only the most likely token too.
        let (t, _) = sample_token(&logits, &params(1.0, 0, 0.01), &mut rng).unwrap();
        assert_eq!(t, greedy);
    }

    #[test]
    fn sampling_follows_the_distribution() {
        let logits = Tensor::new(&[0f32, (3f32).ln()], &Device::Cpu).unwrap();
        let mut rng = Rng::new(9);
        let ones = (0..4000)
            .filter(|_| {
                sample_token(&logits, &params(1.0, 0, 1.0), &mut rng)
                    .unwrap()
                    .0
                    == 1
            })
            .count();
        let freq = ones as f64 / 4000.0;
        assert!((freq - 0.75).abs() < 0.03, "{freq}");
    }

    #[test]
    fn generate_is_reproducible_and_respects_limits() {
        let (gpt, _) = tiny(3);
        let prompt = ByteTokenizer.encode("hi");
        let p = SamplingParams {
            max_new_tokens: 10,
            ..Default::default()
        };
        let run = |seed| {
            generate(
                &gpt,
                &ByteTokenizer,
                &prompt,
                &p,
                &mut Rng::new(seed),
                &Device::Cpu,
            )
            .unwrap()
        };
        let (text, ids, lps) = run(5);
        assert_eq!(run(5), (text.clone(), ids.clone(), lps.clone()));
        assert!(ids.len() <= 10 && !ids.is_empty());
        assert_eq!(ids.len(), lps.len());
        assert!(lps.iter().all(|lp| *lp <= 0.0 && lp.is_finite()));
        // A prompt longer than the context is cut from the left.
        let long = vec![97u32; 200];
        let (_, ids, _) = generate(
            &gpt,
            &ByteTokenizer,
            &long,
            &p,
            &mut Rng::new(1),
            &Device::Cpu,
        )
        .unwrap();
        assert!(!ids.is_empty() && ids.len() <= 10);
    }

    #[test]
    fn stop_string_is_cut_from_text() {
        let (gpt, _) = tiny(3);
        let greedy = SamplingParams {
            temperature: 0.0,
            max_new_tokens: 6,
            ..Default::default()
        };
        let run = |p: &SamplingParams| {
            generate(
                &gpt,
                &ByteTokenizer,
                &[1, 2],
                p,
                &mut Rng::new(0),
                &Device::Cpu,
            )
            .unwrap()
        };
        let (text, ids, _) = run(&greedy);
        // Stop on the first character of the untrained model's greedy text:
        // the text is then cut to nothing, after fewer or as many tokens.
        let first = text.chars().next().expect("greedy text is empty");
        let p = SamplingParams {
            stop: vec![first.to_string()],
            ..greedy
        };
        let (cut, cut_ids, _) = run(&p);
        assert_eq!(cut, "");
        assert!(cut_ids.len() <= ids.len());
        assert_eq!(cut_ids[..], ids[..cut_ids.len()]);
    }
}
