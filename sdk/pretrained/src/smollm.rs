//! SmolLM2-135M-Instruct from its GGUF file: candle's quantized Llama with a
//! byte-level BPE tokenizer rebuilt from the GGUF metadata.
//!
//! The Q4_1 weights are dequantized to f32 on load: candle 0.11.1's CPU Q4_1
//! matmul answers wrongly with this model (greedy decoding of the "capital
//! of France" prompt starts "L'Étoile, la Marseillaise, …") and runs about 6×
//! slower than f32 on an AVX2 CPU. The f32 copy takes ~540 MB.
//!
//! This is an inference-only policy: it samples responses and reports their
//! log-probabilities. For training, [`crate::Llama::from_gguf`] loads the
//! same file as f32 `Var`s with llama.cpp's Q/K row permutation undone.

use std::io::{Cursor, Read, Seek};
use std::path::Path;

use candle_core::quantized::gguf_file::{self, Content, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor, D};
use candle_transformers::generation::LogitsProcessor;
use candle_transformers::models::quantized_llama::{ModelWeights, MAX_SEQ_LEN};
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::{AddedToken, Tokenizer};

use crate::llama::{open_gguf, Llama, LlamaConfig};
use crate::sample::{continuations, Continuation};
use crate::{Error, HfTokenizer, Result};

/// The model's name in [`hone_sdk::pretrained`].
pub const MODEL_NAME: &str = "smollm2-135m-instruct";

/// The GGUF file inside the fetched model directory.
pub const GGUF_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

/// The system turn SmolLM2's chat template adds when none is given.
pub const DEFAULT_SYSTEM_PROMPT: &str =
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face";

/// llama.cpp's token type for control tokens (`<|im_start|>` and friends).
const CONTROL_TOKEN: i32 = 3;

/// SmolLM2-135M-Instruct: a quantized Llama and its tokenizer.
pub struct SmolLm {
    model: ModelWeights,
    tokenizer: Tokenizer,
    /// Generation ends at any of these: `<|im_end|>`, the GGUF's EOS, `<|endoftext|>`.
    stop_tokens: Vec<u32>,
    /// The GGUF's BOS id (its EOS when it names none).
    bos: u32,
    device: Device,
}

