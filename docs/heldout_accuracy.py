#!/usr/bin/env python3
"""Held-out accuracy of a run's rm.warm stage (members, ensemble, WARM) with
binomial standard errors, beside the "longer response wins" heuristic on the
same held-out pairs (the run's `heldout` jsonl.write stage):

    python3 docs/heldout_accuracy.py runs/minilm-tuned-hh
"""
import json, math, sys
run = sys.argv[1]
m = {}
for l in open(f"{run}/metrics.jsonl"):
    v = json.loads(l)
    if v["stage"] == "warm":
        m[v["name"]] = v["value"]
pairs = [json.loads(l) for l in open(f"{run}/outputs/heldout/heldout.jsonl")]
n = len(pairs)
def se(p): return math.sqrt(p * (1 - p) / n)
longer = sum(1.0 if len(p["chosen"]) > len(p["rejected"]) else 0.5 if len(p["chosen"]) == len(p["rejected"]) else 0.0 for p in pairs) / n
print(f"held-out pairs: {n}")
print(f"longer response wins: {longer:.3f} ± {se(longer):.3f}")
for k in sorted(m):
    if k.startswith("accuracy"):
        p = m[k]; z = (p - 0.5) / se(0.5)
        print(f"{k}: {p:.3f} ± {se(p):.3f}  ({z:+.1f} SE from chance; {(p - longer) / se(p):+.1f} SE from longer-wins)")
