//! The real pretrained models through `hone-pretrained`: each test fetches
//! its model with `hone_sdk::pretrained::fetch` (a no-op once cached) and
//! fails, never skips, when that is impossible.

use std::io::BufRead;
use std::path::PathBuf;
use std::time::Instant;

use hone_pretrained::candle_nn;
use hone_pretrained::{minilm, smollm, Device, Llama, MiniLmRewardModel, SmolLm, Tensor};

fn fetch(name: &str) -> PathBuf {
    hone_sdk::pretrained::fetch(name).unwrap_or_else(|e| panic!("cannot fetch {name}: {e}"))
}

fn reward_model(seed: u64) -> MiniLmRewardModel {
    MiniLmRewardModel::load(&fetch(minilm::MODEL_NAME), &Device::Cpu, seed).expect("load MiniLM")
}

fn cosine(a: &[f32], b: &[f32]) -> f32 {
    // The embeddings are L2-normalised: the dot product is the cosine.
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// The first pair of the HH-RLHF harmless-base test split, as (prompt,
/// chosen response, rejected response): the dialogue up to the last
/// "Assistant:" turn is the prompt.
fn hh_rlhf_pair() -> (String, String, String) {
    let path = hone_tests::workspace().join("data/hh-rlhf-harmless-base-test/test.jsonl.gz");
    let file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let line = std::io::BufReader::new(flate2::read::GzDecoder::new(file))
        .lines()
        .next()
        .expect("a first line")
        .expect("readable");
    let record: serde_json::Value = serde_json::from_str(&line).expect("JSON");
    let split = |text: &str| {
        let at = text.rfind("\n\nAssistant:").expect("an Assistant turn") + "\n\nAssistant:".len();
        (text[..at].to_string(), text[at..].trim().to_string())
    };
    let (prompt, chosen) = split(record["chosen"].as_str().expect("chosen"));
    let (rejected_prompt, rejected) = split(record["rejected"].as_str().expect("rejected"));
    assert_eq!(
        prompt, rejected_prompt,
        "chosen and rejected share the dialogue"
    );
    (prompt, chosen, rejected)
}

#[test]
fn smollm2_greedy_answer_names_paris() {
    let dir = fetch(smollm::MODEL_NAME);
    let started = Instant::now();
    let mut policy = SmolLm::load(&dir, &Device::Cpu).expect("load SmolLM2");
    let loaded = started.elapsed();
    let prompt = SmolLm::chat_prompt("What is the capital of France?");
    let started = Instant::now();
    let (text, logprobs) = policy.generate(&prompt, 32, 0.0, 0).expect("generate");
    eprintln!(
        "SmolLM2 loaded in {loaded:?}; {} tokens in {:?}: {text:?}",
        logprobs.len(),
        started.elapsed()
    );
    assert!(text.contains("Paris"), "greedy answer: {text:?}");
    assert!(
        !text.contains("<|im_end|>"),
        "special tokens are left out: {text:?}"
    );
    assert!(!logprobs.is_empty() && logprobs.len() <= 32);
    assert!(
        logprobs.iter().all(|lp| lp.is_finite() && *lp <= 0.0),
        "log-probs: {logprobs:?}"
    );
}

#[test]
fn smollm2_tokenizer_from_gguf_keeps_chatml_tokens_whole_and_round_trips() {
    let policy = SmolLm::load(&fetch(smollm::MODEL_NAME), &Device::Cpu).expect("load SmolLM2");
    let tokenizer = policy.tokenizer();
    let prompt = SmolLm::chat_prompt("Hello, world! 1234 café");
    let encoding = tokenizer.encode(prompt.as_str(), false).expect("encode");
    let ids = encoding.get_ids();
    assert_eq!(
        ids[0],
        tokenizer.token_to_id("<|im_start|>").expect("<|im_start|>")
    );
    let im_end = tokenizer.token_to_id("<|im_end|>").expect("<|im_end|>");
    assert_eq!(ids.iter().filter(|&&id| id == im_end).count(), 2);
    // SmolLM2 splits numbers into single digits.
    let tokens = encoding.get_tokens();
    for digit in ["1", "2", "3", "4"] {
        assert!(tokens.iter().any(|t| t == digit), "tokens: {tokens:?}");
    }
    assert_eq!(tokenizer.decode(ids, false).expect("decode"), prompt);
}

#[test]
fn smollm2_sampling_is_deterministic_for_a_seed() {
    let mut policy = SmolLm::load(&fetch(smollm::MODEL_NAME), &Device::Cpu).expect("load SmolLM2");
    let prompt = SmolLm::chat_prompt("Write one sentence about the sea.");
    let first = policy.generate(&prompt, 12, 1.0, 7).expect("generate");
    let again = policy.generate(&prompt, 12, 1.0, 7).expect("generate");
    assert_eq!(first, again);
    assert!(first.1.iter().all(|lp| lp.is_finite() && *lp <= 0.0));
}

#[test]
fn minilm_embeddings_rank_paraphrases_above_unrelated_sentences() {
    let model = reward_model(0);
    let embeddings = model
        .embed(&[
            "A man is eating food.",
            "A man is eating a piece of bread.",
            "The sky is blue today.",
        ])
        .expect("embed");
    assert_eq!(embeddings.dims(), [3, 384]);
    let rows: Vec<Vec<f32>> = embeddings.to_vec2().expect("to_vec2");
    let food_bread = cosine(&rows[0], &rows[1]);
    let food_sky = cosine(&rows[0], &rows[2]);
    let bread_sky = cosine(&rows[1], &rows[2]);
    eprintln!(
        "cosines: food/bread {food_bread:.3}, food/sky {food_sky:.3}, bread/sky {bread_sky:.3}"
    );
    assert!(food_bread > 0.5, "food/bread {food_bread}");
    assert!(food_bread > food_sky + 0.3 && food_bread > bread_sky + 0.3);
    for row in &rows {
        let norm = cosine(row, row).sqrt();
        assert!((norm - 1.0).abs() < 1e-4, "norm {norm}");
    }
}

#[test]
fn minilm_embedding_does_not_depend_on_batch_padding() {
    let model = reward_model(0);
    let alone: Vec<Vec<f32>> = model
        .embed(&["A man is eating food."])
        .expect("embed")
        .to_vec2()
        .expect("to_vec2");
    let padded: Vec<Vec<f32>> = model
        .embed(&[
            "A man is eating food.",
            "A much longer sentence that forces the first one to be padded with many pad tokens.",
        ])
        .expect("embed")
        .to_vec2()
        .expect("to_vec2");
    let drift: f32 = alone[0]
        .iter()
        .zip(&padded[0])
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f32::max);
    assert!(drift < 1e-4, "padding changed the embedding by {drift}");
}