impl SmolLm {
    /// Loads `GGUF_FILE` from `dir` (as returned by
    /// `hone_sdk::pretrained::fetch(MODEL_NAME)`) onto `device`.
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        let (mut file, content) = open_gguf(&dir.join(GGUF_FILE))?;
        let tokenizer = tokenizer_from_gguf(&content)?;
        let (stop_tokens, bos) = special_tokens(&content, &tokenizer)?;
        let (content, mut f32_gguf) = dequantized(&content, &mut file)?;
        let model = ModelWeights::from_gguf(content, &mut f32_gguf, device)?;
        Ok(Self {
            model,
            tokenizer,
            stop_tokens,
            bos,
            device: device.clone(),
        })
    }

    /// The tokenizer rebuilt from the GGUF metadata.
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// Next-token logits [vocab] after `ids`, computed from scratch (the KV
    /// cache is cleared first).
    pub fn next_token_logits(&mut self, ids: &[u32]) -> Result<Tensor> {
        self.model.clear_kv_cache();
        let input = Tensor::new(ids, &self.device)?.unsqueeze(0)?;
        let logits = self.model.forward(&input, 0)?;
        self.model.clear_kv_cache();
        Ok(logits.squeeze(0)?.to_dtype(DType::F32)?)
    }

    /// The rebuilt tokenizer as a [`hone_models::tokenizer::Tokenizer`]: BOS and EOS
    /// from the GGUF metadata (`<|im_start|>`, `<|im_end|>` for SmolLM2),
    /// padding with EOS.
    pub fn hf_tokenizer(&self) -> HfTokenizer {
        let eos = self.stop_tokens[0];
        HfTokenizer::new(self.tokenizer.clone(), self.bos, eos, eos)
    }

    /// A single user turn in SmolLM2's ChatML template with its default
    /// system prompt, ending where the assistant's answer begins.
    pub fn chat_prompt(user: &str) -> String {
        format!(
            "<|im_start|>system\n{DEFAULT_SYSTEM_PROMPT}<|im_end|>\n\
             <|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"
        )
    }

    /// Continues `prompt` (already templated, e.g. by [`SmolLm::chat_prompt`])
    /// by at most `max_new_tokens` tokens, stopping after `<|im_end|>` or EOS.
    ///
    /// `temperature` 0 decodes greedily; above 0 it samples from the
    /// tempered distribution with an RNG seeded by `seed`. Returns the
    /// generated text (special tokens left out) and, for every generated
    /// token including the stop token, its log-probability under the model's
    /// own distribution (temperature 1), whatever temperature sampled it.
    pub fn generate(
        &mut self,
        prompt: &str,
        max_new_tokens: usize,
        temperature: f64,
        seed: u64,
    ) -> Result<(String, Vec<f32>)> {
        let prompt_ids = self.tokenizer.encode(prompt, false)?.get_ids().to_vec();
        if prompt_ids.is_empty() {
            return Err(Error::Input("the prompt is empty".into()));
        }
        if prompt_ids.len() + max_new_tokens > MAX_SEQ_LEN {
            return Err(Error::Input(format!(
                "prompt ({} tokens) + max_new_tokens ({max_new_tokens}) exceeds the {MAX_SEQ_LEN}-token context",
                prompt_ids.len()
            )));
        }
        self.model.clear_kv_cache();
        let mut sampler = LogitsProcessor::new(seed, Some(temperature), None);
        let mut generated = Vec::with_capacity(max_new_tokens);
        let mut logprobs = Vec::with_capacity(max_new_tokens);
        let mut input = Tensor::new(prompt_ids.as_slice(), &self.device)?.unsqueeze(0)?;
        let mut position = 0;
        for _ in 0..max_new_tokens {
            let logits = self.model.forward(&input, position)?;
            let logits = logits.squeeze(0)?.to_dtype(DType::F32)?;
            position += input.dim(1)?;
            let token = sampler.sample(&logits)?;
            logprobs.push(token_logprob(&logits, token)?);
            if self.stop_tokens.contains(&token) {
                break;
            }
            generated.push(token);
            input = Tensor::new(&[token], &self.device)?.unsqueeze(0)?;
        }
        let text = self.tokenizer.decode(&generated, true)?;
        Ok((text, logprobs))
    }
}

/// Generation's stop tokens (the GGUF's EOS, `<|im_end|>`, `<|endoftext|>`)
/// and its BOS (the EOS when it names none).
fn special_tokens(content: &Content, tokenizer: &Tokenizer) -> Result<(Vec<u32>, u32)> {
    let mut stop_tokens = vec![metadata_u32(content, "tokenizer.ggml.eos_token_id")?];
    for special in ["<|im_end|>", "<|endoftext|>"] {
        if let Some(id) = tokenizer.token_to_id(special) {
            stop_tokens.push(id);
        }
    }
    let bos = metadata_u32(content, "tokenizer.ggml.bos_token_id").unwrap_or(stop_tokens[0]);
    Ok((stop_tokens, bos))
}

/// SmolLM2-135M-Instruct as hone's trainable f32 [`Llama`] port, with its
/// tokenizer: the policy `lm.rollout` samples from, several samples of a
/// prompt in one batch ([`crate::sample`]).
pub struct ChatLlama {
    /// The model; its weights are `vars`.
    pub model: Llama,
    /// The model's weights, under Hugging Face names.
    pub vars: candle_nn::VarMap,
    /// The tokenizer rebuilt from the GGUF metadata.
    pub tokenizer: Tokenizer,
    /// Generation ends at any of these.
    pub stop_tokens: Vec<u32>,
}

