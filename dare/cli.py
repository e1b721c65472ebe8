"""`dare`: the single entry point. Subcommands are thin shells over the services."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import get_args

import structlog
from pydantic import ValidationError

from infra.log import configure_logging
from infra.settings import Settings, load_settings, settings_markdown
from schemas import Mode

MODES = list(get_args(Mode))

DEFAULT_METHODS = "hf-generate,pld,rest,dare-ar,dare-strict,dare-relaxed,dare-relaxed@segment,dare-relaxed@global,dare-relaxed@random"

log = structlog.get_logger("cli")


# ---------------------------------------------------------------------------- shared flags


def add_kafka_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bootstrap-servers", help="Kafka bootstrap servers (env DARE_BOOTSTRAP_SERVERS)")
    p.add_argument("--topic-prefix", help="topic name prefix (env DARE_TOPIC_PREFIX, default 'dare.')")


def cut_off(text: str) -> int | str:
    """--as-of: eval, none or Unix seconds."""
    if text in ("eval", "none"):
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: eval, none or a Unix timestamp in seconds") from None


def add_catalogue_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", type=Path, metavar="DIR",
                   help="a catalogue in RecBole atomic files: DIR/NAME.inter, DIR/NAME.item, optionally DIR/NAME.user, "
                        "NAME being DIR's name (default: MovieLens-100k from the recbole package)")
    p.add_argument("--templates", metavar="NAME|DIR",
                   help="prompt templates: a packaged set, kar (default: KAR's prompts) or short (answers in four sentences), "
                        "or a directory DIR holding user.txt and item.txt with {placeholders}")


def add_model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="local Hugging Face model directory (env DARE_MODEL; default: packaged SmolLM2-135M)")
    p.add_argument("--device", help="auto, cpu, cuda (env DARE_DEVICE)")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], help="env DARE_DTYPE")
    p.add_argument("--weights", choices=["auto", "blocks", "fp16", "full"],
                   help="linear weights in decoding: the GGUF's blocks, fp16 packed (CPU) or full (env DARE_WEIGHTS; default auto)")
    p.add_argument("--threads", type=positive_int, help="torch CPU threads (env DARE_THREADS)")
    p.add_argument("--compile", choices=["auto", "on", "off"], help="torch.compile the decoding steps (env DARE_COMPILE; default auto)")
    p.add_argument("--max-new-tokens", type=positive_int, help="env DARE_MAX_NEW_TOKENS (default 128)")
    p.add_argument("--relaxed-max-top1", type=float, metavar="P",
                   help="relaxed: accept another token than the model's only where its top-1 probability is <= P "
                        "(env DARE_RELAXED_MAX_TOP1; default 1.0: no guard)")


def add_pipeline_flags(p: argparse.ArgumentParser) -> None:
    """Commands that run the whole pipeline as processes (demo, generate-all)."""
    p.add_argument("--workers", type=positive_int, default=1, help="generator worker processes (CPU threads are split among them)")
    p.add_argument("--ratings", type=positive_int, help="replay only the first N ratings (MovieLens-100k has 100,000)")
    p.add_argument("--broker-port", type=port, help="embedded broker port (default: a free one)")


def settings_from(args: argparse.Namespace) -> Settings:
    names = set(Settings.model_fields)
    return load_settings(**{k: v for k, v in vars(args).items() if k in names})


def load_lm(settings: Settings):  # type: ignore[no-untyped-def]
    from workers.engine import load_model

    return load_model(settings.model, settings.device, settings.dtype, settings.cache_dir, settings.threads, settings.compile, settings.weights)


def stop_event_on_signals() -> threading.Event:
    """An event set by SIGINT/SIGTERM, so loops finish their current item and shut down cleanly."""
    stop = threading.Event()

    def handler(signum: int, _frame: object) -> None:
        log.info("stopping", signal=signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)
    return stop


# ---------------------------------------------------------------------------- commands


def cmd_config(args: argparse.Namespace) -> int:
    if args.markdown:
        print(settings_markdown())
    else:
        print(settings_from(args).model_dump_json(indent=2))
    return 0


def cmd_schemas(args: argparse.Namespace) -> int:
    from schemas import export_json_schemas

    for path in export_json_schemas(Path(args.dir)):
        print(path)
    return 0


def cmd_schema_example(args: argparse.Namespace) -> int:
    from schemas import encode
    from schemas.examples import EXAMPLES

    print(encode(EXAMPLES[args.type]).decode())
    return 0


def cmd_broker(args: argparse.Namespace) -> int:
    from infra.broker import EmbeddedBroker

    stop = stop_event_on_signals()
    with EmbeddedBroker(port=args.port) as broker:
        print(f"embedded Tansu broker at {broker.bootstrap_servers} (memory storage; Ctrl-C stops it)", flush=True)
        print(f"  export DARE_BOOTSTRAP_SERVERS={broker.bootstrap_servers}", flush=True)
        while not stop.wait(0.5):
            if broker.process is None or broker.process.poll() is not None:
                print("the broker exited", file=sys.stderr)
                return 1
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from dare.benchmarks.workload import read_pool_texts
    from dare.data import item_prompt, load_catalogue, user_prompt
    from workers.engine import Strategy, generate, open_engine

    settings = settings_from(args)
    entity = f"user-{args.user}" if args.user else f"item-{args.item}" if args.item else None
    if args.prompt:
        prompt = args.prompt
    else:
        catalogue = load_catalogue(args.dataset, args.templates)
        prompt = user_prompt(catalogue, args.user) if args.user else item_prompt(catalogue, args.item)
    texts = read_pool_texts(args.pool, leave_out=entity) if args.pool else []  # never the entity's own text
    lm = load_lm(settings)
    engine = open_engine("transformers", lm, settings.cache_dir, strategy=Strategy(max_top1=settings.relaxed_max_top1))
    runs = [args.mode, *(["ar"] if args.compare and args.mode != "ar" else [])]
    if len(runs) > 1:  # a first decode warms the kernels and caches up: neither timed run gets that for free
        generate(engine, lm.tokenizer, [prompt], (), "ar", 2, rows=1)
    outputs = {mode: generate(engine, lm.tokenizer, [prompt], texts, mode, settings.max_new_tokens, rows=1)[0] for mode in runs}
    print(outputs[args.mode].text)
    print()
    for mode, out in outputs.items():
        s = out.stats
        drafts = f", drafting from {len(texts)} pool texts and its own" if mode != "ar" else ""
        print(f"[{mode}: {len(out.token_ids)} tokens in {s.wall_s:.2f}s = {len(out.token_ids) / s.wall_s:.1f} tokens/s, "
              f"{s.mean_accepted:.2f} tokens per step ({s.steps} steps){drafts}; {lm.model_id}, {lm.device}]")
    if len(outputs) > 1:
        mine, greedy = outputs[args.mode], outputs["ar"]
        speed = (len(mine.token_ids) / mine.stats.wall_s) / (len(greedy.token_ids) / greedy.stats.wall_s)
        same = "the same text as greedy" if mine.token_ids == greedy.token_ids else "a text other than greedy's"
        print(f"[{args.mode}: {speed:.2f}x greedy's tokens/s, {same}]")
    return 0


def start_service(args: argparse.Namespace) -> tuple[Settings, threading.Event]:
    """What every long-running service does first: settings, signal handling, the metrics port if asked for
    (/metrics, /healthz, /readyz: infra/health.py), and a broker that answers (retried with backoff)."""
    from infra.health import HEALTH, serve
    from infra.kafka import wait_for_broker

    settings = settings_from(args)
    stop = stop_event_on_signals()
    if args.metrics_port:
        serve(args.metrics_port)
    HEALTH.set_ready(False, "waiting for the Kafka broker")
    wait_for_broker(settings)
    HEALTH.set_ready(False, "starting")
    return settings, stop


def cmd_worker(args: argparse.Namespace) -> int:
    from workers.service import Worker

    if args.backend == "vllm":
        require_vllm()
        reexec_for_vllm()
    settings, stop = start_service(args)
    # with vLLM decoding, the transformers model serves only its tokenizer and config: no packed weights
    lm = load_lm(settings.model_copy(update={"weights": "full"}) if args.backend == "vllm" else settings)
    worker = Worker(settings, lm, mode=args.mode, batch=args.batch, backend=args.backend, eager=args.eager, learn=not args.no_learn,
                    vllm_method=args.vllm_method)
    worker.run(stop, max_prompts=args.max_prompts, idle_timeout_s=args.idle_exit)
    return 0


def cmd_consume(args: argparse.Namespace) -> int:
    from infra.kafka import wait_for_broker
    from infra.reader import read_topic
    from schemas import Topics

    settings = settings_from(args)
    wait_for_broker(settings)
    topic = getattr(Topics(settings.topic_prefix), args.topic.replace("-", "_"), None) or args.topic
    for record in read_topic(settings, topic, max_messages=args.max, timeout_s=args.timeout):
        value = record.value.decode("utf-8", errors="replace") if record.value else ""
        if args.json:
            print(value, flush=True)
        else:
            print(f"{record.topic}[{record.partition}]@{record.offset} key={record.key!r} {value[:200]}", flush=True)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from dare.demo import run_demo

    settings = settings_from(args)
    if args.log_level is None and "DARE_LOG_LEVEL" not in os.environ:  # progress lines talk; services log to files
        configure_logging(settings.log_format, "warning")
    return run_demo(settings, limit=args.limit, workers=args.workers, ratings=args.ratings, json_path=args.json,
                    records_path=args.records, timeout_s=args.timeout, broker_port=args.broker_port)


def cmd_generate_all(args: argparse.Namespace) -> int:
    from dare.data import load_catalogue
    from dare.generate_all import default_output, run_generate_all

    settings = settings_from(args)
    if args.log_level is None and "DARE_LOG_LEVEL" not in os.environ:  # the progress bar talks; services log to files
        configure_logging(settings.log_format, "warning")
    catalogue = load_catalogue(args.dataset, args.templates)  # a bad catalogue or template stops here, before anything starts
    out = args.out or default_output(args.mode, catalogue.name, catalogue.templates.source.name,  # type: ignore[union-attr]
                                     settings.relaxed_max_top1)
    summary = run_generate_all(settings, args.mode, out, batch=args.batch, workers=args.workers, users=args.users,
                               items=args.items, max_entities=args.max_entities, ratings=args.ratings, stall_s=args.stall_timeout,
                               broker_port=args.broker_port, catalogue=catalogue, as_of=args.as_of)
    print(f"{out}: {summary['entities']} entities ({summary['users']} users, {summary['items']} items), "
          f"{summary['tokens']} tokens in {summary['wall_s']:.0f}s of decoding = {summary['tokens_per_s']:.1f} tokens/s, "
          f"mean accepted {summary['mean_accepted']:.2f}, lost {summary['lost']}, duplicates {summary['duplicates']}, "
          f"dead-lettered {summary['dead_lettered']}; summary {out.name.removesuffix('.jsonl')}.summary.json")
    return 0


def cmd_eval_quality(args: argparse.Namespace) -> int:
    from dare.data import load_catalogue
    from dare.generate_all import default_output
    from dare.quality import format_report, plot, run_quality, variant_name

    settings_from(args)
    catalogue = load_catalogue(args.dataset, args.templates)
    ar, relaxed = (getattr(args, mode) or default_output(mode, catalogue.name, catalogue.templates.source.name)  # type: ignore[union-attr]
                   for mode in ("ar", "relaxed"))
    extra = {variant_name(path, catalogue.templates.version if catalogue.templates else None): path for path in args.also or []}
    for path in (ar, relaxed, *extra.values()):
        if not path.is_file():
            raise FileNotFoundError(2, "no such knowledge file (make it with `dare generate-all --mode ...`)", str(path))
    report = run_quality(ar, relaxed, seeds=args.seeds, catalogue=catalogue, extra=extra)
    print(format_report(report))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=1) + "\n")
    plot(report, args.plot)
    print(f"wrote {args.json} and {args.plot}", file=sys.stderr)
    return 0


def positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {text!r}")
    return int(text)


def port(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"expected a TCP port (1..65535), got {text!r}")
    return int(text)


def number_type(allow_zero: bool, what: str):  # type: ignore[no-untyped-def]
    """An argparse type for a float above 0 (or at least 0)."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = float("nan")
        if not (value >= 0 if allow_zero else value > 0):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value

    return parse


