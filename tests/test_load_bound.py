"""bench/load_bound.py's ideal server: latencies worked out by hand."""

import importlib.util
from pathlib import Path

import pytest

spec = importlib.util.spec_from_file_location("load_bound", Path(__file__).parents[1] / "bench" / "load_bound.py")
load_bound = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
spec.loader.exec_module(load_bound)  # type: ignore[union-attr]


def test_one_row_serves_in_order_of_arrival():
    # 2 s of work each; the second waits for the first, the third arrives after both are done
    assert load_bound.serve([0.0, 1.0, 10.0], 2.0, rows=1) == pytest.approx([2.0, 3.0, 2.0])


def test_rows_share_the_rate():
    # two at once share the rate: both done at 4 s
    assert load_bound.serve([0.0, 0.0], 2.0, rows=2) == pytest.approx([4.0, 4.0])
    # 0-1 s: the first alone (1 s of work left); 1-3 s: both at half speed, the first done; 3-4 s: the second alone
    assert load_bound.serve([0.0, 1.0], 2.0, rows=2) == pytest.approx([3.0, 3.0])
    # the third waits for a free row: alone from 4 s, done at 6 s
    assert load_bound.serve([0.0, 0.0, 0.0], 2.0, rows=2) == pytest.approx([4.0, 4.0, 6.0])
