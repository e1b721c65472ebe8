"""`dare generate-all`: knowledge for every user and item of a catalogue, through the system itself.

    replay the events → the pool builder forms segments and pools → one prompt per entity (the
    catalogue's templates) to the prompts topic → N workers decode (continuous batching) → the knowledge
    topic, read as a downstream consumer would → results/knowledge/<catalogue>-<mode>.jsonl, one
    knowledge record per entity

The catalogue is MovieLens-100k, or any directory of RecBole atomic files (`--dataset`, `dare.data`).

Users and items are interleaved (user 1, item 1, user 2, item 2, ..., then the remaining items):
both kinds of pools fill from the start, so drafting conditions do not change half-way, and a batch
always mixes long user prompts with short item prompts, so the progress rate (and its ETA) is steady.

As of a cut-off (`as_of`, default the CTR test's train/validation boundary, `time_cut(EVAL_TRAIN_SHARE)`): a
user's prompt lists only ratings before it, so no knowledge text carries the ratings the downstream test
predicts; users with no rating before it get no prompt (counted). The cut-off is recorded in the summary.

Resumable: entities already in the output file are not asked again, and their records are first fed
back to the knowledge topic, so the pools start where the previous run left them (the embedded broker
forgets everything between runs). One file holds one mode and one model; asking for another refuses.
`<file>.summary.json` adds up every run that wrote to the file.
"""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from dare.data import DEFAULT_TEMPLATES, EVAL_TRAIN_SHARE, Catalogue, load_movielens, prompt_request
from dare.pipeline import Pipeline, PipelineError, pipeline, prepare_model
from infra.kafka import produce
from infra.settings import Settings
from schemas import KnowledgeRecord, Mode, PromptRequest, SchemaError, decode
from workers.engine import model_id

DATASET = "ml-100k"


class GenerateError(RuntimeError):
    """The output file cannot take this run (another mode or model, or unreadable)."""


@dataclass
class Done:
    """What the output file already holds."""

    records: list[KnowledgeRecord]

    @property
    def entities(self) -> set[tuple[str, str]]:
        return {(r.entity_kind, r.entity_id) for r in self.records}


def default_output(mode: str, dataset: str = DATASET, templates: str = DEFAULT_TEMPLATES, max_top1: float = 1.0) -> Path:
    """results/knowledge/ml-100k-ar.jsonl with the default templates, ml-100k-short-ar.jsonl with `short`;
    relaxed with a guard (`max_top1` < 1): ml-100k-relaxed-top1-0.5.jsonl."""
    name = f"{dataset}-{mode}" if templates == DEFAULT_TEMPLATES else f"{dataset}-{templates}-{mode}"
    if mode == "relaxed" and max_top1 < 1.0:
        name += f"-top1-{max_top1:g}"
    return Path("results") / "knowledge" / f"{name}.jsonl"


def summary_path(out: Path) -> Path:
    return out.with_name(out.name.removesuffix(".jsonl") + ".summary.json")


def resolve_as_of(catalogue: Catalogue, as_of: int | str | None) -> int | None:
    """`eval` (the CTR test's train/validation boundary), None or "none" (every rating), or a timestamp."""
    if as_of == "eval":
        return catalogue.time_cut(EVAL_TRAIN_SHARE)
    if as_of is None or as_of == "none":
        return None
    return int(as_of)


def check_prompts(out: Path, as_of: int | None, prompt_version: str, max_top1: float | None = None) -> None:
    """One file holds prompts of one cut-off and one templates version (files from before cut-offs existed count as
    none; from before versions, as any), and relaxed texts of one guard (`max_top1`; files from before it, 1.0)."""
    path = summary_path(out)
    if out.exists() and path.exists():
        summary = json.loads(path.read_text())
        earlier = summary.get("as_of")
        if earlier != as_of:
            raise GenerateError(f"{out} was generated with prompts as of {earlier or 'none (every rating)'}; this run asks for "
                                f"{as_of or 'none'}: one file holds one cut-off (use --out for another file, or --as-of {earlier or 'none'})")
        version = summary.get("prompt_version")
        if version not in (None, prompt_version):
            raise GenerateError(f"{out} was generated with templates {version}; this run's are {prompt_version}: one file holds one "
                                "templates version (use --out for another file, or the templates it was made with)")
        guard = summary.get("relaxed_max_top1") or 1.0
        if max_top1 is not None and summary.get("mode") == "relaxed" and guard != max_top1:  # other modes: `read_done` refuses
            raise GenerateError(f"{out} was generated with --relaxed-max-top1 {guard}; this run asks for {max_top1}: one file "
                                "holds one guard (use --out for another file)")


