"""`dare load-bench`: latency against offered load, through the real pipeline (open-loop arrivals).

    worker process(es) started once ──► for each method: the whole backlog at once (saturation), then
    Poisson arrivals at each rate ──► prompts topic ──► worker ──► knowledge topic ──► this reader

A point is one (method, rate): `--prompts-per-point` prompts of the workload (repeated, shuffled with
the seed, each with a fresh request id and the method's mode) produced at seeded Poisson arrival times,
every knowledge record read back as a downstream consumer would. Latency is the time from a prompt's
production to its record's arrival here; `decode` is the worker's own clock for the prompt (joining the
decoder to the last token, prefill included), `queue` the rest (waiting in the topic and for a row,
plus the two hops through the broker); of the decode, `prefill_share` went to prefills (the prompt's own and
the others' it stood still for, counted by the worker). The first tenth of a point's arrivals is warm-up: it
fills the system and is left out of the percentiles. `trace` receives every prompt's figures (`point_trace`).
Rates are given in prompts/s, or as fractions of the saturation rate of the first method (`dare-ar`:
the engine's greedy decoding), measured first in the same run.

The worker does not add its own outputs to its pools (`--no-learn`): prompts repeat, and a repeated
prompt must not draft its own earlier answer. Pools come from the workload's pool file, published to
the pools topic as the pool builder would.
"""

from __future__ import annotations

import json
import os
import random
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from dare.benchmarks.workload import BenchPrompt
from dare.pipeline import Pipeline, PipelineError
from infra.broker import free_port
from infra.kafka import make_producer
from schemas import PoolText, PoolUpdate, PromptRequest, encode

# bench name → (the worker that serves it: engine and method, the wire's mode of its requests)
METHODS = {
    "dare-ar": ("transformers", "ar"),  # this project's engine (`ar`: its own greedy decoding)
    "dare-strict": ("transformers", "strict"),
    "dare-relaxed": ("transformers", "relaxed"),
    "vllm-greedy": ("vllm:greedy", "ar"),  # vLLM's own methods: what a user would run instead
    "vllm-ngram": ("vllm:ngram", "ar"),
    "vllm-suffix": ("vllm:suffix", "ar"),
    "vllm-dare-strict": ("vllm:dare", "strict"),  # DARE inside vLLM
    "vllm-dare-relaxed": ("vllm:dare", "relaxed"),
}
DEFAULT_METHODS = "dare-ar,dare-strict,dare-relaxed"
DEFAULT_LOAD = (0.5, 0.8, 1.2)
LATENCY_OBJECTIVE_S = 60.0  # the highest rate served with p99 within this is reported per method
WARMUP_SHARE = 0.1


class LoadBenchError(PipelineError):
    """The load bench cannot go on (a worker died, a point did not finish in time)."""


def parse_methods(text: str) -> list[str]:
    methods = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise LoadBenchError(f"unknown method {unknown[0] if unknown else text!r}: choose from {', '.join(METHODS)}")
    return methods


def arrivals(n: int, rate: float | None, seed: int) -> list[float]:
    """Seconds after the point's start at which each of `n` prompts is produced: a Poisson process of
    `rate` prompts/s conditioned on its (n+1)-th arrival falling at exactly (n+1)/rate (exponential gaps,
    scaled to that sum; the first at 0), or all at once when `rate` is None (a backlog). Conditioning keeps
    the offered rate of a short point at `rate` (60 free gaps spread their span by ±13 %), and the draw
    depends on `seed` alone: the same seed at another rate gives the same arrivals, rescaled."""
    if rate is None:
        return [0.0] * n
    if rate <= 0:
        raise ValueError(f"rate must be positive, got {rate}")
    rng = random.Random(seed)
    gaps = [rng.expovariate(1.0) for _ in range(n)]
    scale = n / rate / sum(gaps) if gaps else 0.0
    times, t = [], 0.0
    for gap in gaps:
        times.append(t)
        t += gap * scale
    return times


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100), linear between ranks; 0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def requests_for(prompts: list[BenchPrompt], n: int, mode: str, max_new: int, tag: str, seed: int) -> list[PromptRequest]:
    """`n` requests cycling through `prompts` in a seeded order, with fresh ids `tag-i`."""
    order = list(range(len(prompts)))
    rng = random.Random(seed)
    out = []
    for i in range(n):
        if i % len(order) == 0:
            rng.shuffle(order)
        p = prompts[order[i % len(order)]]
        kind, _, entity = p.id.partition("-")
        if kind not in ("user", "item") or not entity:
            kind, entity = "item", p.id
        out.append(PromptRequest(request_id=f"{tag}-{i}", entity_kind=kind, entity_id=entity, segment=p.segment,  # type: ignore[arg-type]
                                 prompt=p.prompt, mode=mode, max_new_tokens=max_new))  # type: ignore[arg-type]
    return out


