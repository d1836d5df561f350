"""PyTorch/transformers reference for `hone-bench minilm`: all-MiniLM-L6-v2's
BertModel over the token ids hone tokenized (the file `ids_file`: batches of
[ids, segment ids] per text, sorted by length), padded per batch, the
attention-masked mean of the last hidden states, no gradients. Prints one
JSON object: texts/s (median of `repeats`) and the first batch's embeddings,
which hone compares with its own.
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


def main():
    cfg = json.loads(sys.argv[1])
    torch.set_num_threads(cfg["threads"])
    with open(cfg["ids_file"]) as f:
        batches = [padded(b) for b in json.load(f)]
    texts = sum(b[0].shape[0] for b in batches)
    # The default ("sdpa") attention, as a transformers user gets it.
    model = BertModel.from_pretrained(cfg["model_dir"]).eval()
    rates = []
    with torch.inference_mode():
        first = embed(model, *batches[0])
        for _ in range(cfg["repeats"]):
            started = time.perf_counter()
            for ids, types, mask in batches:
                embed(model, ids, types, mask)
            rates.append(texts / (time.perf_counter() - started))
    print(
        json.dumps(
            {
                "texts_s": statistics.median(rates),
                "first_batch": first.tolist(),
                "torch": torch.__version__,
                "transformers": transformers.__version__,
            }
        )
    )


if __name__ == "__main__":
    main()