#[test]
fn minilm_reward_model_scores_an_hh_rlhf_pair_deterministically_per_seed() {
    let (prompt, chosen, rejected) = hh_rlhf_pair();
    let prompts = [prompt.as_str(), prompt.as_str()];
    let responses = [chosen.as_str(), rejected.as_str()];
    let scores = reward_model(42).score(&prompts, &responses).expect("score");
    eprintln!("chosen {:.4}, rejected {:.4}", scores[0], scores[1]);
    assert_eq!(scores.len(), 2);
    assert!(scores.iter().all(|s| s.is_finite()), "scores {scores:?}");
    assert_ne!(
        scores[0], scores[1],
        "different responses, different rewards"
    );
    assert_eq!(
        reward_model(42).score(&prompts, &responses).expect("score"),
        scores
    );
    assert_ne!(
        reward_model(43).score(&prompts, &responses).expect("score"),
        scores
    );
}

#[test]
fn minilm_score_rejects_unpaired_input() {
    let err = reward_model(0)
        .score(&["a prompt"], &[])
        .expect_err("unpaired");
    assert!(
        err.to_string().contains("1 prompts but 0 responses"),
        "{err}"
    );
}

#[test]
fn minilm_reward_head_weight_and_bias_receive_gradients() {
    let model = reward_model(0);
    let scores = model
        .score_tensor(&["Is the sky blue?"], &["Yes, on a clear day."])
        .expect("score");
    let grads = scores.sum_all().expect("sum").backward().expect("backward");
    let vars = model.varmap().all_vars();
    assert_eq!(
        vars.len(),
        2,
        "the head's weight and bias are the only variables"
    );
    for var in &vars {
        let grad = grads.get(var).expect("every head variable gets a gradient");
        let size: f32 = grad
            .abs()
            .and_then(|g| g.sum_all())
            .and_then(|g| g.to_scalar())
            .expect("gradient size");
        assert!(size > 0.0, "zero gradient for a {:?} variable", var.dims());
    }
}