def publish_pools(run: Pipeline, pool: dict[str, list[str]]) -> None:
    """Each segment's texts as one pool snapshot on the pools topic, as the pool builder would send them."""
    producer = make_producer(run.settings, "bench")
    for segment, texts in pool.items():
        added = [PoolText(text_id=f"{segment}-{i}", text=t) for i, t in enumerate(texts)]
        for start in range(0, len(added), 200):  # chunks far below Kafka's message limit
            chunk = added[start : start + 200]
            producer.send(run.topics.pools, key=segment.encode(), value=encode(PoolUpdate(
                segment=segment, version=1, kind="snapshot", added=chunk, chunk=start // 200,
                chunks=(len(added) + 199) // 200)))
    producer.flush()
    producer.close()


def scrape(port: int) -> dict[str, float]:
    """The worker's Prometheus metrics (name → value, unlabelled series only); {} if unreachable."""
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read().decode()
    except OSError:
        return {}
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#") and "{" not in line:
            name, _, value = line.partition(" ")
            try:
                out[name] = float(value)
            except ValueError:
                pass
    return out


@dataclass
class Sent:
    request: PromptRequest
    at: float  # wall clock when produced
    late_s: float  # how long after its scheduled time


@dataclass
class Producer:
    """Produces requests at their scheduled times from a thread; `sent` records when each went out."""

    run: Pipeline
    requests: list[PromptRequest]
    schedule: list[float]
    sent: list[Sent] = field(default_factory=list)
    error: BaseException | None = None

    def start(self) -> threading.Thread:
        thread = threading.Thread(target=self._run, daemon=True)
        thread.start()
        return thread

    def _run(self) -> None:
        try:
            producer = make_producer(self.run.settings, "load-bench", linger_ms=0)
            start = time.monotonic()
            for request, due in zip(self.requests, self.schedule):
                delay = start + due - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                now, late = time.time(), time.monotonic() - start - due
                request = request.model_copy(update={"created_at": now})
                producer.send(self.run.topics.prompts, key=request.entity_id.encode(), value=encode(request))
                self.sent.append(Sent(request, now, late))
            producer.flush()
            producer.close()
        except BaseException as exc:  # noqa: BLE001 (reported by the main thread)
            self.error = exc


def run_point(run: Pipeline, method: str, requests: list[PromptRequest], schedule: list[float], metrics_port: int | None,
              timeout_s: float, show: Callable[[str], None]) -> dict:
    """Produce `requests` at `schedule` and wait for every answer; the point's figures."""
    ids = {r.request_id for r in requests}
    before = scrape(metrics_port) if metrics_port else {}
    producer = Producer(run, requests, schedule)
    thread = producer.start()
    arrived: dict[str, tuple[float, object]] = {}
    duplicates = 0
    deadline = time.monotonic() + schedule[-1] + timeout_s
    seen = len(run.results.knowledge)
    while time.monotonic() < deadline and (thread.is_alive() or len(arrived) < len(ids)):
        run.processes.check()
        if producer.error:
            raise LoadBenchError(f"producing prompts failed: {producer.error!r}")
        run.read_downstream(timeout_ms=50)
        now = time.time()
        for record in run.results.knowledge[seen:]:
            if record.request_id in ids:
                if record.request_id in arrived:
                    duplicates += 1
                else:
                    arrived[record.request_id] = (now, record)
        seen = len(run.results.knowledge)
        show(f"{method}: {len(producer.sent)}/{len(ids)} produced, {len(arrived)} answered")
    thread.join(5)
    after = scrape(metrics_port) if metrics_port else {}
    return point_figures(method, producer.sent, arrived, duplicates, before, after) | {
        "trace": point_trace(producer.sent, arrived)}


def in_order(sent: list[Sent]) -> tuple[float, int, list[Sent]]:
    """A point's prompts in order of production: when the first went out, how many of the first are its
    warm-up (left out of the percentiles), and the prompts."""
    return min((s.at for s in sent), default=0.0), int(len(sent) * WARMUP_SHARE), sorted(sent, key=lambda s: s.at)


def point_trace(sent: list[Sent], arrived: dict[str, tuple[float, object]]) -> list[dict]:
    """Each prompt of a point, in order of production: when it went out (s after the point's first), its
    prompt's length, and, if answered, its latency and the worker's figures for it."""
    start, skip, ordered = in_order(sent)
    out = []
    for i, s in enumerate(ordered):
        entry = {"request_id": s.request.request_id, "sent_s": s.at - start, "warmup": i < skip,
                 "prompt_chars": len(s.request.prompt), "answered": s.request.request_id in arrived}
        if entry["answered"]:
            at, record = arrived[s.request.request_id]
            stats = record.stats  # type: ignore[attr-defined]
            entry |= {"latency_s": at - s.at, "decode_s": stats.wall_s, "queue_s": at - s.at - stats.wall_s,
                      "prefill_s": stats.prefill_s, "stalled_s": stats.stalled_s, "forward_s": stats.forward_s,
                      "retrieval_s": stats.retrieval_s, "steps": stats.steps, "new_tokens": stats.new_tokens,
                      "mean_accepted": stats.mean_accepted}
        out.append(entry)
    return out


def point_figures(method: str, sent: list[Sent], arrived: dict[str, tuple[float, object]], duplicates: int,
                  before: dict[str, float], after: dict[str, float]) -> dict:
    """Latency percentiles (warm-up arrivals left out), throughput and the worker's step figures of one point."""
    start, skip, ordered = in_order(sent)
    end = max((t for t, _ in arrived.values()), default=start)
    window = max(end - start, 1e-9)
    steady = [s for s in ordered[skip:] if s.request.request_id in arrived]
    latency = [arrived[s.request.request_id][0] - s.at for s in steady]
    stats = [arrived[s.request.request_id][1].stats for s in steady]  # type: ignore[attr-defined]
    decode = [st.wall_s for st in stats]
    prefills = [st.prefill_s + st.stalled_s for st in stats]  # its own, and the others' it stood still for
    queue = [lat - dec for lat, dec in zip(latency, decode)]
    records = [r for _, r in arrived.values()]
    tokens = sum(r.token_count for r in records)  # type: ignore[attr-defined]
    steps = sum(r.stats.steps for r in records)  # type: ignore[attr-defined]
    d_steps = after.get("dare_worker_steps_total", 0.0) - before.get("dare_worker_steps_total", 0.0)
    d_rows = after.get("dare_worker_step_rows_total", 0.0) - before.get("dare_worker_step_rows_total", 0.0)
    return {
        "method": method,
        "prompts": len(sent),
        "answered": len(arrived),
        "lost": len(sent) - len(arrived),
        "duplicates": duplicates,
        "achieved_prompts_per_s": len(arrived) / window,
        "achieved_tokens_per_s": tokens / window,
        "latency_p50_s": percentile(latency, 50),
        "latency_p90_s": percentile(latency, 90),
        "latency_p99_s": percentile(latency, 99),
        "queue_p50_s": percentile(queue, 50),
        "queue_p99_s": percentile(queue, 99),
        "decode_p50_s": percentile(decode, 50),
        "decode_p99_s": percentile(decode, 99),
        "prefill_share": sum(prefills) / sum(decode) if sum(prefills) and sum(decode) else None,  # None: not counted
        "tokens_per_step": tokens / steps if steps else None,  # None: the engine does not count its steps (vLLM ngram/suffix)
        "batch_occupancy": d_rows / d_steps if d_steps else None,
        "wall_s": window,
        "schedule_late_max_s": max((s.late_s for s in sent), default=0.0),  # the producer kept to the arrivals
    }


def median_point(tries: list[dict]) -> dict:
    """Per figure, the median over repeats; counts (answered, lost, duplicates) are summed."""
    out = dict(tries[0])
    for key, value in tries[0].items():
        if key in ("answered", "lost", "duplicates", "prompts"):
            out[key] = sum(t[key] for t in tries)
        elif isinstance(value, float) or value is None:
            values = [t[key] for t in tries if t[key] is not None]
            out[key] = statistics.median(values) if values else None
    out["repeats"] = len(tries)
    return out


def run_load_bench(run: Pipeline, prompts: list[BenchPrompt], pool: dict[str, list[str]], methods: list[str],
                   fractions: list[float] | None, rates: list[float] | None, per_point: int, batch: int, max_new: int,
                   seed: int = 0, repeat: int = 1, threads: int | None = None, saturation: float | None = None,
                   trace: Callable[[dict], None] | None = None) -> dict:
    """Every method's backlog point and rate points, `repeat` times; medians per point. Methods that one
    worker serves (its engine and method; each request names its mode) run together, one worker at a
    time; the first method's backlog sets the rates that `fractions` ask for. Every method meets the same
    arrival times and prompt order at a given rate. `saturation`: the 100 % of `fractions`, measured in an
    earlier run (e.g. `dare-ar`'s, for the vLLM methods run from their own environment's worker). `trace`:
    called with every prompt's figures (`point_trace`), tagged with its method, round and rate."""
    publish_pools(run, pool)
    samples: dict[tuple[str, float | None], list[dict]] = {}
    saturations: list[float] = [saturation] if saturation else []
    targets: list[tuple[float | None, float]] = [(None, r) for r in rates or []]  # (load fraction, prompts/s)
    if saturation and fractions:
        targets = [(f, f * saturation) for f in fractions]

    def measure(method: str, reqs: list[PromptRequest], schedule: list[float], fraction: float | None, rate: float | None,
                port: int, round_: int) -> dict:
        """One point, printed and kept among its method's and rate's samples."""
        point = run_point(run, method, reqs, schedule, port, 1800, run.progress.show)
        entries = point.pop("trace")
        for entry in entries if trace else ():
            trace({"method": method, "round": round_, "load_fraction": fraction, "offered_prompts_per_s": rate} | entry)
        point |= {"load_fraction": fraction, "offered_prompts_per_s": rate}
        run.progress.done()
        print(format_point(point), flush=True)
        samples.setdefault((method, rate), []).append(point)
        return point

    for group, group_methods in worker_groups(methods).items():
        port = start_worker(run, group, batch, threads)
        # warm-up: every method once (kernels, caches, the first compiled shapes), not counted
        warm = [r for m in group_methods for r in requests_for(prompts, 2, METHODS[m][1], max_new, f"warm-{m}", seed)]
        run_point(run, "warm-up", warm, [0.0] * len(warm), None, 600, run.progress.show)
        run.progress.done()
        for round_ in range(repeat):
            for method in group_methods:
                mode, tag = METHODS[method][1], f"r{round_}-{method}"
                backlog = requests_for(prompts, per_point, mode, max_new, f"{tag}-backlog", seed + round_)
                point = measure(method, backlog, [0.0] * per_point, None, None, port, round_)
                if method == methods[0] and not saturation:
                    saturations.append(point["achieved_prompts_per_s"])
                    if fractions and round_ == 0:  # the rates, fixed for every method and round
                        targets = [(f, f * point["achieved_prompts_per_s"]) for f in fractions]
                for index, (fraction, rate) in enumerate(targets):
                    schedule = arrivals(per_point, rate, seed + round_ * 1000 + index)
                    reqs = requests_for(prompts, per_point, mode, max_new, f"{tag}-{rate:.4f}", seed + round_)
                    measure(method, reqs, schedule, fraction, rate, port, round_)
        run.processes.stop()  # the next worker gets the cores to itself
    report_points = []
    for (method, _), tries in samples.items():
        backend, name = point_name(method)
        report_points.append(median_point(tries) | {"backend": backend, "method": name, "bench_method": method,
                                                    "samples_latency_p50_s": [t["latency_p50_s"] for t in tries]})
    basis = targets[0][1] / targets[0][0] if targets and targets[0][0] else None
    return {"prompts_per_point": per_point, "batch": batch, "max_new_tokens": max_new, "repeat": repeat, "seed": seed,
            "methods": methods, "ar_saturation_prompts_per_s": statistics.median(saturations) if saturations else None,
            # the 100 % the load fractions were taken of: pass it as --saturation for the same arrivals elsewhere
            "rates_saturation_prompts_per_s": basis,
            "latency_objective_s": LATENCY_OBJECTIVE_S, "points": report_points,
            "highest_rate_within_objective": highest_rates(report_points)}


def worker_groups(methods: list[str]) -> dict[str, list[str]]:
    """Methods by the worker that serves them, in the order the methods come."""
    groups: dict[str, list[str]] = {}
    for method in methods:
        groups.setdefault(METHODS[method][0], []).append(method)
    return groups


def point_name(method: str) -> tuple[str, str]:
    """(backend, method) as the report's points name them: DARE inside vLLM is backend vllm, method dare-*."""
    group = METHODS[method][0]
    if group == "vllm:dare":
        return "vllm", method.removeprefix("vllm-")
    return ("vllm" if group.startswith("vllm") else "transformers"), method


def vllm_python() -> str:
    """The Python of the vLLM environment (`make install-vllm`), or $DARE_VLLM_PYTHON."""
    path = os.environ.get("DARE_VLLM_PYTHON") or str(Path(__file__).resolve().parents[2] / ".venv-vllm" / "bin" / "python")
    if not Path(path).is_file():
        raise LoadBenchError(f"vLLM methods run in the vLLM environment and {path} is missing: run `make install-vllm` "
                             "(or set DARE_VLLM_PYTHON)")
    return path


def start_worker(run: Pipeline, group: str, batch: int, threads: int | None) -> int:
    """One worker for `group` ("transformers" or "vllm:<method>"), ready; returns its metrics port."""
    port = free_port()
    args = ["--batch", str(batch), "--metrics-port", str(port), "--no-learn"]
    python = None
    if group.startswith("vllm:"):
        args += ["--backend", "vllm", "--vllm-method", group.split(":", 1)[1]]
        python = vllm_python()
    run.start_workers(1, threads, *args, python=python)
    wait_ready(run, port)
    return port


def wait_ready(run: Pipeline, port: int, timeout_s: float = 600) -> None:
    deadline = time.monotonic() + timeout_s
    while scrape(port).get("dare_worker_ready") != 1.0:
        run.processes.check()
        if time.monotonic() > deadline:
            raise LoadBenchError(f"the worker was not ready within {timeout_s:.0f}s (log: {run.log_dir})")
        run.progress.show("waiting for the worker (model, cost curve, pools, group)")
        time.sleep(0.5)
    run.progress.done()
    time.sleep(2)  # let the group settle


def highest_rates(points: list[dict]) -> dict[str, float | None]:
    """Per method: the highest offered rate whose p99 latency is within the objective (None: none is)."""
    out: dict[str, float | None] = {}
    for p in points:
        method = p["bench_method"]
        out.setdefault(method, None)
        if p["offered_prompts_per_s"] is not None and p["latency_p99_s"] <= LATENCY_OBJECTIVE_S and not p["lost"]:
            out[method] = max(out[method] or 0.0, p["offered_prompts_per_s"])
    return out


def fmt(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}"


def format_point(p: dict) -> str:
    load = "backlog" if p["offered_prompts_per_s"] is None else f"{p['offered_prompts_per_s']:.3f}/s"
    occupancy = f"{p['batch_occupancy']:.1f}" if p.get("batch_occupancy") is not None else "—"
    return (f"  {p['method']} {load}: {p['achieved_tokens_per_s']:.1f} tok/s, p50 {p['latency_p50_s']:.1f}s "
            f"(queue {p['queue_p50_s']:.1f}), p99 {p['latency_p99_s']:.1f}s, {fmt(p['tokens_per_step'])} tok/step, "
            f"rows {occupancy}, {p['answered']}/{p['prompts']} answered")


def format_table(report: dict) -> str:
    lines = [(f"{report['prompts_per_point']} prompts per point, worker batch up to {report['batch']}, {report['max_new_tokens']} new "
             f"tokens; `dare-ar` saturates at {report['ar_saturation_prompts_per_s']:.3f} prompts/s"
             + (f" (loads are fractions of {report['rates_saturation_prompts_per_s']:.4f})"
                if report.get("rates_saturation_prompts_per_s") else "") + f"; medians of {report['repeat']}"),
             ("| method | load | offered prompts/s | achieved tokens/s | p50 s | p90 s | p99 s | queue p50 s | decode p50 s "
             "| prefill share | tokens/step | rows/step | answered | lost | dup |"),
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for p in sorted(report["points"], key=lambda p: (report["methods"].index(p["bench_method"]), p["offered_prompts_per_s"] or 1e9)):
        load = "backlog" if p["offered_prompts_per_s"] is None else (f"{p['load_fraction']:.2f}x" if p["load_fraction"] else "—")
        offered = "—" if p["offered_prompts_per_s"] is None else f"{p['offered_prompts_per_s']:.3f}"
        occupancy = f"{p['batch_occupancy']:.1f}" if p.get("batch_occupancy") is not None else "—"
        lines.append(f"| {p['bench_method']} | {load} | {offered} | {p['achieved_tokens_per_s']:.1f} | {p['latency_p50_s']:.1f} "
                     f"| {p['latency_p90_s']:.1f} | {p['latency_p99_s']:.1f} | {p['queue_p50_s']:.1f} | {p['decode_p50_s']:.1f} "
                     f"| {fmt(p.get('prefill_share'))} | {fmt(p['tokens_per_step'])} | {occupancy} | {p['answered']} | {p['lost']} | {p['duplicates']} |")
    best = ", ".join(f"{m} {'—' if r is None else f'{r:.3f}'}" for m, r in report["highest_rate_within_objective"].items())
    lines.append(f"highest offered rate with p99 ≤ {report['latency_objective_s']:.0f} s (prompts/s): {best}")
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    """p50 (solid) and p99 (dashed) latency against offered load, one colour per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for n, method in enumerate(report["methods"]):
        pts = sorted((p for p in report["points"] if p["bench_method"] == method and p["offered_prompts_per_s"] is not None),
                     key=lambda p: p["offered_prompts_per_s"])
        if not pts:
            continue
        x = [p["offered_prompts_per_s"] for p in pts]
        colour = f"C{n}"
        ax.plot(x, [p["latency_p50_s"] for p in pts], "o-", color=colour, label=f"{method} p50")
        ax.plot(x, [p["latency_p99_s"] for p in pts], "s--", color=colour, label=f"{method} p99")
    ax.axhline(report["latency_objective_s"], color="grey", lw=0.8, ls=":")
    if report["ar_saturation_prompts_per_s"]:
        ax.axvline(report["ar_saturation_prompts_per_s"], color="grey", lw=0.8, ls="-.", label="dare-ar saturation")
    ax.set_xlabel("offered load (prompts/s, Poisson arrivals)")
    ax.set_ylabel("latency: produced → knowledge record (s)")
    ax.set_yscale("log")
    ax.set_title(f"DARE worker under load ({report['max_new_tokens']} new tokens, batch ≤ {report['batch']})", fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def git_commit() -> str:
    """HEAD's short hash, `+dirty` where tracked code differs from it (the figures are then of uncommitted code)."""
    here = Path(__file__).parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=here).stdout.strip()
        changed = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "*.py", "*.cpp"],
                                 capture_output=True, text=True, check=True, cwd=here).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if changed else "")


