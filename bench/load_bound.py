"""What an ideal server would make of a load point's arrivals: the latency percentiles of a server that runs at a
fixed rate (tokens/s, prefill included) whatever the number of rows, every prompt the same work, sharing its rate
equally among at most `rows` prompts admitted first come, first served. Set the rate to a method's saturation
throughput and it shows what that method would reach on those arrivals if it kept that throughput at any number of
rows (one at a time, first come first served, is the order that makes the longest wait shortest): a real engine
runs slower at few rows, and its prompts' work varies (long prompts' prefill, rows that draft poorly).

    .venv/bin/python -P bench/load_bound.py --rate 0.798 --tokens-per-s 155,124 --rows 1,16

The arrivals are `dare load-bench`'s own (`dare.benchmarks.load.arrivals`: seed + 1000 x round + the rate's index,
60 prompts a point, the first tenth left out of the percentiles), so the figures compare with its points.
"""

from __future__ import annotations

import argparse

from dare.benchmarks.load import WARMUP_SHARE, arrivals, percentile


def serve(times: list[float], work_s: float, rows: int) -> list[float]:
    """Each prompt's latency: prompts taken in order of arrival, at most `rows` at once, each of them served at
    1 / (prompts being served) of the server's rate; a prompt alone needs `work_s`."""
    latency, waiting, active, now = [0.0] * len(times), list(range(len(times))), {}, 0.0
    while waiting or active:
        while waiting and len(active) < rows and times[waiting[0]] <= now:
            active[waiting.pop(0)] = work_s
        if not active:
            now = times[waiting[0]]
            continue
        finish = min(active.values()) * len(active)  # seconds until the first of them is done
        arrive = times[waiting[0]] - now if waiting and len(active) < rows else float("inf")
        step = min(finish, arrive)
        share = step / len(active)
        for i in active:
            active[i] -= share
        now += step
        for i in [i for i, left in active.items() if left <= 1e-12]:
            latency[i] = now - times[i]
            del active[i]
    return latency


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, required=True, help="offered prompts/s (a load-bench point's)")
    parser.add_argument("--index", type=int, default=0, help="the rate's place among the load-bench run's rates")
    parser.add_argument("--tokens-per-s", default="155", help="the server's rates, comma-separated")
    parser.add_argument("--rows", default="1,16", help="most prompts served at once, comma-separated")
    parser.add_argument("--tokens", type=int, default=96, help="new tokens a prompt")
    parser.add_argument("--prompts", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print("| tokens/s | rows | p50 s (rounds) | p99 s (rounds) | p99 median |\n| ---: | ---: | --- | --- | ---: |")
    for rate in [float(r) for r in args.tokens_per_s.split(",")]:
        for rows in [int(r) for r in args.rows.split(",")]:
            p50, p99 = [], []
            for round_ in range(args.rounds):
                times = arrivals(args.prompts, args.rate, args.seed + round_ * 1000 + args.index)
                steady = serve(times, args.tokens / rate, rows)[int(args.prompts * WARMUP_SHARE) :]
                p50.append(percentile(steady, 50))
                p99.append(percentile(steady, 99))
            print(f"| {rate:g} | {rows} | {' / '.join(f'{x:.2f}' for x in p50)} | {' / '.join(f'{x:.2f}' for x in p99)} "
                  f"| {sorted(p99)[len(p99) // 2]:.2f} |")


if __name__ == "__main__":
    main()
