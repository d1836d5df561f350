"""PyTorch reference for hone's LM benchmark: the same GPT (token + learned
position embeddings, pre-LN blocks, causal self-attention, GELU MLP 4x, final
LN, untied LM head) at the same sizes, timed the same way.

Run through `bench/lm.sh`, which installs torch into a virtualenv used only by
the benchmark (the PyPI wheel is a CUDA build of ~2.8 GB; it runs on CPU).

Prints one JSON object: train tokens/s and generation tokens/s at batch 1 and
16 (with a KV cache), medians of REPEATS.
"""

import json
import math
import statistics
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


class Block(nn.Module):
    def __init__(self, d, h):
        super().__init__()
        self.h = h
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.fc = nn.Linear(d, 4 * d)
        self.out = nn.Linear(4 * d, d)

    def attend(self, x, cache):
        b, t, d = x.shape
        q, k, v = self.qkv(x).split(d, dim=2)
        q, k, v = (z.view(b, t, self.h, d // self.h).transpose(1, 2) for z in (q, k, v))
        if cache is not None:
            if "k" in cache:
                k = torch.cat([cache["k"], k], dim=2)
                v = torch.cat([cache["v"], v], dim=2)
            cache["k"], cache["v"] = k, v
        causal = cache is None or t > 1
        y = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))

    def forward(self, x, cache=None):
        x = x + self.attend(self.ln1(x), cache)
        return x + self.out(F.gelu(self.fc(self.ln2(x)), approximate="tanh"))


class Gpt(nn.Module):
    def __init__(self, vocab, d, layers, heads, context):
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(context, d)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)

    def forward(self, ids, caches=None, offset=0):
        t = ids.shape[1]
        x = self.tok(ids) + self.pos(torch.arange(offset, offset + t))
        for i, block in enumerate(self.blocks):
            x = block(x, None if caches is None else caches[i])
        return self.head(self.ln(x))


def main():
    cfg = json.loads(sys.argv[1])
    torch.manual_seed(0)
    torch.set_num_threads(cfg["threads"])
    vocab, d, layers, heads, ctx = cfg["vocab"], cfg["d_model"], cfg["n_layers"], cfg["n_heads"], cfg["context"]
    batch, steps, repeats = cfg["batch"], cfg["train_steps"], cfg["repeats"]
    model = Gpt(vocab, d, layers, heads, ctx)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(0, vocab, (batch, ctx + 1))

    def train():
        start = time.perf_counter()
        for _ in range(steps):
            logits = model(ids[:, :-1])
            loss = F.cross_entropy(logits.reshape(-1, vocab), ids[:, 1:].reshape(-1))
            opt.zero_grad()
            loss.backward()
            opt.step()
        return steps * batch * ctx / (time.perf_counter() - start)

    @torch.no_grad()
    def generate(b):
        new = cfg["gen_tokens"]
        prompt = torch.randint(0, vocab, (b, 8))
        start = time.perf_counter()
        caches = [dict() for _ in range(layers)]
        logits = model(prompt, caches, 0)
        pos = prompt.shape[1]
        for _ in range(new):
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            logits = model(nxt, caches, pos)
            pos += 1
        return b * new / (time.perf_counter() - start)

    train()  # warm-up
    result = {
        "train_tok_s": statistics.median(train() for _ in range(repeats)),
        "gen_b1_tok_s": statistics.median(generate(1) for _ in range(repeats)),
        "gen_b16_tok_s": statistics.median(generate(16) for _ in range(repeats)),
        "params": sum(p.numel() for p in model.parameters()),
        "torch": torch.__version__,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