seconds = number_type(False, "a number of seconds above 0")
non_negative = number_type(True, "a number of at least 0")
positive_number = number_type(False, "a number above 0")


def output_file(text: str) -> Path:
    """A file this command will write: its directory must exist and be writable, checked before any work."""
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a directory; give a file name")
    parent = path.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise argparse.ArgumentTypeError(f"cannot write {text}: {parent} is not a writable directory")
    return path


def batch_sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(s) for s in text.split(","))
    except ValueError:
        sizes = ()
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"expected batch sizes like 16 or 8,16,24, got {text!r}")
    return sizes


def cmd_bench(args: argparse.Namespace) -> int:
    from dare.benchmarks.single import check_prompt_lengths, format_table, parse_methods, run_bench, write_json
    from dare.benchmarks.workload import POOL_PATH, SPEC_PATH, check_segments, default_prompts, read_pool, read_prompts

    if args.backend == "vllm":
        require_vllm()
    settings = settings_from(args)
    if args.backend == "vllm":
        from dare.benchmarks.vllm import available_methods

        methods = available_methods(args.methods)
    else:
        methods = parse_methods(args.methods or DEFAULT_METHODS)
    pool_path = args.pool or POOL_PATH
    pool = read_pool(pool_path)
    prompts = read_prompts(args.prompts) if args.prompts else default_prompts(SPEC_PATH)
    check_segments(prompts, pool, args.prompts or SPEC_PATH)
    prompts = prompts[: args.limit] if args.limit else prompts
    lm = load_lm(settings)
    check_prompt_lengths(lm, prompts, settings.max_new_tokens, str(args.prompts or "default workload"))
    if args.backend == "vllm":
        from dare.benchmarks.vllm import format_vllm_table, run_vllm_bench
        from workers.engine import cached_default_model

        model_dir = Path(settings.model).expanduser() if settings.model else cached_default_model(settings.cache_dir)
        print(f"bench: {len(prompts)} prompts, {', '.join(methods)}; batch 1 and the whole backlog, {settings.max_new_tokens} "
              f"new tokens, pools from {pool_path}", file=sys.stderr, flush=True)
        report = run_vllm_bench(lm, model_dir, prompts, pool, methods, settings.max_new_tokens, settings.cache_dir,
                                repeat=args.repeat, eager=args.eager, k=args.draft_tokens)
        print(format_vllm_table(report))
    elif args.batch:
        from dare.benchmarks.batch import HF_SIZES, format_batch_table, run_batch_bench

        print(f"bench: {len(prompts)} prompts, batched hf-generate (sweep) vs batched DARE at batch {','.join(map(str, args.batch))}, "
              f"{settings.max_new_tokens} new tokens, pools from {pool_path}", file=sys.stderr, flush=True)
        report = run_batch_bench(lm, prompts, pool, args.batch, settings.max_new_tokens, settings.cache_dir,
                                 hf_sizes=args.hf_batch or HF_SIZES, repeat=args.repeat)
        print(format_batch_table(report))
    else:
        print(f"bench: {len(prompts)} prompts x {len(methods)} methods, {settings.max_new_tokens} new tokens, "
              f"pools from {pool_path}", file=sys.stderr, flush=True)
        report = run_bench(lm, prompts, pool, methods, settings.max_new_tokens, settings.cache_dir)
        print(format_table(report))
    if args.json:
        write_json(report, args.json)
        print(f"wrote {args.json}", file=sys.stderr)
    return 0


