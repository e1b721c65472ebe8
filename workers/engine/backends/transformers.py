"""The transformers backend: this project's own engine over a model loaded by runtime/.

DARE decoding: draft from pools, verify the tree in one forward, accept, repeat.

    prefill(prompt[:-1]); pending = prompt[-1]
    loop: tree = drafter.get_candidates(context)      # retrieval
          n = allocate(tree.scores, cost curve)       # cost model x expected acceptance
          logits = forward([pending, *tree[:n]])      # verify
          path, bonus = accept(logits, tree, rule)    # strict or relaxed
          keep the path's keys/values; emit path tokens + bonus; pending = bonus

One request alone is a batch of one: `TransformersEngine.generate` runs the same `BatchDecoder` (batch.py)
that the workers run at any batch size, so there is one cache design and one forward to make fast.
"""

from __future__ import annotations

import time
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from workers.engine.algorithm.budget import Budget
from workers.engine.algorithm.cost import CostModel, cached_cost
from workers.engine.algorithm.draft import Source
from workers.engine.algorithm.modes import Strategy
from workers.engine.algorithm.texts import PoolTexts, template_parts
from workers.engine.algorithm.trie import Pool
from workers.engine.backends.batch import BatchDecoder, Finished, RequestStats
from workers.engine.runtime import kernels
from workers.engine.runtime.cache import SlotCache
from workers.engine.runtime.forward import causal_mask
from workers.engine.runtime.model import LoadedModel
from workers.engine.runtime.steps import StepForward

PROBE_SIZES = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64)


@dataclass
class Output:
    token_ids: list[int]
    text: str
    stats: RequestStats


class TransformersEngine:
    """One loaded model with its cost curve and decoding strategy. `decoder(rows)` decodes up to `rows`
    requests at once; `generate` decodes one request alone against the pools it is given."""

    name = "transformers"

    def __init__(self, lm: LoadedModel, cost: CostModel, strategy: Strategy | None = None,
                 eos_token_ids: set[int] | None = None) -> None:
        self.lm = lm
        self.model = lm.model
        self.steps = lm.steps  # shared by every decoder made here: compiled graphs are reused
        self.tokenizer = lm.tokenizer
        self.cost = cost
        self.strategy = strategy or Strategy()
        if eos_token_ids is None:
            eos = self.model.generation_config.eos_token_id  # type: ignore[union-attr]
            eos_token_ids = set(eos if isinstance(eos, list) else [eos])
        self.eos_token_ids = eos_token_ids
        self.context_limit = int(getattr(self.model.config, "max_position_embeddings", 8192))
        self.prompt_prefix, _ = template_parts(self.tokenizer)  # every chat prompt starts with prompt_prefix
        self.texts = PoolTexts(self.tokenizer, self.strategy.draft)
        self._single: TransformersDecoder | None = None

    def mode_for(self, mode: str) -> str:
        """Every mode runs as asked."""
        return self.strategy.check(mode)

    def learn_from(self, texts: Sequence[str]) -> None:
        """Nothing to seed: drafts come from the pools the caller passes with each request."""

    def pool(self, texts: Sequence[str], max_nodes: int = 400_000) -> Pool:
        return self.texts.pool(texts, max_nodes)

    def add_text(self, pool: Pool, text_id: str, text: str) -> None:
        self.texts.add_text(pool, text_id, text)

    def request(self, input_ids: Sequence[int], sources: Sequence[Source], mode: str, use_self: bool = True):  # type: ignore[no-untyped-def]
        """What one request decodes with (alone or in a batch): its drafter, budget and acceptance rule
        (algorithm/modes.py); `use_self`: whether its own prompt and output draft too."""
        drafter = self.strategy.drafter(mode, sources, input_ids if use_self else None)
        return drafter, Budget(self.cost, max_tokens=self.strategy.draft.max_nodes), self.strategy.rule(mode)

    def decoder(self, rows: int = 1) -> TransformersDecoder:
        """A decoder over this model with room for `rows` requests at once."""
        return TransformersDecoder(self, rows)

    def generate(self, input_ids: Sequence[int], sources: Sequence[Source], mode: str, max_new_tokens: int,
                 use_self: bool = True) -> Output:
        """Decode one request alone (a batch of one; its cache and the prompt head's keys are kept for the next)."""
        if self._single is None:
            self._single = self.decoder(rows=1)
        self._single.add(None, input_ids, max_new_tokens, mode, sources, use_self)
        finished: list[Finished] = []
        while not finished:
            finished = self._single.step()
        out = finished[0]
        return Output(out.token_ids, self.tokenizer.decode(out.token_ids, skip_special_tokens=True), out.stats)  # type: ignore[attr-defined]


