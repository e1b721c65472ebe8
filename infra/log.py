"""structlog set-up: JSON lines for services, readable lines on a terminal.

Context such as request id, topic, partition and offset is bound with
`structlog.contextvars.bound_contextvars(...)` around the work it describes.
"""

from __future__ import annotations

import logging
import sys

import structlog


class _CurrentStderr:
    """Writes to whatever sys.stderr is now (test runners and the demo swap it)."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()

    def isatty(self) -> bool:
        return sys.stderr.isatty()


def configure_logging(log_format: str = "auto", level: str = "info", stream=None) -> None:
    stream = stream or _CurrentStderr()
    as_json = log_format == "json" or (log_format == "auto" and not stream.isatty())
    renderer = structlog.processors.JSONRenderer() if as_json else structlog.dev.ConsoleRenderer(colors=stream.isatty())
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level.upper())),
        logger_factory=structlog.PrintLoggerFactory(stream),
        cache_logger_on_first_use=False,
    )
    # kafka-python logs through stdlib logging; keep its chatter at warnings.
    logging.basicConfig(level=logging.WARNING, stream=stream, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("kafka", "transformers", "accelerate"):
        logging.getLogger(noisy).setLevel(logging.WARNING if level != "debug" else logging.INFO)
    # kafka-python's connection layer logs every refused connection and its own event-loop timing;
    # our clients say what matters (retries, "no broker answered"), so it speaks only at debug level.
    logging.getLogger("kafka.net").setLevel(logging.CRITICAL if level != "debug" else logging.INFO)