def cmd_load_bench(args: argparse.Namespace) -> int:
    from dare.benchmarks.load import DEFAULT_LOAD, git_commit, machine, merge_reports, parse_methods, run_load_bench
    from dare.benchmarks.workload import POOL_PATH, SPEC_PATH, check_segments, default_prompts, read_pool, read_prompts
    from dare.pipeline import pipeline, prepare_model

    if args.merge:
        report = merge_reports([json.loads(path.read_text()) for path in args.merge])
        return write_load_outputs(report, args)
    methods = parse_methods(args.methods)
    pool = read_pool(args.pool or POOL_PATH)
    prompts = read_prompts(args.prompts) if args.prompts else default_prompts(SPEC_PATH)
    check_segments(prompts, pool, args.prompts or SPEC_PATH)
    settings = settings_from(args)
    fractions = None if args.rates else list(args.load or DEFAULT_LOAD)
    threads = settings.threads or os.cpu_count() or 1
    prepare_model(settings, threads)
    with (args.trace.open("w") if args.trace else contextlib.nullcontext()) as trace, \
            pipeline(settings, "load-bench", timeout_s=1800) as run:
        report = run_load_bench(run, prompts, pool, methods, fractions, args.rates, args.prompts_per_point, args.batch,
                                settings.max_new_tokens, seed=args.seed, repeat=args.repeat, threads=threads,
                                saturation=args.saturation,
                                trace=(lambda entry: print(json.dumps(entry), file=trace, flush=True)) if trace else None)
    if args.trace:
        print(f"wrote {args.trace}", file=sys.stderr)
    report |= {"commit": git_commit(), "machine": machine(), "date": time.strftime("%Y-%m-%d"),
               "command": "dare load-bench " + " ".join(sys.argv[2:])}
    return write_load_outputs(report, args)