impl ChatLlama {
    /// Loads `GGUF_FILE` from `dir` onto `device`.
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        let (mut file, content) = open_gguf(&dir.join(GGUF_FILE))?;
        let tokenizer = tokenizer_from_gguf(&content)?;
        let (stop_tokens, _) = special_tokens(&content, &tokenizer)?;
        let (model, vars) = Llama::from_gguf_content(&content, &mut file, device, None)?;
        Ok(Self {
            model,
            vars,
            tokenizer,
            stop_tokens,
        })
    }

    /// Writes the model as a hone checkpoint in `dir`: `model.safetensors`
    /// (Hugging Face names), `config.json` (the [`LlamaConfig`]) and the
    /// Hugging Face `tokenizer.json`, each atomically; returns the sha256
    /// of the weights. [`ChatLlama::from_checkpoint`] reads it back.
    ///
    /// Layers with LoRA adapters are stored merged (`W + (alpha / r) B A`
    /// under the weight's own name), so the checkpoint is a plain SmolLM2.
    pub fn save(&self, dir: &Path) -> Result<String> {
        let eos = self.stop_tokens[0];
        let tok = HfTokenizer::new(self.tokenizer.clone(), eos, eos, eos);
        let merged = self.model.merged_weights()?;
        let vars = if merged.is_empty() {
            self.vars.clone()
        } else {
            let copy = candle_nn::VarMap::new();
            {
                let mut data = copy.data().lock().expect("VarMap lock");
                for (name, var) in self.vars.data().lock().expect("VarMap lock").iter() {
                    data.insert(name.clone(), var.clone());
                }
                for (name, weight) in merged {
                    data.insert(name, candle_core::Var::from_tensor(&weight)?);
                }
            }
            copy
        };
        Ok(hone_models::checkpoint::save(
            dir,
            &vars,
            self.model.config(),
            &tok,
        )?)
    }

    /// Whether `dir` holds a checkpoint written by [`ChatLlama::save`] (its
    /// config names Llama's layers) rather than one of hone's GPT.
    pub fn is_checkpoint(dir: &Path) -> bool {
        std::fs::read_to_string(dir.join(hone_models::checkpoint::CONFIG))
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            .is_some_and(|v| v.get("num_hidden_layers").is_some())
    }

    /// Loads a checkpoint written by [`ChatLlama::save`] onto `device`.
    /// Generation stops at `<|im_end|>` and `<|endoftext|>`, found by name in
    /// the tokenizer.
    pub fn from_checkpoint(dir: &Path, device: &Device) -> Result<Self> {
        let cfg: LlamaConfig = hone_models::checkpoint::load_config(dir)?;
        let mut vars = candle_nn::VarMap::new();
        let model = Llama::new(
            &cfg,
            candle_nn::VarBuilder::from_varmap(&vars, DType::F32, device),
        )?;
        hone_models::checkpoint::load_weights(dir, &mut vars)?;
        let path = dir.join("tokenizer.json");
        let tokenizer = Tokenizer::from_file(&path)
            .map_err(|e| Error::Input(format!("cannot load {}: {e}", path.display())))?;
        let stop_tokens: Vec<u32> = ["<|im_end|>", "<|endoftext|>"]
            .iter()
            .filter_map(|t| tokenizer.token_to_id(t))
            .collect();
        if stop_tokens.is_empty() {
            return Err(Error::Input(format!(
                "{} has neither <|im_end|> nor <|endoftext|>: not a SmolLM2 chat tokenizer",
                path.display()
            )));
        }
        Ok(Self {
            model,
            vars,
            tokenizer,
            stop_tokens,
        })
    }

    /// The token ids of `text`, special tokens parsed (no BOS added: the
    /// chat template starts with `<|im_start|>`).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        Ok(self.tokenizer.encode(text, false)?.get_ids().to_vec())
    }

    /// Samples one continuation of `prompt` (already templated, e.g. by
    /// [`chat_template`]) per seed, all in one batch; returns each one's text
    /// (special tokens left out) with its tokens and log-probabilities.
    pub fn sample(
        &self,
        prompt: &str,
        seeds: &[u64],
        max_new_tokens: usize,
        temperature: f64,
    ) -> Result<Vec<(String, Continuation)>> {
        let ids = self.tokenizer.encode(prompt, false)?.get_ids().to_vec();
        let samples = continuations(
            &self.model,
            &ids,
            seeds,
            max_new_tokens,
            temperature,
            &self.stop_tokens,
        )?;
        samples
            .into_iter()
            .map(|c| Ok((self.tokenizer.decode(&c.tokens, true)?, c)))
            .collect()
    }
}

