"""The dashboard and alert rules in infra/monitoring/ load, and every metric they query is one the services export."""

import json
import re
from pathlib import Path

import yaml
from prometheus_client import REGISTRY

MONITORING = Path(__file__).parents[1] / "infra" / "monitoring"
SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"), "gauge": ("",)}


def exported() -> set[str]:
    """The sample names the worker and the pool builder export (labelled metrics included before their first use)."""
    import pool_builder.service  # noqa: F401 (their metrics register on import)
    import workers.service  # noqa: F401

    return {family.name + suffix for family in REGISTRY.collect() if family.name.startswith("dare_")
            for suffix in SUFFIXES.get(family.type, ("",))}


def queried(exprs: list[str]) -> set[str]:
    return {name for expr in exprs for name in re.findall(r"\bdare_[a-z_]+", expr)}


def test_the_dashboard_queries_only_exported_metrics():
    dashboard = json.loads((MONITORING / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    names = queried(exprs)
    assert names and names <= exported(), names - exported()
    titles = " ".join(p["title"].lower() for p in dashboard["panels"])
    assert all(word in titles for word in ("latency", "lag", "acceptance", "dead letters", "ready", "per second"))


def test_the_alert_rules_query_only_exported_metrics():
    rules = [rule for group in yaml.safe_load((MONITORING / "alerts.yml").read_text())["groups"] for rule in group["rules"]]
    names = queried([rule["expr"] for rule in rules])
    assert names and names <= exported(), names - exported()
    assert {"DarePromptLagGrowing", "DareDeadLetters", "DareWorkerNotReady"} <= {rule["alert"] for rule in rules}
    assert all(rule["annotations"]["summary"] for rule in rules)


def test_a_misspelt_metric_is_caught():
    assert queried(["rate(dare_worker_promts_total[5m])"]) - exported() == {"dare_worker_promts_total"}
