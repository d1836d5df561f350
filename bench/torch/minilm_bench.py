"""PyTorch/transformers reference for `hone-bench minilm`: all-MiniLM-L6-v2's
BertModel over the token ids hone tokenized (the file `ids_file`: batches of
[ids, segment ids] per text, sorted by length), padded per batch, the
attention-masked mean of the last hidden states, no gradients. Prints one
JSON object: texts/s (median of `repeats`) and the first batch's embeddings,
which hone compares with its own.

Then the reward-model training step of `rm.train` with `train_layers = 2`
on the pairs of `pairs_file` (text 2i chosen, 2i + 1 rejected): each text's
hidden states after the frozen layers below `split` computed once, then
per step `step_pairs` pairs through the top layers (padded, masked), the
mean pool and a linear head, the Bradley-Terry loss, backward and AdamW on
those layers and the head. Training tokens/s, median of `repeats`.
"""

import json
import statistics
import sys
import time

import torch
import transformers
from transformers import BertModel


def padded(batch):
    t = max(len(ids) for ids, _ in batch)
    ids = torch.zeros((len(batch), t), dtype=torch.long)
    types = torch.zeros((len(batch), t), dtype=torch.long)
    mask = torch.zeros((len(batch), t), dtype=torch.long)
    for row, (i, ty) in enumerate(batch):
        ids[row, : len(i)] = torch.tensor(i)
        types[row, : len(ty)] = torch.tensor(ty)
        mask[row, : len(i)] = 1
    return ids, types, mask


def embed(model, ids, types, mask):
    hidden = model(input_ids=ids, token_type_ids=types, attention_mask=mask).last_hidden_state
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1)


def run_layers(layers, hidden, mask):
    """The encoder layers over `hidden` [B, T, H] under the 0/1 `mask` [B, T]."""
    extended = (1.0 - mask[:, None, None, :].to(hidden.dtype)) * torch.finfo(hidden.dtype).min
    for layer in layers:
        out = layer(hidden, attention_mask=extended)
        hidden = out[0] if isinstance(out, tuple) else out
    return hidden


def train_rate(model, cfg):
    with open(cfg["pairs_file"]) as f:
        texts = json.load(f)
    split, per = cfg["split"], cfg["step_pairs"]
    layers = model.encoder.layer
    states = []
    with torch.no_grad():
        for ids, types in texts:
            i = torch.tensor([ids])
            t = torch.tensor([types])
            h = model.embeddings(input_ids=i, token_type_ids=t)
            states.append(run_layers(layers[:split], h, torch.ones_like(i))[0])
    head = torch.nn.Linear(model.config.hidden_size, 1)
    params = [p for layer in layers[split:] for p in layer.parameters()] + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01)
    pairs = len(texts) // 2
    assert pairs > per, f"{pairs} pairs for steps of {per}"
    step = 0
    rates = []
    for _ in range(cfg["repeats"]):
        started = time.perf_counter()
        tokens = 0
        for _ in range(cfg["steps"]):
            first = (step * per) % (pairs - per + 1)
            step += 1
            rows = [states[2 * i] for i in range(first, first + per)]
            rows += [states[2 * i + 1] for i in range(first, first + per)]
            t = max(r.shape[0] for r in rows)
            hidden = torch.zeros((len(rows), t, rows[0].shape[1]))
            mask = torch.zeros((len(rows), t))
            for j, r in enumerate(rows):
                hidden[j, : r.shape[0]] = r
                mask[j, : r.shape[0]] = 1
            tokens += int(mask.sum())
            out = run_layers(layers[split:], hidden, mask)
            m = mask.unsqueeze(-1)
            pooled = (out * m).sum(1) / m.sum(1)
            r = head(pooled).squeeze(-1)
            loss = -torch.nn.functional.logsigmoid(r[:per] - r[per:]).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            loss.item()
        rates.append(tokens / (time.perf_counter() - started))
    return statistics.median(rates)


def main():
    cfg = json.loads(sys.argv[1])
    torch.set_num_threads(cfg["threads"])
    with open(cfg["ids_file"]) as f:
        batches = [padded(b) for b in json.load(f)]
    texts = sum(b[0].shape[0] for b in batches)
    # The default ("sdpa") attention, as a transformers user gets it.
    # No pooler: hone computes none (the embedding is the mean pool).
    model = BertModel.from_pretrained(cfg["model_dir"], add_pooling_layer=False).eval()
    rates = []
    with torch.inference_mode():
        first = embed(model, *batches[0])
        for _ in range(cfg["repeats"]):
            started = time.perf_counter()
            for ids, types, mask in batches:
                embed(model, ids, types, mask)
            rates.append(texts / (time.perf_counter() - started))
    # Still in eval mode: rm.train's members train without dropout inside
    # BERT; gradients flow all the same.
    train = train_rate(model, cfg)
    print(
        json.dumps(
            {
                "texts_s": statistics.median(rates),
                "train_tok_s": train,
                "first_batch": first.tolist(),
                "torch": torch.__version__,
                "transformers": transformers.__version__,
            }
        )
    )


if __name__ == "__main__":
    main()
