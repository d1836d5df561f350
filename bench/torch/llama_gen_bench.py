"""PyTorch/transformers reference for `hone-bench llama-gen`: SmolLM2-135M
loaded by transformers from the same pinned GGUF file (dequantized to f32,
as hone's Llama port does), greedy decoding of the same prompt ids at batch
1 and 8 with the KV cache: a plain loop of forward calls (what hone's port
runs) and `generate` (what a transformers user calls). Prints one JSON
object: tokens/s (median of `repeats`) per path and batch, and the batch-1
greedy tokens, which hone compares with its own.
"""

import json
import statistics
import sys
import time

import torch
import transformers
from transformers import AutoModelForCausalLM


def greedy_loop(model, ids, tokens):
    # logits_to_keep=1: the LM head on the last position only, as hone's
    # port computes it.
    out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
    past = out.past_key_values
    nxt = out.logits[:, -1].argmax(-1, keepdim=True)
    produced = [nxt]
    for _ in range(tokens - 1):
        out = model(input_ids=nxt, past_key_values=past, use_cache=True, logits_to_keep=1)
        past = out.past_key_values
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        produced.append(nxt)
    return torch.cat(produced, 1)


def main():
    cfg = json.loads(sys.argv[1])
    torch.set_num_threads(cfg["threads"])
    model = AutoModelForCausalLM.from_pretrained(
        cfg["model_dir"], gguf_file=cfg["gguf_file"], dtype=torch.float32
    ).eval()
    prompt = torch.tensor([cfg["prompt"]])
    tokens = cfg["tokens"]
    result = {"torch": torch.__version__, "transformers": transformers.__version__}
    with torch.inference_mode():
        result["greedy_ids"] = greedy_loop(model, prompt, tokens)[0].tolist()
        for batch in cfg["batches"]:
            ids = prompt.repeat(batch, 1)
            loop, gen = [], []
            for _ in range(cfg["repeats"]):
                t = time.perf_counter()
                greedy_loop(model, ids, tokens)
                loop.append(batch * tokens / (time.perf_counter() - t))
                t = time.perf_counter()
                model.generate(
                    ids,
                    attention_mask=torch.ones_like(ids),
                    max_new_tokens=tokens,
                    min_new_tokens=tokens,
                    do_sample=False,
                    pad_token_id=0,
                )
                gen.append(batch * tokens / (time.perf_counter() - t))
            result[f"loop_{batch}"] = statistics.median(loop)
            result[f"generate_{batch}"] = statistics.median(gen)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
