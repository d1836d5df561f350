"""PyTorch reference for hone's learner benchmark: a DPO step (the reference's
log-probs cached, and recomputed every step as TRL's DPOTrainer does by
default), a PPO step and a reward-model step on the LM benchmark's GPT
(gpt_bench.Gpt), with the same losses, shapes and optimizers as
bench/src/learners.rs. Prints one JSON object: tokens/s of each step,
medians of REPEATS.
"""

import copy
import json
import statistics
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from gpt_bench import Gpt


def hidden(gpt, ids):
    """The trunk's final hidden states (after the last layer norm)."""
    t = ids.shape[1]
    x = gpt.tok(ids) + gpt.pos(torch.arange(t))
    for block in gpt.blocks:
        x = block(x)
    return gpt.ln(x)


class RewardModel(nn.Module):
    """The GPT trunk and a scalar head on the last token, as hone's RewardModel."""

    def __init__(self, *shape):
        super().__init__()
        self.trunk = Gpt(*shape)
        self.head = nn.Linear(shape[1], 1)

    def forward(self, ids):
        return self.head(hidden(self.trunk, ids)[:, -1]).squeeze(-1)


class Critic(nn.Module):
    """A separate critic of the policy's shape: the GPT trunk and a value head."""

    def __init__(self, *shape):
        super().__init__()
        self.trunk = Gpt(*shape)
        self.value = nn.Linear(shape[1], 1)

    def forward(self, ids):
        return self.value(hidden(self.trunk, ids)).squeeze(-1)


def token_logprobs(logits, targets):
    return torch.log_softmax(logits, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def main():
    cfg = json.loads(sys.argv[1])
    torch.manual_seed(0)
    torch.set_num_threads(cfg["threads"])
    shape = (cfg["vocab"], cfg["d_model"], cfg["n_layers"], cfg["n_heads"], cfg["context"])
    n, ctx, resp = cfg["sequences"], cfg["context"], cfg["response"]
    steps, repeats = cfg["steps"], cfg["repeats"]
    ids = torch.randint(0, cfg["vocab"], (n, ctx + 1))
    x, y = ids[:, :-1], ids[:, 1:]
    mask = torch.zeros(n, ctx)
    mask[:, ctx - resp:] = 1.0

    def rate(step, tokens=n * ctx):
        step()
        out = []
        for _ in range(repeats):
            start = time.perf_counter()
            for _ in range(steps):
                step()
            out.append(steps * tokens / (time.perf_counter() - start))
        return statistics.median(out)

    policy = Gpt(*shape)
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-5, weight_decay=0.0)
    pairs = n // 2
    with torch.no_grad():
        cached = (token_logprobs(policy(x), y) * mask).sum(1)

    def dpo():
        lp = (token_logprobs(policy(x), y) * mask).sum(1)
        chosen = 0.1 * (lp[:pairs] - cached[:pairs])
        rejected = 0.1 * (lp[pairs:] - cached[pairs:])
        loss = -F.logsigmoid(chosen - rejected).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        loss.item()

    dpo_rate = rate(dpo)

    reference = copy.deepcopy(policy).requires_grad_(False)

    def dpo_recompute():
        with torch.no_grad():
            ref = (token_logprobs(reference(x), y) * mask).sum(1)
        lp = (token_logprobs(policy(x), y) * mask).sum(1)
        chosen = 0.1 * (lp[:pairs] - ref[:pairs])
        rejected = 0.1 * (lp[pairs:] - ref[pairs:])
        loss = -F.logsigmoid(chosen - rejected).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        loss.item()

    dpo_recompute_rate = rate(dpo_recompute)

    rm_shape = shape[:4] + (cfg["rm_context"],)
    rm = RewardModel(*rm_shape)
    rm_opt = torch.optim.AdamW(rm.parameters(), lr=1e-5, weight_decay=0.0)
    rm_pairs = cfg["rm_pairs"]
    rm_ids = torch.randint(0, cfg["vocab"], (2 * rm_pairs, cfg["rm_context"]))

    def reward_model():
        r = rm(rm_ids)
        loss = -F.logsigmoid(r[:rm_pairs] - r[rm_pairs:]).mean()
        rm_opt.zero_grad()
        loss.backward()
        rm_opt.step()
        loss.item()

    rm_rate = rate(reward_model, 2 * rm_pairs * cfg["rm_context"])

    policy = Gpt(*shape)
    critic = Critic(*shape)
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-5, weight_decay=0.0)
    critic_opt = torch.optim.AdamW(critic.parameters(), lr=1e-5, weight_decay=0.0)
    with torch.no_grad():
        old = token_logprobs(policy(x), y)
        old_values = critic(x)
    advantages = torch.randn(n, ctx)
    returns = old_values + 0.5 * torch.randn(n, ctx)
    tokens = n * resp

    def ppo():
        logp = token_logprobs(policy(x), y)
        ratio = torch.exp(logp - old)
        surrogate = -torch.min(ratio * advantages, ratio.clamp(0.8, 1.2) * advantages)
        policy_loss = (surrogate * mask).sum() / tokens
        values = critic(x)
        clipped = old_values + (values - old_values).clamp(-0.2, 0.2)
        value_loss = 0.5 * torch.max((values - returns) ** 2, (clipped - returns) ** 2)
        loss = policy_loss + 0.1 * (value_loss * mask).sum() / tokens
        opt.zero_grad()
        critic_opt.zero_grad()
        loss.backward()
        opt.step()
        critic_opt.step()
        loss.item()

    ppo_rate = rate(ppo)
    print(
        json.dumps(
            {
                "dpo_tok_s": dpo_rate,
                "dpo_recompute_tok_s": dpo_recompute_rate,
                "ppo_tok_s": ppo_rate,
                "rm_tok_s": rm_rate,
                "torch": torch.__version__,
            }
        )
    )


if __name__ == "__main__":
    main()
