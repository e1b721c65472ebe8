"""The default benchmark workload from MovieLens-100k.

Segments: users clustered (MiniLM item vectors → rating-weighted user vectors → FAISS
k-means), items grouped by their first genre. For each of the largest segments some
entities are held out as prompts, and others' knowledge, generated earlier by the model,
forms the segment's pool.

Two files in `bench/` hold it: `workload.json` (segment → held-out ids and pool ids; ids
only, so no MovieLens data is copied into the repo) and `pool.jsonl` (the generated texts).
`dare workload make` regenerates both; prompts are rendered from MovieLens at run time.
"""

from __future__ import annotations

import json
import random
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

from dare.data import MovieLens, item_prompt, load_movielens, user_prompt

BENCH_DIR = Path(__file__).resolve().parents[2] / "bench"
SPEC_PATH = BENCH_DIR / "workload.json"
POOL_PATH = BENCH_DIR / "pool.jsonl"


class WorkloadError(ValueError):
    """A prompts or pool file is malformed; the message names the file and line."""


@dataclass(frozen=True)
class BenchPrompt:
    id: str
    segment: str
    prompt: str


def user_segments(ml: MovieLens, k: int = 8, seed: int = 1234) -> dict[str, str]:
    """user id → segment name, from MiniLM/FAISS clustering of rating-weighted item vectors."""
    from pool_builder.embeddings import TextEncoder, UserVectors, item_text
    from pool_builder.segments import assign, fit_centroids, segment_name

    items = list(ml.items.values())
    vectors = TextEncoder().encode([item_text(i.title, i.year, i.genres) for i in items])
    by_item = {item.item_id: vectors[n] for n, item in enumerate(items)}
    users = UserVectors()
    for r in ml.ratings:
        users.add(r.user_id, by_item[r.item_id], r.rating)
    ids, matrix = users.matrix()
    labels = assign(matrix, fit_centroids(matrix, k, seed=seed))
    return {uid: segment_name("user", int(label)) for uid, label in zip(ids, labels)}


def make_spec(ml: MovieLens, segments: int = 4, pool_size: int = 32, held_out: int = 3, seed: int = 7) -> dict:
    rng = random.Random(seed)
    spec: dict = {"segments": {}, "seed": seed, "pool_size": pool_size, "held_out": held_out}
    by_segment: dict[str, list[str]] = defaultdict(list)
    for uid, segment in sorted(user_segments(ml).items(), key=lambda kv: int(kv[0])):
        by_segment[segment].append(uid)
    by_genre: dict[str, list[str]] = defaultdict(list)
    for item in sorted(ml.items.values(), key=lambda i: int(i.item_id)):
        if item.genres and item.genres[0] != "unknown":
            by_genre[f"g-{item.genres[0]}"].append(item.item_id)
    for kind, groups in (("user", by_segment), ("item", by_genre)):
        largest = sorted(groups, key=lambda s: (-len(groups[s]), s))[:segments]
        for segment in largest:
            members = rng.sample(groups[segment], min(len(groups[segment]), pool_size + held_out))
            spec["segments"][segment] = {"kind": kind, "held_out": members[:held_out], "pool": members[held_out:]}
    return spec


def render_prompt(ml: MovieLens, kind: str, entity_id: str) -> str:
    return user_prompt(ml, entity_id) if kind == "user" else item_prompt(ml, entity_id)


def default_prompts(spec_path: Path = SPEC_PATH) -> list[BenchPrompt]:
    """Held-out prompts, interleaved across segments so that --limit keeps a mix."""
    ml = load_movielens()
    spec = json.loads(spec_path.read_text())
    columns = [
        [BenchPrompt(f"{seg['kind']}-{eid}", name, render_prompt(ml, seg["kind"], eid)) for eid in seg["held_out"]]
        for name, seg in spec["segments"].items()
    ]
    return [p for row in zip(*columns) for p in row]


