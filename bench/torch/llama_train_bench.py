"""PyTorch/transformers reference for `hone-bench llama-train`: the same
SmolLM2-135M training step, loaded by transformers from the same pinned GGUF
file (dequantized to f32, as hone's Llama port does), on the same token ids.

The step is the one lm.sft and lm.dpo take: the top `trained` layers and the
final norm run from the cached residual stream after the frozen layers (here
transformers' own hidden state after them, computed once without gradient),
the tied LM head (frozen) on the response positions only, log-softmax and
gather, the mean NLL, backward, and torch.optim.AdamW (lr 1e-5, as hone's)
over the trained layers' weights and the final norm.

Prints one JSON object: ms per step (median of `repeats` repeats of `steps`
steps), the first step's loss (hone prints its own, to show both compute the
same thing), and the versions.
"""

import json
import statistics
import sys
import time

import torch
import transformers
from transformers import AutoModelForCausalLM


def main():
    cfg = json.loads(sys.argv[1])
    torch.set_num_threads(cfg["threads"])
    model = AutoModelForCausalLM.from_pretrained(
        cfg["model_dir"],
        gguf_file=cfg["gguf_file"],
        dtype=torch.float32,
        # Causal through SDPA's is_causal when no mask is passed (below).
        attn_implementation="sdpa",
    )
    model.train()
    batch, tokens, response = cfg["batch"], cfg["tokens"], cfg["response"]
    frozen = cfg["frozen"]
    ids = torch.tensor(cfg["ids"]).reshape(batch, tokens)
    targets = torch.tensor(cfg["targets"]).reshape(batch, response)
    inner = model.model
    layers = inner.layers[frozen:]
    for p in model.parameters():
        p.requires_grad_(False)
    trained = [p for layer in layers for p in layer.parameters()] + list(inner.norm.parameters())
    for p in trained:
        p.requires_grad_(True)
    with torch.no_grad():
        # hidden_states[i]: the residual stream after the first i layers.
        x = inner(input_ids=ids, output_hidden_states=True).hidden_states[frozen].detach()
    positions = torch.arange(tokens).unsqueeze(0)
    opt = torch.optim.AdamW(trained, lr=1e-5)
    head = model.lm_head.weight

    def step():
        h = x
        rotary = inner.rotary_emb(h, positions)
        for layer in layers:
            # No mask: SDPA attention is then causal (is_causal), as hone's.
            out = layer(h, attention_mask=None, position_ids=positions, position_embeddings=rotary)
            h = out[0] if isinstance(out, tuple) else out
        h = inner.norm(h)
        picked = h[:, tokens - response :, :].reshape(batch * response, -1)
        logits = picked @ head.t()
        logp = torch.log_softmax(logits, -1).gather(1, targets.reshape(-1, 1)).squeeze(1)
        loss = -logp.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.item()

    first = step()
    for _ in range(2):  # warm-up, as hone's side
        step()
    times = []
    for _ in range(cfg["repeats"]):
        t = time.perf_counter()
        for _ in range(cfg["steps"]):
            step()
        times.append((time.perf_counter() - t) * 1000.0 / cfg["steps"])
    print(
        json.dumps(
            {
                "ms": statistics.median(times),
                "first_loss": first,
                "trained": sum(p.numel() for p in trained),
                "torch": torch.__version__,
                "transformers": transformers.__version__,
            }
        )
    )


if __name__ == "__main__":
    main()