def write_load_outputs(report: dict, args: argparse.Namespace) -> int:
    from dare.benchmarks.load import format_table, plot, write_report

    print(format_table(report))
    if args.json:
        write_report(report, args.json)
        print(f"wrote {args.json}", file=sys.stderr)
    if args.plot:
        plot(report, args.plot)
        print(f"wrote {args.plot}", file=sys.stderr)
    return 0


def numbers(text: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        values = []
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive numbers like 0.5 or 0.5,0.8,1.2, got {text!r}")
    return values


def require_vllm() -> None:
    from workers.engine import require_vllm as check

    check()


def reexec_for_vllm() -> None:
    """vLLM's CPU kernels want Intel OpenMP preloaded and its thread count set before the process starts:
    start this command again with them, once."""
    from workers.engine import runtime_env

    env = runtime_env()
    if env is not None:
        log.info("restarting with vLLM's runtime environment", LD_PRELOAD=env["LD_PRELOAD"], OMP_NUM_THREADS=env["OMP_NUM_THREADS"])
        os.execve(sys.executable, [sys.executable, "-m", "dare.cli", *sys.argv[1:]], env)


def cmd_produce(args: argparse.Namespace) -> int:
    from dare.data import load_catalogue
    from dare.replay import catalogue_messages, file_messages, topic_for
    from infra.kafka import produce, wait_for_broker

    settings = settings_from(args)
    if args.source == "file":
        if not (args.file and args.type):
            print("dare produce file: --file and --type are required", file=sys.stderr)
            return 2
        topic = args.topic or topic_for(settings, {"UserEvent": "user_events", "ItemEvent": "item_events",
                                                   "PromptRequest": "prompts", "KnowledgeRecord": "knowledge"}.get(args.type, "prompts"))
        messages = list(file_messages(args.file, args.type))  # the whole file checked before anything is sent
    else:
        attribute, messages = catalogue_messages(load_catalogue(args.dataset, args.templates), args.source, args.limit, args.mode)
        topic = args.topic or topic_for(settings, attribute)
    wait_for_broker(settings)
    start = time.perf_counter()
    n = produce(settings, topic, messages)
    print(f"produced {n} messages to {topic} in {time.perf_counter() - start:.1f}s")
    return 0


def cmd_pool_builder(args: argparse.Namespace) -> int:
    from pool_builder.service import PoolBuilderService

    settings, stop = start_service(args)
    service = PoolBuilderService(settings, args.state_dir or settings.cache_dir / "pool-builder", segments=args.segments,
                                 pool_cap=args.pool_cap, neighbourhood=args.neighbourhood, refit_every_s=args.refit_every)
    service.run(stop)
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    from dare.synth import synth

    start = time.perf_counter()
    counts = synth(args.out, args.users, args.items, args.ratings, args.genres, seed=args.seed, progress=sys.stderr.isatty())
    print(f"wrote {args.out}/{args.out.name}.{{inter,item,user}}: {counts['users']:,} users, {counts['items']:,} items, "
          f"{counts['ratings']:,} ratings, {counts['genres']} genres in {time.perf_counter() - start:.1f}s")
    return 0


def cmd_workload(args: argparse.Namespace) -> int:

    from dare.benchmarks.workload import POOL_PATH, SPEC_PATH, make_pool_file, make_spec
    from dare.data import load_movielens

    settings = settings_from(args)
    spec = make_spec(load_movielens(), segments=args.segments, pool_size=args.pool_size, held_out=args.held_out)
    SPEC_PATH.write_text(json.dumps(spec, indent=1) + "\n")
    print(f"wrote {SPEC_PATH}", flush=True)
    n = make_pool_file(load_lm(settings), spec, settings.max_new_tokens, POOL_PATH)
    print(f"wrote {POOL_PATH} ({n} texts)")
    return 0


# ---------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dare", description="DARE: recommendation knowledge with LLMs, fast.")
    parser.add_argument("--log-format", choices=["auto", "json", "console"])
    parser.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("config", help="show the effective settings")
    p.add_argument("--markdown", action="store_true", help="print the DARE_* reference table")
    p.set_defaults(func=cmd_config)

    p = sub.add_parser("schemas", help="wire schemas")
    schemas_sub = p.add_subparsers(dest="schemas_command", required=True)
    e = schemas_sub.add_parser("export", help="write JSON Schema files")
    e.add_argument("dir")
    e.set_defaults(func=cmd_schemas)
    from schemas.examples import EXAMPLES

    e = schemas_sub.add_parser("example", help="print an example message of TYPE as it travels on its topic (one JSON line)")
    e.add_argument("type", choices=list(EXAMPLES))
    e.set_defaults(func=cmd_schema_example)

    p = sub.add_parser("broker", help="run the embedded Tansu broker in the foreground")
    p.add_argument("--port", type=port, default=9092)
    p.set_defaults(func=cmd_broker)

    p = sub.add_parser("generate", help="DARE (or greedy) on one prompt, or a catalogue's user or item: its text, tokens per step, tokens/s")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--prompt", help="the user message")
    which.add_argument("--user", help="a user id of the catalogue (its preference prompt)")
    which.add_argument("--item", help="an item id of the catalogue (its knowledge prompt)")
    add_catalogue_flags(p)
    p.add_argument("--mode", choices=MODES, default="ar", help="ar: the engine's greedy decoding (the worker's default); strict, relaxed: DARE")
    p.add_argument("--pool", type=Path, metavar="FILE",
                   help="JSONL, a \"text\" per line (a pool file like bench/pool.jsonl, or knowledge records such as "
                        "results/knowledge/ml-100k-ar.jsonl): the texts DARE drafts from, but the entity's own")
    p.add_argument("--compare", action="store_true", help="also decode greedily and print both speeds")
    add_model_flags(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("worker", help="generator worker: prompts topic → knowledge topic")
    add_kafka_flags(p)
    add_model_flags(p)
    p.add_argument("--mode", choices=MODES, default="ar", help="ar: the engine's greedy decoding; strict, relaxed: DARE")
    p.add_argument("--batch", type=positive_int, default=1, help="decode up to B prompts together (continuous batching; default 1)")
    p.add_argument("--max-prompts", type=positive_int, help="exit after this many prompts")
    p.add_argument("--idle-exit", type=seconds, help="exit after S seconds without a prompt (default: run until stopped)")
    p.add_argument("--metrics-port", type=port, help="serve /metrics (Prometheus), /healthz and /readyz on this port")
    p.add_argument("--backend", choices=["transformers", "vllm"], default="transformers",
                   help="vllm: DARE inside vLLM (continuous batching up to --batch; needs `make install-vllm`)")
    p.add_argument("--eager", action="store_true", help="with --backend vllm: no torch.compile in vLLM (starts ~2 min sooner, decodes slower)")
    p.add_argument("--vllm-method", choices=["dare", "greedy", "ngram", "suffix"], default="dare",
                   help="with --backend vllm: DARE inside vLLM (default), or vLLM's own greedy/ngram/suffix decoding for every prompt")
    p.add_argument("--no-learn", action="store_true",
                   help="nothing decoded earlier speeds up a later prompt: no generated text joins the pools (vLLM: no prefix "
                        "cache, suffix forgets answers); for benches that repeat prompts")
    p.set_defaults(func=cmd_worker)

    p = sub.add_parser("consume", help="print a topic's messages")
    add_kafka_flags(p)
    p.add_argument("topic", help="a topic name, or one of: knowledge, prompts, dead-letter, pools, ...")
    p.add_argument("--max", type=positive_int, help="stop after N messages")
    p.add_argument("--timeout", type=seconds, default=10.0, help="stop after S seconds without a message")
    p.add_argument("--json", action="store_true", help="print raw JSON values, one per line")
    p.set_defaults(func=cmd_consume)

    p = sub.add_parser("produce", help="a catalogue's events or user prompts (default MovieLens-100k), or a JSONL file of schema "
                                       "messages, into Kafka")
    add_kafka_flags(p)
    p.add_argument("source", choices=["user-events", "item-events", "prompts", "file"])
    add_catalogue_flags(p)
    p.add_argument("--limit", type=positive_int, help="first N only")
    p.add_argument("--mode", choices=MODES, help="prompts: decoding mode to ask for")
    p.add_argument("--file", type=Path, help="file: JSONL, one message per line")
    p.add_argument("--type", help="file: message type (UserEvent, ItemEvent, PromptRequest, KnowledgeRecord, ...)")
    p.add_argument("--topic", help="override the destination topic")
    p.set_defaults(func=cmd_produce)

    p = sub.add_parser("pool-builder", help="the pool-builder service: events and knowledge in, pools and assignments out; "
                                            "run several to split the users (one consumer group, the same flags)")
    add_kafka_flags(p)
    p.add_argument("--segments", type=positive_int, default=8, help="user segments (k-means k)")
    p.add_argument("--pool-cap", type=positive_int, default=64,
                   help="texts per segment pool (split evenly over its shards, one per user-events partition)")
    p.add_argument("--neighbourhood", type=non_negative, default=1.5,
                   help="users nearest each centroid whose knowledge enters its pool, x the mean segment size (0: members only)")
    p.add_argument("--refit-every", type=seconds, default=30.0, help="seconds between k-means re-fits while users grow")
    p.add_argument("--state-dir", type=Path, help="checkpoint directory, one file per partition held (default: "
                                                  "DARE_CACHE_DIR/pool-builder)")
    p.add_argument("--metrics-port", type=port, help="serve /metrics (Prometheus), /healthz and /readyz on this port")
    p.set_defaults(func=cmd_pool_builder)

    p = sub.add_parser("bench", help="hf-generate, pld, rest and DARE on the same prompts, side by side")
    add_model_flags(p)
    p.add_argument("--prompts", type=Path, help='JSONL lines {"id", "segment", "prompt"} (default: the MovieLens workload)')
    p.add_argument("--pool", type=Path, help='JSONL lines {"segment", "text"} (default: bench/pool.jsonl)')
    p.add_argument("--methods", help=f"comma-separated (default {DEFAULT_METHODS}; with --backend vllm: all of "
                                     "vllm-greedy,vllm-ngram,vllm-suffix,dare-strict,dare-relaxed,hf-dare-relaxed)")
    p.add_argument("--limit", type=positive_int, help="first N prompts only")
    p.add_argument("--batch", type=batch_sizes, metavar="B[,B...]",
                   help="batched: hf-generate at batch 1..32 (sweep) vs dare-ar/strict/relaxed at each batch size B")
    p.add_argument("--hf-batch", "--ar-batch", dest="hf_batch", type=batch_sizes, metavar="B[,B...]",
                   help="with --batch: the hf-generate sweep's batch sizes (default 1,2,4,8,16,32; batch 1, the reference, always runs once)")
    p.add_argument("--repeat", type=positive_int, default=1, metavar="N",
                   help="with --batch or --backend vllm: run every configuration N times, report medians")
    p.add_argument("--backend", choices=["transformers", "vllm"], default="transformers",
                   help="vllm: vLLM greedy/ngram/suffix vs DARE inside vLLM, batch 1 and the whole backlog (needs `make install-vllm`)")
    p.add_argument("--eager", action="store_true", help="with --backend vllm: no torch.compile in vLLM (starts ~2 min sooner, decodes slower)")
    p.add_argument("--draft-tokens", type=positive_int, default=8, metavar="K", help="with --backend vllm: most draft tokens per step (default 8)")
    p.add_argument("--json", type=output_file, help="write the full report here")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("load-bench", help="latency against offered load: Poisson arrivals through the broker and a real worker")
    add_kafka_flags(p)
    add_model_flags(p)
    p.add_argument("--prompts", type=Path, help='JSONL lines {"id", "segment", "prompt"} (default: the MovieLens workload)')
    p.add_argument("--pool", type=Path, help='JSONL lines {"segment", "text"} (default: bench/pool.jsonl)')
    p.add_argument("--methods", default="dare-ar,dare-strict,dare-relaxed",
                   help="comma-separated, the first sets the load fractions' 100%% (default dare-ar,dare-strict,dare-relaxed)")
    rates = p.add_mutually_exclusive_group()
    rates.add_argument("--load", type=numbers, metavar="F[,F...]",
                       help="offered loads as fractions of the first method's saturation rate (default 0.5,0.8,1.2)")
    rates.add_argument("--rates", type=numbers, metavar="R[,R...]", help="offered loads in prompts/s instead")
    p.add_argument("--saturation", type=positive_number, metavar="R",
                   help="with --load: the 100%% in prompts/s, from an earlier run (default: the first method's backlog, measured "
                        "first); an earlier report's rates_saturation_prompts_per_s gives its very arrivals")
    p.add_argument("--prompts-per-point", type=positive_int, default=60, metavar="N", help="prompts per (method, rate) point (default 60)")
    p.add_argument("--batch", type=positive_int, default=16, help="the worker's most rows decoded together (default 16)")
    p.add_argument("--repeat", type=positive_int, default=1, metavar="N", help="every point N times (rounds), medians reported")
    p.add_argument("--seed", type=int, default=0, help="arrival times and prompt order (default 0)")
    p.add_argument("--json", type=output_file, help="write the report (with a top-level \"points\" list) here")
    p.add_argument("--merge", type=Path, nargs="+", metavar="REPORT",
                   help="run nothing: merge these --json reports (e.g. this engine's and vLLM's) into one table, --json and --plot")
    p.add_argument("--plot", type=output_file, help="write latency against offered load (PNG) here")
    p.add_argument("--trace", type=output_file, help="write every prompt's figures here (JSONL: method, round, rate, sent_s, "
                                                     "latency_s, queue_s, decode_s, prefill_s, steps, ...)")
    p.set_defaults(func=cmd_load_bench)

    p = sub.add_parser("workload", help="regenerate the default benchmark workload (bench/workload.json, bench/pool.jsonl)")
    p.add_argument("action", choices=["make"])
    add_model_flags(p)
    p.add_argument("--segments", type=positive_int, default=4, help="user segments and item genres, each")
    p.add_argument("--pool-size", type=positive_int, default=32, help="pool texts per segment")
    p.add_argument("--held-out", type=positive_int, default=3, help="held-out prompts per segment")
    p.set_defaults(func=cmd_workload)

    p = sub.add_parser("data", help="catalogues: `synth` writes a synthetic one of any size in RecBole's atomic files")
    p.add_argument("action", choices=["synth"])
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="the catalogue directory (its name names the files)")
    p.add_argument("--users", type=positive_int, default=10_000, help="users (default 10,000)")
    p.add_argument("--items", type=positive_int, default=2_000, help="items (default 2,000)")
    p.add_argument("--ratings", type=positive_int, default=200_000, help="ratings (default 200,000)")
    p.add_argument("--genres", type=positive_int, default=18, help="genres (default 18)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_data)

    p = sub.add_parser("generate-all", help="knowledge for every user and item of a catalogue (default MovieLens-100k), "
                                            "through the pipeline (resumable)")
    add_kafka_flags(p)
    add_model_flags(p)
    p.add_argument("--mode", choices=MODES, default="strict",
                   help="decoding mode of every prompt (default strict: the greedy texts, lossless; relaxed is faster only "
                        "where a step is cheap, and its texts are more alike: docs/catalogue.md)")
    add_catalogue_flags(p)
    p.add_argument("--as-of", type=cut_off, default="eval", metavar="eval|none|TIMESTAMP",
                   help="user prompts list only ratings before this time: eval (default: the CTR test's train/validation "
                        "boundary, so no test-period rating reaches a prompt), none (every rating), or Unix seconds")
    p.add_argument("--out", type=output_file, help="JSONL of knowledge records (default results/knowledge/CATALOGUE-MODE.jsonl)")
    p.add_argument("--batch", type=positive_int, default=16, help="rows each worker decodes together (default 16)")
    add_pipeline_flags(p)
    p.add_argument("--users", type=positive_int, help="only the first N users")
    p.add_argument("--items", type=positive_int, help="only the first N items")
    p.add_argument("--max-entities", type=positive_int, help="ask for at most N entities in this run (the rest: next run)")
    p.add_argument("--stall-timeout", type=seconds, default=600.0, help="give up after S seconds without a new record")
    p.set_defaults(func=cmd_generate_all)

    p = sub.add_parser("eval", help="downstream checks of generated knowledge")
    eval_sub = p.add_subparsers(dest="eval_command", required=True)
    e = eval_sub.add_parser("quality", help="CTR AUC/LogLoss with no knowledge, controls, ar and relaxed knowledge (DeepFM, "
                                            "seeds; whole test set and cold start), text metrics")
    add_catalogue_flags(e)
    e.add_argument("--ar", type=Path, help="ar knowledge JSONL (default results/knowledge/CATALOGUE-ar.jsonl)")
    e.add_argument("--relaxed", type=Path, help="relaxed knowledge JSONL (default results/knowledge/CATALOGUE-relaxed.jsonl)")
    e.add_argument("--also", type=Path, action="append", metavar="FILE",
                   help="another knowledge file to compare with ar (repeatable), named by its summary: e.g. a guarded "
                        "relaxed run becomes relaxed-top1-0.5")
    e.add_argument("--seeds", type=positive_int, default=5, help="seeds per variant (default 5)")
    e.add_argument("--json", type=output_file, default=Path("results/quality.json"), help="the report (default results/quality.json)")
    e.add_argument("--plot", type=output_file, default=Path("results/quality.png"), help="AUC per variant (default results/quality.png)")
    e.set_defaults(func=cmd_eval_quality)

    p = sub.add_parser("demo", help="the pipeline end to end on the embedded broker (or --bootstrap-servers)")
    add_kafka_flags(p)
    add_model_flags(p)
    p.add_argument("--limit", type=positive_int, default=3, help="seed/DARE prompt pairs (2 x N prompts in all)")
    add_pipeline_flags(p)
    p.add_argument("--json", type=output_file, help="write the summary here")
    p.add_argument("--records", type=output_file, help="knowledge records as JSONL (default ./demo-knowledge.jsonl)")
    p.add_argument("--timeout", type=seconds, default=600.0, help="seconds each phase may take before the demo gives up")
    p.set_defaults(func=cmd_demo)
    return parser


def one_line(exc: BaseException) -> str:
    """What went wrong, in one line that names the input at fault."""
    from kafka.errors import KafkaError

    from dare.benchmarks.workload import WorkloadError
    from dare.data import DataError
    from dare.generate_all import GenerateError
    from dare.pipeline import PipelineError
    from infra.broker import BrokerError
    from infra.kafka import BrokerUnavailable
    from infra.reader import UnknownTopic
    from pool_builder.checkpoint import CheckpointVersionError
    from schemas import SchemaError
    from workers.engine import ModelLoadError, VllmMissing

    if isinstance(exc, ValidationError):
        return "; ".join(f"{'.'.join(map(str, e['loc'])) or 'value'}: {e['msg']} (got {e.get('input')!r})" for e in exc.errors())
    if isinstance(exc, OSError) and exc.filename:
        return f"{exc.filename}: {exc.strerror or exc} (check the path and its permissions)"
    if isinstance(exc, KafkaError):
        return f"Kafka: {exc!r}; is the broker at DARE_BOOTSTRAP_SERVERS / --bootstrap-servers up?"
    if isinstance(exc, (ModelLoadError, BrokerError, BrokerUnavailable, DataError, PipelineError, GenerateError, WorkloadError, SchemaError,
                        CheckpointVersionError, UnknownTopic, VllmMissing)):
        return str(exc).replace("\n", " ")
    return f"unexpected error: {exc!r} (run with --log-level debug for the traceback)"


# Commands whose output is made to be piped: `dare consume ... | head` ends quietly, like any Unix tool.
# Everything else keeps Python's SIGPIPE handling: a service (worker, pool builder, broker, demo, the
# bench's engines) that writes to a closed socket or pipe gets an error it can handle instead of dying
# silently (a vLLM worker died so, exit status -13, while compiling).
PIPED_COMMANDS = ("config", "schemas", "consume", "generate")


def pipe_signal(command: str) -> None:
    if command in PIPED_COMMANDS and hasattr(signal, "SIGPIPE"):
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    pipe_signal(args.command)
    if args.command in ("worker", "pool-builder"):
        from infra.process import die_with_parent

        die_with_parent()
    debug = args.log_level == "debug" or os.environ.get("DARE_LOG_LEVEL", "").lower() == "debug"
    try:
        settings = load_settings(log_format=args.log_format, log_level=args.log_level)
    except ValidationError as exc:
        print(f"dare: bad configuration: {one_line(exc)}", file=sys.stderr)
        return 2
    configure_logging(settings.log_format, settings.log_level)
    start = time.perf_counter()
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # noqa: BLE001 (every failure ends in one line on stderr; the traceback with debug logging)
        if debug:
            traceback.print_exc()
        print(f"dare {args.command}: {one_line(exc)}", file=sys.stderr)
        return 1
    finally:
        log.debug("command finished", command=args.command, wall_s=round(time.perf_counter() - start, 2))


if __name__ == "__main__":
    sys.exit(main())