def make_pool_file(lm, spec: dict, max_new_tokens: int, path: Path, batch_size: int = 16) -> int:  # type: ignore[no-untyped-def]
    """Generate every pool entity's knowledge with greedy decoding and write pool.jsonl."""
    from dare.benchmarks.reference import hf_generate_batch
    from workers.engine import chat_input_ids

    ml = load_movielens()
    jobs = [(name, seg["kind"], eid) for name, seg in spec["segments"].items() for eid in seg["pool"]]
    jobs.sort(key=lambda j: len(render_prompt(ml, j[1], j[2])))  # similar lengths batch with less padding
    lines = []
    start = time.perf_counter()
    for n in range(0, len(jobs), batch_size):
        batch = jobs[n : n + batch_size]
        inputs = [chat_input_ids(lm.tokenizer, render_prompt(ml, kind, eid)) for _, kind, eid in batch]
        for (segment, kind, eid), gen in zip(batch, hf_generate_batch(lm, inputs, max_new_tokens)):
            lines.append({"segment": segment, "text": gen.text, "entity": f"{kind}-{eid}"})
        print(f"  pool texts {min(n + batch_size, len(jobs))}/{len(jobs)} ({time.perf_counter() - start:.0f}s)", file=sys.stderr, flush=True)
    lines.sort(key=lambda line: (line["segment"], line["entity"]))
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return len(lines)


# ---------------------------------------------------------------------------- files


def _jsonl(path: Path, required: dict[str, type]) -> list[dict]:
    if not path.is_file():
        raise WorkloadError(f"{path}: no such file")
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise WorkloadError(f"{path}:{number}: not JSON ({exc.msg})") from None
        if not isinstance(row, dict):
            raise WorkloadError(f"{path}:{number}: expected an object")
        for key, kind in required.items():
            if not isinstance(row.get(key), kind) or (kind is str and not row[key].strip()):
                raise WorkloadError(f"{path}:{number}: field {key!r} missing, empty or not a {kind.__name__}")
        rows.append(row | {"_line": number})
    return rows


def read_prompts(path: Path) -> list[BenchPrompt]:
    rows = _jsonl(path, {"id": str, "segment": str, "prompt": str})
    if not rows:
        raise WorkloadError(f"{path}: no prompts")
    return [BenchPrompt(r["id"], r["segment"], r["prompt"]) for r in rows]


def read_pool(path: Path) -> dict[str, list[str]]:
    """segment → texts."""
    pool: dict[str, list[str]] = defaultdict(list)
    for row in _jsonl(path, {"segment": str, "text": str}):
        pool[row["segment"]].append(row["text"])
    return dict(pool)


def read_pool_texts(path: Path, leave_out: str | None = None) -> list[str]:
    """Every text of a JSONL file whose lines have a "text" field (a pool file like bench/pool.jsonl, or knowledge
    records), but the entity `leave_out`'s own (e.g. "user-12": a pool row's "entity", a record's kind and id)."""
    def entity(row: dict) -> str | None:  # type: ignore[type-arg]
        if "entity" in row:
            return str(row["entity"])
        return f"{row['entity_kind']}-{row['entity_id']}" if "entity_kind" in row and "entity_id" in row else None

    rows = _jsonl(path, {"text": str})
    if not rows:
        raise WorkloadError(f"{path}: no texts")
    return [r["text"] for r in rows if leave_out is None or entity(r) != leave_out]


def check_segments(prompts: list[BenchPrompt], pool: dict[str, list[str]], prompts_path: Path | str) -> None:
    missing = Counter(p.segment for p in prompts if p.segment not in pool)
    if missing:
        segment, _ = missing.most_common(1)[0]
        first = next(n for n, p in enumerate(prompts, start=1) if p.segment == segment)
        raise WorkloadError(
            f"{prompts_path}:{first}: unknown segment {segment!r} (the pool file has: {', '.join(sorted(pool)) or 'none'})"
        )