/// `prompt` in SmolLM2's ChatML template with its default system prompt,
/// ending where the assistant's answer begins. An HH-RLHF transcript
/// ("\n\nHuman: … \n\nAssistant: … \n\nHuman: … \n\nAssistant:")
/// becomes its turns, so that the model answers the last human turn as the
/// assistant of that conversation; any other text is one user turn.
pub fn chat_template(prompt: &str) -> String {
    let Some(turns) = hh_turns(prompt) else {
        return SmolLm::chat_prompt(prompt);
    };
    let mut out = format!("<|im_start|>system\n{DEFAULT_SYSTEM_PROMPT}<|im_end|>\n");
    for (role, text) in turns {
        out.push_str(&format!("<|im_start|>{role}\n{text}<|im_end|>\n"));
    }
    out.push_str("<|im_start|>assistant\n");
    out
}

/// The (role, text) turns of an HH-RLHF transcript that ends with an empty
/// assistant turn, or None if `prompt` is not one.
fn hh_turns(prompt: &str) -> Option<Vec<(&'static str, &str)>> {
    let body = prompt.trim_start().strip_prefix("Human:")?;
    let body = body.trim_end().strip_suffix("\n\nAssistant:")?;
    let mut turns = Vec::new();
    let mut rest = body;
    let mut role = "user";
    loop {
        let marker = if role == "user" {
            "\n\nAssistant:"
        } else {
            "\n\nHuman:"
        };
        match rest.find(marker) {
            Some(at) => {
                turns.push((role, rest[..at].trim()));
                rest = &rest[at + marker.len()..];
                role = if role == "user" { "assistant" } else { "user" };
            }
            None => {
                // The last turn is the human's, whose answer is asked for.
                if role != "user" {
                    return None;
                }
                turns.push((role, rest.trim()));
                return Some(turns);
            }
        }
    }
}

/// The same GGUF with every tensor dequantized to f32, in memory; candle
/// loads f32 GGUF tensors as plain tensors and multiplies them with its
/// ordinary (correct, fast) matmul.
fn dequantized<R: Read + Seek>(
    content: &Content,
    reader: &mut R,
) -> Result<(Content, Cursor<Vec<u8>>)> {
    let mut owned = Vec::with_capacity(content.tensor_infos.len());
    for name in content.tensor_infos.keys() {
        let tensor = content.tensor(reader, name, &Device::Cpu)?;
        let tensor = match tensor.dtype() {
            GgmlDType::F32 => tensor,
            _ => QTensor::quantize(&tensor.dequantize(&Device::Cpu)?, GgmlDType::F32)?,
        };
        owned.push((name.as_str(), tensor));
    }
    let metadata: Vec<(&str, &Value)> = content
        .metadata
        .iter()
        .map(|(k, v)| (k.as_str(), v))
        .collect();
    let tensors: Vec<(&str, &QTensor)> = owned.iter().map(|(n, t)| (*n, t)).collect();
    let mut buffer = Cursor::new(Vec::new());
    gguf_file::write(&mut buffer, &metadata, &tensors)?;
    drop(tensors);
    drop(owned);
    buffer.set_position(0);
    let content = Content::read(&mut buffer)?;
    Ok((content, buffer))
}

/// `log_softmax(logits)[token]` for a 1-D logits vector.
fn token_logprob(logits: &Tensor, token: u32) -> Result<f32> {
    let max = logits.max(D::Minus1)?;
    let shifted = logits.broadcast_sub(&max)?;
    let log_z = shifted.exp()?.sum(D::Minus1)?.log()?;
    let logprob = shifted.get(token as usize)?.sub(&log_z)?;
    Ok(logprob.to_scalar::<f32>()?)
}