def read_done(out: Path, mode: str, model: str) -> Done:
    """The records of earlier runs; refuses a file of another mode or model."""
    if not out.exists():
        return Done([])
    records = []
    for number, line in enumerate(out.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = decode(KnowledgeRecord, line.encode())
        except SchemaError as exc:
            raise GenerateError(f"{out}:{number}: not a knowledge record ({exc.reason}); fix or move the file") from None
        if record.mode != mode or record.model != model:
            raise GenerateError(f"{out} holds {record.mode} knowledge of {record.model}; this run asks for {mode} with {model}: "
                                "one file holds one mode and one model (use --out for another file)")
        records.append(record)
    return Done(records)


def interleaved(users: list[str], items: list[str]) -> list[tuple[str, str]]:
    """user 1, item 1, user 2, item 2, ..., then what is left of the longer list."""
    out: list[tuple[str, str]] = []
    for n in range(max(len(users), len(items))):
        out += [("user", users[n])] if n < len(users) else []
        out += [("item", items[n])] if n < len(items) else []
    return out


def dead_request_id(letter_value_b64: str) -> str | None:
    """The request id inside a dead-lettered prompt, if it can be read."""
    try:
        return json.loads(base64.b64decode(letter_value_b64)).get("request_id")
    except (ValueError, AttributeError):
        return None


def run_generate_all(settings: Settings, mode: Mode, out: Path, batch: int = 16, workers: int = 1,
                     users: int | None = None, items: int | None = None, max_entities: int | None = None,
                     ratings: int | None = None, stall_s: float = 600.0, broker_port: int | None = None,
                     requests: list[PromptRequest] | None = None, catalogue: Catalogue | None = None,
                     as_of: int | str | None = "eval") -> dict:
    """Ask for every entity of `catalogue` (default MovieLens-100k) not yet in `out`, user prompts as of
    `as_of` (see `resolve_as_of`); append their records as they arrive. `requests` replaces the
    catalogue's prompts (tests)."""
    started = time.time()
    threads = settings.threads or max(1, (os.cpu_count() or 1) // workers)
    ml = catalogue or load_movielens()
    model = model_id(settings.model)
    cut = resolve_as_of(ml, as_of)
    assert ml.templates is not None
    guard = settings.relaxed_max_top1 if mode == "relaxed" else None
    check_prompts(out, cut, ml.templates.version, guard)  # before anything starts: a file of another cut-off, mode or model is refused at once
    done = read_done(out, mode, model)
    finished = done.entities
    no_history = 0
    if requests is None:
        entities = interleaved(ml.user_ids()[:users], ml.item_ids()[:items])
        if cut is not None:  # a user with no rating before the cut-off has nothing to reason from
            no_history = sum(1 for kind, e in entities if kind == "user" and not ml.history(e, as_of=cut))
            entities = [(kind, e) for kind, e in entities if kind == "item" or ml.history(e, as_of=cut)]
        todo = [e for e in entities if e not in finished][:max_entities]
        requests = [prompt_request(ml, kind, entity_id, request_id=f"{ml.name}-{mode}-{kind}-{entity_id}-{int(started)}", as_of=cut,
                                   mode=mode, max_new_tokens=settings.max_new_tokens) for kind, entity_id in todo]
    else:
        requests = [r for r in requests if (r.entity_kind, r.entity_id) not in finished][:max_entities]
    print(f"{out}: {len(done.records)} entities done, {len(requests)} to ask for ({mode}, {model}, batch {batch}, "
          f"{workers} worker(s), {settings.max_new_tokens} new tokens, prompts as of {cut or 'every rating'}"
          + (f"; {no_history} users have no rating before it and get no prompt" if no_history else "") + ")", flush=True)
    this_run = {"stamp": str(int(started)), "started": started, "batch": batch, "workers": workers,
                "max_new_tokens": settings.max_new_tokens, "commit": commit(), "entities": 0, "tokens": 0, "wall_s": 0.0,
                "duplicates": 0, "dead_lettered": {}, "lost": 0, "interrupted": False}
    if not requests:
        return write_summary(out, mode, model, done.records, None, ml.name, cut, ml.templates.version, guard)
    try:
        with pipeline(settings, "generate-all", stall_s, broker_port) as run:
            prepare_model(run.settings, threads)
            run.start_pool_builder("--refit-every", "5")
            ratings_users = run.replay_events(ratings, ml)
            if done.records:  # the pools start where the previous runs left them
                produce(run.settings, run.topics.knowledge, done.records)
            run.start_workers(workers, threads, "--batch", str(batch), "--mode", mode)
            run.wait_for_segments(ratings_users)
            produce(run.settings, run.topics.prompts, run.with_segments(requests))  # keyed by segment, as the pools
            collect(run, requests, out, mode, this_run)
    except KeyboardInterrupt:
        this_run["interrupted"] = True
        raise
    finally:  # an interrupted run is accounted for too: its records stay in the file
        if this_run["entities"] or not this_run["interrupted"]:
            summary = write_summary(out, mode, model, read_done(out, mode, model).records, this_run, ml.name, cut, ml.templates.version,
                                    guard)
    return summary


def commit() -> str | None:
    """The code's git commit, if it runs from a checkout: runs of different code are not comparable."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True,
                              timeout=5, check=False)
    except OSError:
        return None
    return head.stdout.strip() or None


def collect(run: Pipeline, requests: list[PromptRequest], out: Path, mode: str, this_run: dict) -> None:  # type: ignore[type-arg]
    """Read the knowledge topic until every request is answered or dead-lettered; append each first
    answer to `out` at once, and keep `this_run`'s figures current (an interruption keeps both)."""
    waiting = {r.request_id: r for r in requests}
    failed: dict[str, str] = this_run["dead_lettered"]
    written: list[KnowledgeRecord] = []
    seen_letters = 0
    answered: set[str] = set()
    last_progress = time.monotonic()
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("a", encoding="utf-8") as f, tqdm(total=len(requests), unit="entity", desc=f"generate-all {mode}",
                                                      file=sys.stderr, dynamic_ncols=True) as bar:
        while waiting:
            run.read_downstream(timeout_ms=500)
            for record in run.results.knowledge:
                if record.request_id in answered:
                    this_run["duplicates"] += 1
                elif waiting.pop(record.request_id, None) is not None:
                    answered.add(record.request_id)
                    f.write(record.model_dump_json() + "\n")
                    f.flush()
                    written.append(record)
                    bar.update(1)
                    last_progress = time.monotonic()
            for letter in run.results.dead_letters[seen_letters:]:
                request_id = dead_request_id(letter.value_b64)
                if request_id in waiting:
                    waiting.pop(request_id)
                    failed[request_id] = f"{letter.error_type}: {letter.reason}"
                    bar.update(1)
                    tqdm.write(f"dead-lettered {request_id}: {letter.reason}", file=sys.stderr)
            seen_letters = len(run.results.dead_letters)
            run.results.knowledge.clear()
            this_run.update(entities=len(written), tokens=sum(r.token_count for r in written), wall_s=span(written),
                            lost=len(waiting))
            if written:
                tokens = sum(r.token_count for r in written)
                steps = sum(r.stats.steps for r in written)
                bar.set_postfix(tokens_per_s=f"{tokens / max(1e-9, span(written)):.1f}", accepted=f"{tokens / max(1, steps):.2f}",
                                refresh=False)
            run.processes.check()
            if time.monotonic() - last_progress > run.timeout_s:
                raise PipelineError(f"no knowledge for {run.timeout_s:.0f}s with {len(waiting)} prompts unanswered; "
                                    f"service logs in {run.log_dir}")


def span(records: list[KnowledgeRecord]) -> float:
    """From the first decode's start to the last record (the workers' clocks, same machine)."""
    if not records:
        return 0.0
    return max(r.created_at for r in records) - min(r.created_at - r.stats.wall_s for r in records)


RUN_STAMP = re.compile(r"-(?:ar|strict|relaxed)-(?:user|item)-.+-(\d+)$")  # request ids: <catalogue>-<mode>-<kind>-<id>-<stamp>


def recovered_runs(records: list[KnowledgeRecord], known: set[str]) -> list[dict]:  # type: ignore[type-arg]
    """Runs whose records are in the file but whose figures are not in the summary (a run stopped
    before it could write them): entities, tokens and decode span from the records themselves."""
    by_stamp: dict[str, list[KnowledgeRecord]] = {}
    for record in records:
        match = RUN_STAMP.search(record.request_id)
        if match and match.group(1) not in known:
            by_stamp.setdefault(match.group(1), []).append(record)
    return [{"stamp": stamp, "entities": len(rs), "tokens": sum(r.token_count for r in rs), "wall_s": span(rs),
             "recovered_from_records": True} for stamp, rs in sorted(by_stamp.items())]


def write_summary(out: Path, mode: str, model: str, records: list[KnowledgeRecord], this_run: dict | None,  # type: ignore[type-arg]
                  dataset: str = DATASET, as_of: int | None = None, prompt_version: str | None = None,
                  relaxed_max_top1: float | None = None) -> dict:
    """Totals over every run that wrote to `out`; tokens/s = all tokens / the sum of the runs' decode spans."""
    path = summary_path(out)
    previous = json.loads(path.read_text()) if path.exists() else {}
    runs = [r for r in previous.get("runs", []) if not this_run or r.get("stamp") != this_run["stamp"]]
    runs += [this_run] if this_run else []
    runs += recovered_runs(records, {r.get("stamp") for r in runs})
    tokens = sum(r.token_count for r in records)
    steps = sum(r.stats.steps for r in records)
    wall = sum(r["wall_s"] for r in runs)
    summary = {
        "dataset": dataset, "as_of": as_of, "prompt_version": prompt_version, "mode": mode, "model": model, "file": str(out),
        "relaxed_max_top1": relaxed_max_top1,
        "entities": len(records),
        "users": sum(r.entity_kind == "user" for r in records),
        "items": sum(r.entity_kind == "item" for r in records),
        "tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall if wall else 0.0,
        "mean_accepted": tokens / steps if steps else 0.0,
        "duplicates": sum(r.get("duplicates", 0) for r in runs),
        "dead_lettered": sum(len(r.get("dead_lettered", {})) for r in runs),
        # every run asks again for every entity the file lacks, so what the latest run never got is what is still
        # missing (a run stopped by Ctrl-C lost nothing: its unanswered prompts were merely not waited for)
        "lost": next((0 if r.get("interrupted") else r.get("lost", 0) for r in reversed(runs) if not r.get("recovered_from_records")), 0),
        "runs": runs,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summary, indent=1) + "\n")
    return summary
