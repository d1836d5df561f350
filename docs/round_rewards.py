#!/usr/bin/env python3
"""Per round of an online run: the mean of each score of that round's
samples with its standard error (over prompts: a prompt's k samples are not
independent, so each prompt's mean is one observation), the KL to the
reference (mean over samples of the sum over tokens of token_logprobs -
ref_logprobs), and the length; then the last round against the first,
paired by prompt when both rounds answered the same prompts (a fixed
evaluation set), else as two independent means.

    python3 docs/round_rewards.py runs/smollm-grpo-hh

Reads the run's `samples` and `sample_scores` jsonl.write stages (one file
per round: outputs/STAGE/FILE in round 0, outputs/STAGE/round-R/FILE after).
"""
import glob, json, math, os, sys
from collections import defaultdict

run = sys.argv[1]

def rounds(stage):
    out = {}
    for path in glob.glob(f"{run}/outputs/{stage}/**/*.jsonl", recursive=True):
        parent = os.path.basename(os.path.dirname(path))
        r = int(parent.split("-")[1]) if parent.startswith("round-") else 0
        out[r] = [json.loads(l) for l in open(path)]
    return out

def mean_se(xs):
    n = len(xs)
    m = sum(xs) / n
    if n < 2:
        return m, float("nan")
    var = sum((x - m) ** 2 for x in xs) / (n - 1)
    return m, math.sqrt(var / n)

samples, scores = rounds("samples"), rounds("sample_scores")
names = sorted({s["name"] for r in scores.values() for s in r})
per_round, prompt_means = {}, {}
print(f"{'round':>5} {'prompts':>7} {'samples':>7} " + " ".join(f"{n:>20}" for n in names)
      + f" {'kl':>8} {'chars':>6} {'tokens':>6}")
for r in sorted(samples):
    if not scores.get(r):
        continue  # a round still running
    by_prompt = {n: defaultdict(list) for n in names}
    for s in scores.get(r, []):
        by_prompt[s["name"]][s["prompt_id"]].append(s["value"])
    cells, stats = [], {}
    for n in names:
        means = {p: sum(v) / len(v) for p, v in by_prompt[n].items()}
        prompt_means.setdefault(r, {})[n] = means
        m, se = mean_se(list(means.values()))
        stats[n] = (m, se)
        cells.append(f"{m:>11.4f} ± {se:.4f}")
    cs = samples[r]
    kl = [sum(a - b for a, b in zip(c["token_logprobs"], c["ref_logprobs"])) for c in cs if c["ref_logprobs"]]
    chars = sum(len(c["text"]) for c in cs) / len(cs)
    tokens = sum(len(c["token_ids"]) for c in cs) / len(cs)
    per_round[r] = stats
    prompts = len({c["prompt_id"] for c in cs})
    print(f"{r:>5} {prompts:>7} {len(cs):>7} " + " ".join(cells)
          + f" {sum(kl) / max(len(kl), 1):>8.3f} {chars:>6.0f} {tokens:>6.1f}")
first, last = min(per_round), max(per_round)
for n in names:
    a, b = prompt_means[first][n], prompt_means[last][n]
    if set(a) == set(b) and len(a) > 1:
        d, se = mean_se([b[p] - a[p] for p in a])
        how = f"paired over {len(a)} prompts"
    else:
        (m0, s0), (m1, s1) = per_round[first][n], per_round[last][n]
        d, se = m1 - m0, math.sqrt(s0 ** 2 + s1 ** 2)
        how = "independent prompts"
    print(f"{n}: round {last} - round {first} = {d:+.4f} ± {se:.4f} ({d / se:+.1f} SE, {how})")
