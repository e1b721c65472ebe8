"""`dare generate-all`: knowledge for every user and item of a data set, through the system itself.

    replay the events → the pool builder forms segments and pools → one KAR prompt per entity to the
    prompts topic → N workers decode (continuous batching) → the knowledge topic, read as a downstream
    consumer would → results/knowledge/<dataset>-<mode>.jsonl, one knowledge record per entity

Users and items are interleaved (user 1, item 1, user 2, item 2, ..., then the remaining items):
both kinds of pools fill from the start, so drafting conditions do not change half-way, and a batch
always mixes long user prompts with short item prompts, so the progress rate (and its ETA) is steady.

Resumable: entities already in the output file are not asked again, and their records are first fed
back to the knowledge topic, so the pools start where the previous run left them (the embedded broker
forgets everything between runs). One file holds one mode and one model; asking for another refuses.
`<file>.summary.json` adds up every run that wrote to the file.
"""

from __future__ import annotations

import base64
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from dare.data import load_movielens, prompt_request
from dare.pipeline import Pipeline, PipelineError, pipeline, prepare_model
from infra.kafka import produce
from infra.settings import Settings
from schemas import KnowledgeRecord, Mode, PromptRequest, SchemaError, decode
from workers.engine.model import model_id

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


def default_output(mode: str) -> Path:
    return Path("results") / "knowledge" / f"{DATASET}-{mode}.jsonl"


def summary_path(out: Path) -> Path:
    return out.with_name(out.name.removesuffix(".jsonl") + ".summary.json")


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
                     requests: list[PromptRequest] | None = None) -> dict:
    """Ask for every entity not yet in `out`; append their records as they arrive. `requests`
    replaces the data set's prompts (tests)."""
    started = time.time()
    threads = settings.threads or max(1, (os.cpu_count() or 1) // workers)
    ml = load_movielens()
    model = model_id(settings.model)
    done = read_done(out, mode, model)  # before anything starts: a file of another mode or model is refused at once
    if requests is None:
        entities = interleaved(sorted(ml.users, key=int)[:users], sorted(ml.items, key=int)[:items])
        todo = [e for e in entities if e not in done.entities][:max_entities]
        requests = [prompt_request(ml, kind, entity_id, request_id=f"{DATASET}-{mode}-{kind}-{entity_id}-{int(started)}", mode=mode,
                                   max_new_tokens=settings.max_new_tokens) for kind, entity_id in todo]
    else:
        requests = [r for r in requests if (r.entity_kind, r.entity_id) not in done.entities][:max_entities]
    print(f"{out}: {len(done.records)} entities done, {len(requests)} to ask for ({mode}, {model}, batch {batch}, "
          f"{workers} worker(s), {settings.max_new_tokens} new tokens)", flush=True)
    if not requests:
        return write_summary(out, mode, model, done.records, None, batch, workers, settings.max_new_tokens)
    with pipeline(settings, "generate-all", stall_s, broker_port) as run:
        prepare_model(run.settings, threads)
        run.start_pool_builder("--refit-every", "5")
        ratings_users = run.replay_events(ratings)
        if done.records:  # the pools start where the previous runs left them
            produce(run.settings, run.topics.knowledge, done.records)
        run.start_workers(workers, threads, "--batch", str(batch), "--mode", mode)
        run.wait_for_segments(ratings_users)
        produce(run.settings, run.topics.prompts, requests)
        this_run = collect(run, requests, out, mode)
    this_run["started"] = started
    return write_summary(out, mode, model, read_done(out, mode, model).records, this_run, batch, workers, settings.max_new_tokens)


def collect(run: Pipeline, requests: list[PromptRequest], out: Path, mode: str) -> dict:
    """Read the knowledge topic until every request is answered or dead-lettered; append each first
    answer to `out` at once (an interruption keeps everything written)."""
    waiting = {r.request_id: r for r in requests}
    failed: dict[str, str] = {}
    written: list[KnowledgeRecord] = []
    duplicates = seen_letters = 0
    answered: set[str] = set()
    last_progress = time.monotonic()
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("a", encoding="utf-8") as f, tqdm(total=len(requests), unit="entity", desc=f"generate-all {mode}",
                                                      file=sys.stderr, dynamic_ncols=True) as bar:
        while waiting:
            run.read_downstream(timeout_ms=500)
            for record in run.results.knowledge:
                if record.request_id in answered:
                    duplicates += 1
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
            if written:
                tokens = sum(r.token_count for r in written)
                steps = sum(r.stats.steps for r in written)
                bar.set_postfix(tokens_per_s=f"{tokens / max(1e-9, span(written)):.1f}", accepted=f"{tokens / max(1, steps):.2f}",
                                refresh=False)
            run.processes.check()
            if time.monotonic() - last_progress > run.timeout_s:
                raise PipelineError(f"no knowledge for {run.timeout_s:.0f}s with {len(waiting)} prompts unanswered; "
                                    f"service logs in {run.log_dir}")
    return {"entities": len(written), "tokens": sum(r.token_count for r in written), "wall_s": span(written),
            "duplicates": duplicates, "dead_lettered": failed, "lost": len(waiting)}


def span(records: list[KnowledgeRecord]) -> float:
    """From the first decode's start to the last record (the workers' clocks, same machine)."""
    if not records:
        return 0.0
    return max(r.created_at for r in records) - min(r.created_at - r.stats.wall_s for r in records)


def write_summary(out: Path, mode: str, model: str, records: list[KnowledgeRecord], this_run: dict | None, batch: int,
                  workers: int, max_new_tokens: int) -> dict:
    path = summary_path(out)
    previous = json.loads(path.read_text()) if path.exists() else {}
    runs = previous.get("runs", []) + ([this_run | {"batch": batch, "workers": workers, "max_new_tokens": max_new_tokens}]
                                       if this_run else [])
    tokens = sum(r.token_count for r in records)
    steps = sum(r.stats.steps for r in records)
    wall = sum(r["wall_s"] for r in runs)
    summary = {
        "dataset": DATASET, "mode": mode, "model": model, "file": str(out),
        "entities": len(records),
        "users": sum(r.entity_kind == "user" for r in records),
        "items": sum(r.entity_kind == "item" for r in records),
        "tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall if wall else 0.0,
        "mean_accepted": tokens / steps if steps else 0.0,
        "duplicates": sum(r["duplicates"] for r in runs),
        "dead_lettered": sum(len(r["dead_lettered"]) for r in runs),
        "lost": sum(r["lost"] for r in runs),
        "runs": runs,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summary, indent=1) + "\n")
    return summary
