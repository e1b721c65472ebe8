"""Where a load point's decode time goes, from `dare load-bench --trace` (one line per prompt): per (method, load,
round), the mean prompt's decode split into its own prefill, standing still while other prompts were prefilled,
its steps' forwards and the rest (retrieval, acceptance, the worker's loop), and the slowest prompts alike.

    .venv/bin/dare load-bench --methods dare-ar,dare-relaxed --load 0.5 --trace trace.jsonl
    .venv/bin/python -P bench/load_trace.py trace.jsonl --slowest 3
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path


def split(prompts: list[dict]) -> dict[str, float]:
    """Shares of the prompts' summed decode time."""
    decode = sum(p["decode_s"] for p in prompts) or 1e-9
    own = sum(p["prefill_s"] for p in prompts)
    stalled = sum(p["stalled_s"] for p in prompts)
    steps = sum(p["forward_s"] - p["prefill_s"] for p in prompts)
    return {"own prefill": own / decode, "others' prefills": stalled / decode, "steps": steps / decode,
            "rest": 1 - (own + stalled + steps) / decode}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("trace", type=Path)
    parser.add_argument("--slowest", type=int, default=3, help="list this many of each point's slowest prompts")
    args = parser.parse_args()
    points: dict[tuple, list[dict]] = defaultdict(list)
    for line in args.trace.read_text().splitlines():
        entry = json.loads(line)
        if entry["answered"] and not entry["warmup"]:
            points[(entry["method"], entry["load_fraction"] or entry["offered_prompts_per_s"], entry["round"])].append(entry)
    print("| method | load | round | prompts | decode mean s | own prefill | others' prefills | steps | rest |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for (method, load, round_), prompts in points.items():
        shares = split(prompts)
        print(f"| {method} | {'backlog' if load is None else load} | {round_} | {len(prompts)} "
              f"| {sum(p['decode_s'] for p in prompts) / len(prompts):.2f} | "
              + " | ".join(f"{shares[k]:.2f}" for k in ("own prefill", "others' prefills", "steps", "rest")) + " |")
    print("\nslowest prompts (seconds):")
    print("| method | load | round | latency | decode | own prefill | others' prefills | steps | steps taken | tokens/step |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for (method, load, round_), prompts in points.items():
        for p in sorted(prompts, key=lambda p: -p["latency_s"])[: args.slowest]:
            print(f"| {method} | {'backlog' if load is None else load} | {round_} | {p['latency_s']:.2f} | {p['decode_s']:.2f} "
                  f"| {p['prefill_s']:.2f} | {p['stalled_s']:.2f} | {p['forward_s'] - p['prefill_s']:.2f} | {p['steps']} "
                  f"| {p['mean_accepted']:.2f} |")


if __name__ == "__main__":
    main()