class TransformersDecoder:
    """The engine's `BatchDecoder` behind the decoder interface every backend offers: add / step / len."""

    def __init__(self, engine: TransformersEngine, rows: int) -> None:
        self.engine = engine
        self.batch = BatchDecoder(engine.model, engine.eos_token_ids, rows=rows, prefix=engine.prompt_prefix, steps=engine.steps,
                                  prefill_per_step=engine.strategy.prefill_per_step)

    def __len__(self) -> int:
        return len(self.batch)

    def add(self, key: Hashable, input_ids: Sequence[int], max_new_tokens: int, mode: str = "ar",
            sources: Sequence[Source] = (), use_self: bool = True) -> None:
        """Queue a request under the caller's `key`; strict/relaxed draft from `sources` (live pools) and, with
        `use_self`, the request's own text."""
        self.batch.add(key, input_ids, *self.engine.request(input_ids, sources, mode, use_self), max_new_tokens)

    def step(self) -> list[Finished]:
        return self.batch.step()


@torch.inference_mode()
def measure_cost(steps: StepForward, device: torch.device, context: int = 300, repeats: int = 5,
                 sizes: tuple[int, ...] = PROBE_SIZES) -> CostModel:
    """Fastest of `repeats` timings of a decoding step of each draft size after a `context`-token prefill,
    through the steps' own forward (compiled steps: at their padded width, reading the whole cache). The
    fastest, not the median: another process on the cores only ever adds time, and a curve measured so is
    cached for every later run."""
    model = steps.model
    vocab, dtype = model.config.vocab_size, next(model.parameters()).dtype
    generator = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, vocab, (1, context), generator=generator).to(device)
    cache = SlotCache(model)
    cache.reserve(1, context + steps.width(max(sizes) + 1))
    cache.prepare(0, torch.arange(context)[None], context)
    steps.forward(cache, prompt, torch.arange(context, device=device)[None], causal_mask(context, 0, dtype).to(device))
    seconds = {}
    for n in sizes:
        width = steps.width(n)
        span = steps.span(cache, context + width)
        samples = []
        for _ in range(repeats + 1):  # the first run warms up (and compiles)
            ids = torch.randint(0, vocab, (1, width), generator=generator).to(device)
            positions = torch.arange(context, context + width)[None]
            cache.prepare(0, positions, span)  # written over the same columns every time
            positions, mask = positions.to(device), causal_mask(width, context, dtype, span).to(device)
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            steps(cache, ids, positions, mask)
            if device.type == "cuda":
                torch.cuda.synchronize()
            samples.append(time.perf_counter() - start)
        seconds[n] = min(samples[1:])
    return CostModel(seconds, str(device))


def load_or_measure(lm: LoadedModel, cache_dir: Path | None) -> CostModel:
    """The cost curve of this model's decoding steps on this device, measured once and cached as JSON
    (by model, device, CPU capability, dtype, packed weights, forward, threads, whether steps are compiled, and
    the version of the engine's C++ kernels where the forward runs them)."""
    capability = torch.backends.cpu.get_cpu_capability() if lm.device.type == "cpu" else torch.cuda.get_device_name(lm.device)
    compiled = "-compiled" if lm.steps.compiled else f"-{lm.forward}"
    packed = "" if lm.weights == "full" else f"-{lm.weights}w"
    built = f"-k{kernels.digest()[:8]}" if "glue" in lm.forward else ""  # the engine's own kernels, as built now
    key = f"{lm.model_id}-{lm.device.type}-{capability}-{lm.dtype}{packed}-{torch.get_num_threads()}t{compiled}{built}".replace("/", "_").replace(" ", "_")
    return cached_cost(cache_dir / "cost" / f"{key}.json" if cache_dir else None, lambda: measure_cost(lm.steps, lm.device))