fn smollm_gguf() -> PathBuf {
    fetch(smollm::MODEL_NAME).join(smollm::GGUF_FILE)
}

fn encode(policy: &SmolLm, text: &str) -> Vec<u32> {
    let encoding = policy.tokenizer().encode(text, false).expect("encode");
    encoding.get_ids().to_vec()
}

fn last_logits(model: &Llama, ids: &[u32]) -> Vec<f32> {
    let input = Tensor::new(ids, model.device())
        .and_then(|t| t.unsqueeze(0))
        .expect("ids");
    let logits = model.forward(&input).expect("forward");
    let t = logits.dim(1).expect("dim");
    logits
        .get(0)
        .and_then(|l| l.get(t - 1))
        .and_then(|l| l.to_vec1())
        .expect("last logits")
}

#[test]
fn trainable_llama_matches_quantized_llama_and_answers_paris() {
    let dir = fetch(smollm::MODEL_NAME);
    let mut reference = SmolLm::load(&dir, &Device::Cpu).expect("load SmolLM2");
    let started = Instant::now();
    let (model, varmap) = Llama::from_gguf(&smollm_gguf(), &Device::Cpu).expect("load Llama");
    let loaded = started.elapsed();
    assert_eq!(model.config().hidden_size, 576);
    assert_eq!(model.config().num_hidden_layers, 30);
    assert!(!varmap.all_vars().is_empty());

    let mut ids = encode(
        &reference,
        &SmolLm::chat_prompt("What is the capital of France?"),
    );
    let expected: Vec<f32> = reference
        .next_token_logits(&ids)
        .and_then(|l| Ok(l.to_vec1()?))
        .expect("reference logits");
    let started = Instant::now();
    let actual = last_logits(&model, &ids);
    let forward = started.elapsed();
    let max_diff = expected
        .iter()
        .zip(&actual)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    let (lo, hi) = expected
        .iter()
        .fold((f32::MAX, f32::MIN), |(lo, hi), x| (lo.min(*x), hi.max(*x)));
    eprintln!(
        "loaded in {loaded:?}; forward of {} tokens in {forward:?}; max |diff| {max_diff} over logit range {}",
        ids.len(),
        hi - lo
    );
    assert!(max_diff < 1e-2 * (hi - lo), "max |diff| {max_diff}");

    let prompt_len = ids.len();
    for _ in 0..8 {
        let logits = last_logits(&model, &ids);
        let next = (0..logits.len())
            .max_by(|&a, &b| logits[a].total_cmp(&logits[b]))
            .expect("non-empty") as u32;
        ids.push(next);
    }
    let answer = reference
        .tokenizer()
        .decode(&ids[prompt_len..], true)
        .expect("decode");
    eprintln!("greedy answer: {answer:?}");
    assert!(answer.contains("Paris"), "greedy answer: {answer:?}");
}

/// Next-token cross-entropy of `ids` under `model`.
fn next_token_loss(model: &Llama, ids: &[u32]) -> Tensor {
    let input = Tensor::new(&ids[..ids.len() - 1], model.device())
        .and_then(|t| t.unsqueeze(0))
        .expect("input");
    let targets = Tensor::new(&ids[1..], model.device()).expect("targets");
    let logits = model.forward(&input).expect("forward");
    let logits = logits.squeeze(0).expect("squeeze");
    candle_nn::loss::cross_entropy(&logits, &targets).expect("loss")
}

#[test]
fn every_trainable_llama_parameter_gets_a_gradient() {
    let policy = SmolLm::load(&fetch(smollm::MODEL_NAME), &Device::Cpu).expect("load SmolLM2");
    let (model, varmap) =
        Llama::from_gguf_truncated(&smollm_gguf(), &Device::Cpu, 2).expect("load Llama");
    let ids = encode(&policy, "The quick brown fox jumps over the lazy dog.");
    let loss = next_token_loss(&model, &ids);
    let grads = loss.backward().expect("backward");
    let vars = varmap.all_vars();
    assert_eq!(vars.len(), 2 + 2 * 9, "embedding, final norm, 9 per layer");
    for var in &vars {
        let grad = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("no gradient for a {:?} parameter", var.dims()));
        let norm: f32 = grad
            .sqr()
            .and_then(|g| g.sum_all())
            .and_then(|g| g.to_scalar())
            .expect("norm");
        assert!(norm > 0.0, "zero gradient for a {:?} parameter", var.dims());
    }
}

