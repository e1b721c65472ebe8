"""Verify-cost curve (forward time vs number of tokens) of a randomly initialised model of a
given shape, e.g. a 7B Llama on a GPU: no weights needed, only the shape matters for time.

    python bench/cost_curve.py --shape llama-7b --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import json

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from workers.engine.backends.transformers import measure_cost

SHAPES = {
    "llama-7b": {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
                 "num_key_value_heads": 32, "vocab_size": 32000},
    "smollm2-135m": {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
                     "num_key_value_heads": 3, "vocab_size": 49152},
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama-7b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--context", type=int, default=300)
    args = parser.parse_args()
    device = torch.device(args.device)
    config = LlamaConfig(**SHAPES[args.shape], max_position_embeddings=4096)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(getattr(torch, args.dtype)).eval()
    cost = measure_cost(model, device, context=args.context)
    base = cost.seconds[1]
    print(json.dumps({"shape": args.shape, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                      "dtype": args.dtype, "ms": {n: round(s * 1000, 2) for n, s in cost.seconds.items()},
                      "relative_to_1": {n: round(s / base, 2) for n, s in cost.seconds.items()}}))


if __name__ == "__main__":
    main()
