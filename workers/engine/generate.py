"""DARE on a list of prompts, in one's own process: texts in, texts out, batched, no Kafka.

    lm = load_model(None, "cpu", "float32", cache_dir)           # the packaged SmolLM2-135M, or a model directory
    engine = open_engine("transformers", lm, cache_dir)          # measures this device's cost curve once (cached)
    outputs = generate(engine, lm.tokenizer, prompts, pool_texts, mode="strict", max_new_tokens=128)

Every prompt is a user message (the chat template is applied); `pool_texts` are knowledge texts already
written for similar entities, one pool for all prompts (a job with segments calls this once per segment).
The request's own prompt and output draft too. `strict` returns greedy decoding's tokens in fewer steps;
`relaxed` accepts the model's second choice where likely enough; `ar` is greedy.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from workers.engine.algorithm.draft import DraftConfig, Source
from workers.engine.algorithm.texts import PoolTexts
from workers.engine.backends.transformers import Output
from workers.engine.runtime.model import chat_input_ids


def generate(engine: Any, tokenizer: Any, prompts: Sequence[str], pool_texts: Iterable[str] = (), mode: str = "strict",
             max_new_tokens: int = 128, rows: int = 16) -> list[Output]:
    """Each prompt's knowledge text, in the prompts' order, decoded `rows` at a time by `engine` (an `open_engine`
    result) drafting from one pool of `pool_texts`. `Output.stats` holds steps, tokens per step and times."""
    engine.mode_for(mode)  # an unknown mode fails here, before any work
    if rows < 1 or max_new_tokens < 1:
        raise ValueError(f"rows and max_new_tokens must be at least 1, not {rows} and {max_new_tokens}")
    texts = [t for t in pool_texts if t.strip()]
    sources: list[Source] = [(PoolTexts(tokenizer, DraftConfig()).pool(texts), 1.0)] if texts else []
    inputs = [chat_input_ids(tokenizer, p) for p in prompts]
    for n, ids in enumerate(inputs):
        if len(ids) + max_new_tokens > engine.context_limit:
            raise ValueError(f"prompt {n}: {len(ids)} tokens + {max_new_tokens} new exceed the model's context of {engine.context_limit}")
    decoder = engine.decoder(min(rows, max(1, len(inputs))))
    results: dict[int, Output] = {}
    waiting = list(enumerate(inputs))
    while waiting or len(decoder):
        while waiting and len(decoder) < rows:  # never more than `rows` held: the cache is sized for them
            n, ids = waiting.pop(0)
            decoder.add(n, ids, max_new_tokens, mode, sources)
        for finished in decoder.step():
            results[finished.key] = Output(finished.token_ids, tokenizer.decode(finished.token_ids, skip_special_tokens=True),
                                           finished.stats)
    return [results[n] for n in range(len(inputs))]
