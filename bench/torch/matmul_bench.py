"""PyTorch side of `hone-bench matmul`: f32 matmul GFLOP/s at the LM
benchmark's shapes and a large square one, on the CPU, `threads` threads.

Reads one JSON config (threads, repeats, shapes [[m, k, n], ...]) and prints
one JSON object: {"torch": version, "gflops": [median per shape]}.
"""

import json
import statistics
import sys
import time

import torch


def gflops(m, k, n, repeats):
    a, b = torch.randn(m, k), torch.randn(k, n)
    flop = 2.0 * m * k * n
    # Enough products per timing for about 50 ms at 50 GFLOP/s.
    iters = max(1, int(2.5e9 / flop))
    torch.matmul(a, b)
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(iters):
            torch.matmul(a, b)
        rates.append(iters * flop / (time.perf_counter() - start) / 1e9)
    return statistics.median(rates)


def main():
    cfg = json.loads(sys.argv[1])
    torch.set_num_threads(cfg["threads"])
    torch.manual_seed(0)
    out = [gflops(m, k, n, cfg["repeats"]) for m, k, n in cfg["shapes"]]
    print(json.dumps({"torch": torch.__version__, "gflops": out}))


if __name__ == "__main__":
    with torch.no_grad():
        main()