#[test]
fn adamw_steps_lower_a_sentence_loss() {
    use candle_nn::Optimizer;
    let policy = SmolLm::load(&fetch(smollm::MODEL_NAME), &Device::Cpu).expect("load SmolLM2");
    let (model, varmap) =
        Llama::from_gguf_truncated(&smollm_gguf(), &Device::Cpu, 2).expect("load Llama");
    let ids = encode(&policy, "Zebras paint purple violins under the quiet moon.");
    let params = candle_nn::ParamsAdamW {
        lr: 1e-4,
        ..Default::default()
    };
    let mut opt = candle_nn::AdamW::new(varmap.all_vars(), params).expect("AdamW");
    let mut losses = Vec::new();
    let started = Instant::now();
    for _ in 0..4 {
        let loss = next_token_loss(&model, &ids);
        losses.push(loss.to_scalar::<f32>().expect("scalar"));
        opt.backward_step(&loss).expect("step");
    }
    losses.push(
        next_token_loss(&model, &ids)
            .to_scalar::<f32>()
            .expect("scalar"),
    );
    eprintln!("losses {losses:?} in {:?}", started.elapsed());
    assert!(losses[4] < losses[0] - 0.1, "losses {losses:?}");
}

#[test]
fn hf_tokenizer_from_gguf_saves_and_reloads_as_tokenizer_json() {
    use hone_pretrained::hone_models::tokenizer::Tokenizer;
    let policy = SmolLm::load(&fetch(smollm::MODEL_NAME), &Device::Cpu).expect("load SmolLM2");
    let tokenizer = policy.hf_tokenizer();
    let prompt = SmolLm::chat_prompt("Hello, world! 1234 café");
    let ids = tokenizer.encode(&prompt);
    assert_eq!(ids, encode(&policy, &prompt));
    assert_eq!(tokenizer.vocab_size(), 49152);
    let im_start = policy.tokenizer().token_to_id("<|im_start|>").expect("id");
    let im_end = policy.tokenizer().token_to_id("<|im_end|>").expect("id");
    assert_eq!((tokenizer.bos_id(), tokenizer.eos_id()), (im_start, im_end));
    // Special tokens are skipped on decode.
    assert!(tokenizer.decode(&ids).contains("Hello, world! 1234 café"));
    assert!(!tokenizer.decode(&ids).contains("<|im_start|>"));

    let dir = std::env::temp_dir().join(format!("hone-hf-tokenizer-{}", std::process::id()));
    tokenizer.save(&dir).expect("save");
    let reloaded =
        hone_pretrained::HfTokenizer::from_file(&dir.join("tokenizer.json")).expect("reload");
    assert_eq!(reloaded.encode(&prompt), ids);
    assert_eq!(
        (reloaded.bos_id(), reloaded.eos_id(), reloaded.vocab_size()),
        (im_start, im_end, 49152)
    );
    std::fs::remove_dir_all(&dir).ok();
}

/// A pair as BERT's two segments, through MiniLM's own tokenizer: ids,
/// segment ids, attention mask, each [B, T].
fn bert_inputs(model: &MiniLmRewardModel, pairs: &[(&str, &str)]) -> (Tensor, Tensor, Tensor) {
    let inputs: Vec<hone_pretrained::tokenizers::EncodeInput> =
        pairs.iter().map(|(p, r)| (*p, *r).into()).collect();
    let encodings = model
        .tokenizer()
        .encode_batch(inputs, true)
        .expect("encode");
    let stack = |f: fn(&hone_pretrained::tokenizers::Encoding) -> &[u32]| {
        let rows: Vec<Tensor> = encodings
            .iter()
            .map(|e| Tensor::new(f(e), &Device::Cpu).unwrap())
            .collect();
        Tensor::stack(&rows, 0).unwrap()
    };
    (
        stack(|e| e.get_ids()),
        stack(|e| e.get_type_ids()),
        stack(|e| e.get_attention_mask()),
    )
}

