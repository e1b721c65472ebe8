"""What can be checked of the docker compose file without a Docker engine, and the settings."""

from pathlib import Path

import pytest
import yaml

from infra.kafka import client_config, redacted
from infra.settings import Settings, settings_markdown

COMPOSE = Path(__file__).resolve().parents[1] / "infra" / "kafka.yml"


def test_compose_file_is_a_single_kraft_kafka_on_9092():
    spec = yaml.safe_load(COMPOSE.read_text())
    kafka = spec["services"]["kafka"]
    assert kafka["image"].startswith("apache/kafka:")
    assert "9092:9092" in kafka["ports"]
    env = kafka["environment"]
    assert env["KAFKA_PROCESS_ROLES"] == "broker,controller"
    assert "CONTROLLER" in env["KAFKA_CONTROLLER_LISTENER_NAMES"]
    assert env["KAFKA_ADVERTISED_LISTENERS"] == "PLAINTEXT://localhost:9092"
    assert "healthcheck" in kafka and kafka["healthcheck"]["test"]


def test_settings_come_from_dare_environment(monkeypatch):
    monkeypatch.setenv("DARE_BOOTSTRAP_SERVERS", "k1:9092,k2:9092")
    monkeypatch.setenv("DARE_TOPIC_PREFIX", "prod.")
    settings = Settings()
    assert settings.bootstrap_servers == "k1:9092,k2:9092"
    assert client_config(settings, "x")["bootstrap_servers"] == ["k1:9092", "k2:9092"]
    assert Settings(topic_prefix="flag.").topic_prefix == "flag."  # flags win over the environment


def test_bad_environment_value_is_rejected(monkeypatch):
    monkeypatch.setenv("DARE_SECURITY_PROTOCOL", "CARRIER_PIGEON")
    with pytest.raises(ValueError, match="security_protocol"):
        Settings()


def test_sasl_options_pass_through_and_never_print(monkeypatch):
    monkeypatch.setenv("DARE_SASL_PASSWORD", "hunter2")
    settings = Settings(bootstrap_servers="k:9093", security_protocol="SASL_SSL", sasl_mechanism="PLAIN", sasl_username="svc")
    config = client_config(settings, "worker")
    assert config["sasl_plain_password"] == "hunter2"
    assert config["security_protocol"] == "SASL_SSL"
    assert "hunter2" not in repr(settings) and "hunter2" not in str(redacted(config))


def test_configuration_table_lists_every_setting():
    table = settings_markdown()
    for name in Settings.model_fields:
        assert f"`DARE_{name.upper()}`" in table


def test_readme_configuration_table_is_current():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    table = readme.split("<!-- config:start -->\n")[1].split("<!-- config:end -->")[0].strip()
    assert table == settings_markdown().strip(), "regenerate with: dare config --markdown"
