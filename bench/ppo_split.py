#!/usr/bin/env python3
"""Where a PPO round's time goes, from a run directory of a one-loop PPO
pipeline (pipelines/four-step.toml): the median over rounds 1.. of each
phase, in seconds. Rollout, reference log-probs and scoring come from the
time each stage logged its last metric of the round, counted from the end of
the previous round (the stages of one loop run one after the other); the
critic's values, the exact KL and the update from lm.ppo's own *_seconds
metrics.

    python3 bench/ppo_split.py runs/four-step warm
"""
import json, sys, statistics as st, collections
run_dir=sys.argv[1]; loop=sys.argv[2]  # e.g. warm
ms=[json.loads(l) for l in open(f'{run_dir}/metrics.jsonl')]
j=[json.loads(l)['time'] for l in open(f'{run_dir}/journal.jsonl')]
end={}
vals=collections.defaultdict(dict)
for m in ms:
    k=(m['stage'],m['round'])
    end[k]=max(end.get(k,0),m['time'])
    if m['name'].endswith('_seconds'): vals[m['round']][m['name']]=m['value']
rows=[]
for r in range(1,len(j)):
    t0=j[r-1]
    def e(s): return end[(s,r)]-t0
    ro=e(f'rollout_{loop}'); rf=e(f'ref_{loop}'); px=e(f'proxy_{loop}') if (f'proxy_{loop}',r) in end else rf
    v=vals[r]
    rows.append((ro, rf-ro, max(px,e(f'gold_{loop}'))-rf, v.get('values_seconds',0), v.get('exact_kl_seconds',0), v.get('update_seconds',0), j[r]-t0))
names=['rollout','reference log-probs','scoring (RM + gold)','critic values','exact KL','PPO update','round']
for i,n in enumerate(names):
    xs=[row[i] for row in rows]; print(f'| {n} | {st.median(xs):.2f} |')
