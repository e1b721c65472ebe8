"""The floors (docs/design.md, "Floors"): import-linter's contracts in pyproject.toml hold for the
code, and they catch an upward import, a sibling-service import, and Kafka in the engine."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("schemas", "infra", "workers", "pool_builder", "dare")


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    """import-linter over the packages under `root` (put first on the path, ahead of the installed ones)."""
    env = os.environ | {"PYTHONPATH": str(root)}
    return subprocess.run([str(Path(sys.executable).with_name("lint-imports")), str(root / "pyproject.toml"), "--no-cache"],
                          cwd=root, env=env, capture_output=True, text=True, timeout=120, check=False)


def test_every_module_imports_only_downward():
    result = lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Contracts: 5 kept, 0 broken" in result.stdout


@pytest.mark.parametrize("module, line, broken", [
    ("infra/kafka.py", "import dare.cli", "floors"),
    ("pool_builder/service.py", "import workers.service", "floors"),
    ("workers/engine/algorithm/trie.py", "import kafka", "the engine imports neither"),
    ("workers/engine/backends/transformers.py", "import workers.pools", "inside workers"),
    ("workers/engine/algorithm/draft.py", "import workers.engine.runtime.model", "inside the engine"),
    ("workers/engine/runtime/lean.py", "import workers.engine.backends.batch", "inside the engine"),
    ("dare/generate_all.py", "import workers.engine.runtime.model", "outside the engine"),
])
def test_the_contracts_catch_a_wrong_import(tmp_path, module, line, broken):
    for package in PACKAGES:
        shutil.copytree(ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    with (tmp_path / module).open("a") as f:
        f.write(f"\n{line}  # noqa\n")
    result = lint_imports(tmp_path)
    assert result.returncode != 0
    assert any(line.startswith(broken) and line.endswith("BROKEN") for line in result.stdout.splitlines()), result.stdout
