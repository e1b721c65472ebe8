"""All linear layers of the packaged model, once, at a few rows: fp32 `F.linear` (MKL) vs the packed
fp16 weights the engine uses on CPU (weights.py), and the time to read the weights once (the
memory-bandwidth floor of a one-token step). Medians of 9 passes, milliseconds.

    .venv/bin/python bench/linear_kernels.py --threads 2 > bench/results/linear_kernels.txt
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from infra.settings import default_cache_dir
from workers.engine.model import load_model
from workers.engine.weights import PackedLinear


def median_ms(run: Callable[[], object], passes: int = 9) -> float:
    run()
    times = []
    for _ in range(passes):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


@torch.inference_mode()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rows", default="1,2,4,8,16,32")
    args = parser.parse_args()
    lm = load_model(None, "cpu", "float32", default_cache_dir(), args.threads, weights="fp16")
    layers = [m for m in lm.model.modules() if isinstance(m, PackedLinear)]
    weights = [m.linear.weight for m in layers]
    megabytes = sum(w.numel() for w in weights) * 4 / 1e6
    print(f"# {lm.model_id}: {len(layers)} linear layers, {megabytes:.0f} MB of fp32 weights; {args.threads} threads, "
          f"CPU {torch.backends.cpu.get_cpu_capability()}\n")
    print(f"read every fp32 weight once (sum): {median_ms(lambda: [w.sum() for w in weights]):.1f} ms "
          "(the packed fp16 weights are half the bytes)\n")
    print("| rows | fp32 `F.linear` ms | packed fp16 ms | speedup |")
    print("| ---: | ---: | ---: | ---: |")
    for rows in (int(r) for r in args.rows.split(",")):
        inputs = {n: torch.randn(rows, n) for n in {w.shape[1] for w in weights}}
        full = median_ms(lambda x=inputs: [F.linear(x[w.shape[1]], w) for w in weights])
        packed = median_ms(lambda x=inputs: [m(x[m.linear.in_features]) for m in layers])
        print(f"| {rows} | {full:.1f} | {packed:.1f} | {full / packed:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