def machine() -> str:
    """The CPU's model name and whether it has AVX-512 (every figure names it)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return sys.platform
    def field(key: str) -> str:
        return next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith(key)), "?")

    cores = info.count("processor\t:")
    simd = "AVX-512" if "avx512f" in field("flags").split() else "AVX2, no AVX-512"
    return f"{field('model name')} (family {field('cpu family')}, model {field('model')}), {cores} cores, {simd}"


def merge_reports(reports: list[dict]) -> dict:
    """Runs of the same workload into one report (e.g. this engine's from .venv and vLLM's peers from
    .venv-vllm, the latter run with --saturation of the former): the first run's settings and saturation,
    every run's points (a method measured twice: the later run's)."""
    first = reports[0]
    for other in reports[1:]:
        for key in ("prompts_per_point", "batch", "max_new_tokens", "seed"):
            if other[key] != first[key]:
                raise LoadBenchError(f"cannot merge runs with different {key}: {first[key]} and {other[key]}")
        a, b = first.get("rates_saturation_prompts_per_s"), other.get("rates_saturation_prompts_per_s")
        if a and b and abs(a - b) > 1e-9 * a:  # the load fractions were taken of different rates: other arrivals
            raise LoadBenchError(f"cannot merge runs whose loads are fractions of different rates ({a} and {b} prompts/s): "
                                 f"run the second with --saturation {a!r}")
    points = {(p["bench_method"], p["offered_prompts_per_s"] and round(p["offered_prompts_per_s"], 6)): p
              for r in reports for p in r["points"]}
    methods = list(dict.fromkeys(m for r in reports for m in r["methods"]))
    merged = dict(first) | {"methods": methods, "points": list(points.values()),
                            "runs": [{k: r.get(k) for k in ("commit", "machine", "date", "command")} for r in reports]}
    merged["highest_rate_within_objective"] = highest_rates(merged["points"])
    return merged


def write_report(report: dict, path: Path) -> None:
    path.write_text(json.dumps(report, indent=1) + "\n")
