#!/usr/bin/env bash
# The GPU check, run on a lent GPU machine through the device tool (see ../shared/GPU.md):
# call 1 carries .gpu/a (first half of the GGUF) into .gpu/m; call 2 carries .gpu/b (second
# half, wheels, prompts rendered here) and runs this script. Results land in $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/dare-gpu-out}
mkdir -p "$OUT" .gpu/m
export PYTHONPATH=$PWD HF_HUB_OFFLINE=1 DARE_CACHE_DIR=$PWD/.gpu/cache
{ nvidia-smi --query-gpu=name,memory.total --format=csv; python -c "import torch, transformers; print(torch.__version__, transformers.__version__)"; } > "$OUT/env.txt" 2>&1
for w in .gpu/b/wheels/*.whl; do  # install only what the machine lacks
  mod=$(basename "$w" | cut -d- -f1 | tr '[:upper:]' '[:lower:]' | sed 's/python_dotenv/dotenv/')
  python -c "import $mod" 2>/dev/null || python -m pip install -q --no-deps --no-index "$w" >> "$OUT/env.txt" 2>&1
done
cat .gpu/m/part.aa .gpu/b/part.ab > .gpu/m/model.gguf
python -c "from pathlib import Path; from workers.engine.runtime.model import convert_gguf; convert_gguf(Path('.gpu/m/model.gguf'), Path('.gpu/m/hf'))" > "$OUT/convert.txt" 2>&1
# bf16 (the production setting), every method; then float32, where strict must equal greedy token for token.
timeout "${BENCH_TIMEOUT:-300}" python -m dare.cli bench --model .gpu/m/hf --device cuda --dtype bfloat16 \
  --prompts .gpu/b/prompts.jsonl --max-new-tokens 128 --limit "${LIMIT:-8}" --json "$OUT/bench_gpu.json" > "$OUT/bench_gpu.txt" 2>&1
timeout "${BENCH_TIMEOUT:-300}" python -m dare.cli bench --model .gpu/m/hf --device cuda --dtype float32 --methods hf-generate,rest,dare-ar,dare-strict,dare-relaxed \
  --prompts .gpu/b/prompts.jsonl --max-new-tokens 128 --limit "${LIMIT:-8}" --json "$OUT/bench_gpu_fp32.json" > "$OUT/bench_gpu_fp32.txt" 2>&1
timeout 120 python bench/cost_curve.py --shape llama-7b --device cuda --dtype bfloat16 > "$OUT/cost_7b.json" 2> "$OUT/cost_7b.err"
tail -12 "$OUT/bench_gpu.txt"; tail -7 "$OUT/bench_gpu_fp32.txt"; cat "$OUT/cost_7b.json"
