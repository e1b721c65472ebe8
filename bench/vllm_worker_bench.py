"""One worker's throughput over a backlog: the transformers engine against DARE inside vLLM.

    .venv-vllm/bin/python -P bench/vllm_worker_bench.py [--prompts 24] [--mode relaxed] [--max-new-tokens 96] [--batch 16]

The same set-up as `worker_bench.py` (the default workload's prompts, its pools on the pools topic,
the worker ready before the backlog is produced), one worker with the whole machine (2 threads) and
continuous batching up to `--batch`, first the transformers worker, then `--backend vllm` (compiled,
its start-up and cost probe before the backlog). Throughput: tokens of all records over the span from
the first decode start to the last record.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from contextlib import ExitStack

sys.path.insert(0, os.path.dirname(__file__))

from worker_bench import publish_pools, requests, run_workers, span

from infra.broker import EmbeddedBroker
from infra.settings import Settings


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompts", type=int, default=24)
    parser.add_argument("--mode", default="relaxed")
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args()
    backlog = requests(args.prompts, args.mode, args.max_new_tokens)
    rows = []
    with ExitStack() as stack:
        servers = os.environ.get("DARE_BOOTSTRAP_SERVERS") or stack.enter_context(EmbeddedBroker()).bootstrap_servers
        base = Settings(bootstrap_servers=servers, max_new_tokens=args.max_new_tokens)
        for backend in ("transformers", "vllm"):
            settings = base.model_copy(update={"topic_prefix": f"vw-{backend}-{int(time.time())}."})
            publish_pools(settings)
            records = run_workers(settings, 1, backlog, args.batch, ("--backend", backend), threads=2)
            tokens = sum(r.token_count for r in records)
            rows.append((backend, len(records), tokens, span(records)))
            print(f"{backend}: {len(records)} records, {tokens} tokens in {span(records):.1f} s", file=sys.stderr, flush=True)
    print(f"{args.prompts} prompts (default workload, its pools on the pools topic), mode {args.mode}, {args.max_new_tokens} "
          f"new tokens, one worker, --batch {args.batch}, 2 threads")
    print("| worker | records | tokens | span s | tokens/s | vs transformers |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    base_tps = rows[0][2] / rows[0][3]
    for backend, n, tokens, seconds in rows:
        print(f"| {backend} | {n} | {tokens} | {seconds:.1f} | {tokens / seconds:.1f} | {tokens / seconds / base_tps:.2f}x |")


if __name__ == "__main__":
    main()