const BERT_PAIRS: [(&str, &str); 2] = [
    (
        "Is the sky blue?",
        "Yes, on a clear day the sky looks blue.",
    ),
    (
        "How do I bake bread?",
        "Mix flour, water, salt and yeast; let it rise; bake.",
    ),
];

#[test]
fn trainable_bert_matches_candle_transformers_bert() {
    use hone_pretrained::bert::{mean_pool, Bert};
    let reference = reward_model(0);
    let (bert, _) = Bert::load(&fetch(minilm::MODEL_NAME), &Device::Cpu).expect("load BERT");
    assert_eq!(bert.num_layers(), 6);
    let (ids, types, mask) = bert_inputs(&reference, &BERT_PAIRS);
    let ours = mean_pool(&bert.forward(&ids, &types, &mask).unwrap(), &mask).unwrap();
    let (prompts, responses): (Vec<&str>, Vec<&str>) = BERT_PAIRS.iter().copied().unzip();
    let theirs = reference.pool_pairs(&prompts, &responses).unwrap();
    let diff = (ours - theirs)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(diff < 1e-4, "pooled states differ by {diff}");
}

#[test]
fn every_trainable_bert_top_layer_parameter_gets_a_gradient_and_the_rest_none() {
    use hone_pretrained::bert::{mean_pool, Bert};
    let reference = reward_model(0);
    let (bert, varmap) = Bert::load(&fetch(minilm::MODEL_NAME), &Device::Cpu).expect("load BERT");
    let (ids, types, mask) = bert_inputs(&reference, &BERT_PAIRS);
    // Layers 0-3 frozen (run once, detached, as a cache would hold them);
    // layers 4-5 trained.
    let frozen = bert
        .run_layers(&bert.embed(&ids, &types).unwrap(), &mask, 0..4)
        .unwrap()
        .detach();
    let top = bert.run_layers(&frozen, &mask, 4..6).unwrap();
    let loss = mean_pool(&top, &mask)
        .unwrap()
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap();
    let grads = loss.backward().unwrap();
    let trained = bert.layer_vars(&varmap, 4..6);
    assert_eq!(trained.len(), 2 * 16, "16 tensors a layer");
    for (name, var) in &trained {
        let g = grads
            .get(var)
            .unwrap_or_else(|| panic!("no gradient for {name}"));
        let size = g
            .abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(size > 0.0, "zero gradient for {name}");
    }
    for (name, var) in bert.layer_vars(&varmap, 0..4) {
        assert!(
            grads.get(&var).is_none(),
            "{name} is frozen but got a gradient"
        );
    }
}

#[test]
fn bert_split_at_a_layer_with_cached_states_equals_the_whole_forward_pass() {
    use hone_pretrained::bert::{encode_pairs, mean_pool, pair_tokenizer, Bert};
    let dir = fetch(minilm::MODEL_NAME);
    let (bert, _) = Bert::load(&dir, &Device::Cpu).expect("load BERT");
    let tokenizer = pair_tokenizer(&dir, 64).unwrap();
    // Lengths differ, so the batches pad: padding must change nothing.
    let encoded = encode_pairs(&tokenizer, &BERT_PAIRS).unwrap();
    assert_ne!(encoded[0].0.len(), encoded[1].0.len());
    let states = bert.frozen_states(&encoded, 4, 2, &mut |_, _| {}).unwrap();
    let split = bert
        .pooled_from(&states.iter().collect::<Vec<_>>(), 4)
        .unwrap();
    for (i, (ids, types)) in encoded.iter().enumerate() {
        let ids = Tensor::new(ids.as_slice(), &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let types = Tensor::new(types.as_slice(), &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let mask = ids.ones_like().unwrap();
        let alone = mean_pool(&bert.forward(&ids, &types, &mask).unwrap(), &mask).unwrap();
        let diff = (alone.squeeze(0).unwrap() - split.get(i).unwrap())
            .unwrap()
            .abs()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(diff < 1e-4, "text {i}: the split path differs by {diff}");
    }
}