/// Rebuilds the Hugging Face tokenizer llama.cpp folded into the GGUF:
/// GPT-2 byte-level BPE over `tokenizer.ggml.tokens` / `merges`, control
/// tokens kept whole, and (for `tokenizer.ggml.pre = "smollm"`) digits split
/// one by one before the byte-level split, as SmolLM2's tokenizer.json does.
fn tokenizer_from_gguf(content: &Content) -> Result<Tokenizer> {
    let model = metadata_str(content, "tokenizer.ggml.model")?;
    if model != "gpt2" {
        return Err(Error::Metadata(format!(
            "tokenizer.ggml.model is \"{model}\", only \"gpt2\" (byte-level BPE) is supported"
        )));
    }
    let tokens = metadata_array(content, "tokenizer.ggml.tokens")?;
    let tokens = tokens
        .iter()
        .map(|t| t.to_string().cloned())
        .collect::<std::result::Result<Vec<String>, _>>()
        .map_err(|e| Error::Metadata(format!("tokenizer.ggml.tokens: {e}")))?;
    let vocab: Vocab = tokens.iter().cloned().zip(0u32..).collect();
    let merges = metadata_array(content, "tokenizer.ggml.merges")?
        .iter()
        .map(|m| {
            let m = m.to_string().map_err(|e| e.to_string())?;
            m.split_once(' ')
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .ok_or_else(|| format!("merge \"{m}\" is not two tokens"))
        })
        .collect::<std::result::Result<Vec<_>, String>>()
        .map_err(|e| Error::Metadata(format!("tokenizer.ggml.merges: {e}")))?;
    let bpe = BPE::builder().vocab_and_merges(vocab, merges).build()?;

    let mut tokenizer = Tokenizer::new(bpe);
    let byte_level = ByteLevel::new(false, true, true);
    let digits_first = metadata_str(content, "tokenizer.ggml.pre").is_ok_and(|p| p == "smollm");
    if digits_first {
        tokenizer.with_pre_tokenizer(Some(Sequence::new(vec![
            Digits::new(true).into(),
            byte_level.into(),
        ])));
    } else {
        tokenizer.with_pre_tokenizer(Some(byte_level));
    }
    tokenizer.with_decoder(Some(ByteLevelDecoder::default()));

    let token_types = metadata_array(content, "tokenizer.ggml.token_type")?;
    let special: Vec<AddedToken> = tokens
        .iter()
        .zip(token_types)
        .filter(|(_, kind)| kind.to_i32().is_ok_and(|k| k == CONTROL_TOKEN))
        .map(|(token, _)| AddedToken::from(token.clone(), true))
        .collect();
    tokenizer.add_special_tokens(special)?;
    Ok(tokenizer)
}

fn metadata<'a>(content: &'a Content, key: &str) -> Result<&'a Value> {
    content
        .metadata
        .get(key)
        .ok_or_else(|| Error::Metadata(format!("no {key}")))
}

fn metadata_array<'a>(content: &'a Content, key: &str) -> Result<&'a Vec<Value>> {
    metadata(content, key)?
        .to_vec()
        .map_err(|e| Error::Metadata(format!("{key}: {e}")))
}

fn metadata_str<'a>(content: &'a Content, key: &str) -> Result<&'a String> {
    metadata(content, key)?
        .to_string()
        .map_err(|e| Error::Metadata(format!("{key}: {e}")))
}

fn metadata_u32(content: &Content, key: &str) -> Result<u32> {
    metadata(content, key)?
        .to_u32()
        .map_err(|e| Error::Metadata(format!("{key}: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chat_prompt_follows_smollm2_chatml_template() {
        assert_eq!(
            SmolLm::chat_prompt("Hi"),
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn hh_transcripts_become_chat_turns() {
        let hh = "\n\nHuman: Why is the sky blue?\n\nAssistant: Scattering.\n\nHuman: Say more\n\nAssistant:";
        let system = format!("<|im_start|>system\n{DEFAULT_SYSTEM_PROMPT}<|im_end|>\n");
        assert_eq!(
            chat_template(hh),
            format!(
                "{system}<|im_start|>user\nWhy is the sky blue?<|im_end|>\n\
                 <|im_start|>assistant\nScattering.<|im_end|>\n\
                 <|im_start|>user\nSay more<|im_end|>\n<|im_start|>assistant\n"
            )
        );
        // Not a transcript, or one ending on the assistant's turn: one user turn.
        for text in [
            "Hi",
            "Human: a\n\nAssistant: b\n\nHuman: c",
            "Human: a\n\nAssistant: b\n\nAssistant:",
            "Human: act as my Assistant:",
        ] {
            assert_eq!(chat_template(text), SmolLm::chat_prompt(text), "{text:?}");
        }
    }
}
