"""The downstream test's machinery: the CTR pipeline finds a planted signal in the knowledge vectors,
and finds nothing where there is none."""

import numpy as np
import pytest

from dare.quality import CTRData, auc, compare, logloss, train_and_test


def synthetic(signal: bool, users: int = 1500, items: int = 1500, rows: int = 24_000, dim: int = 24, seed: int = 0):
    """Ratings whose labels follow the dot product of hidden user and item vectors (or coin flips);
    the hidden vectors, with noise, are the entities' knowledge. Few rows per id: the ids alone
    cannot learn the interaction, the knowledge can."""
    rng = np.random.default_rng(seed)
    hidden_u, hidden_i = rng.standard_normal((users, dim)), rng.standard_normal((items, dim))
    u, i = rng.integers(0, users, rows), rng.integers(0, items, rows)
    p = 1 / (1 + np.exp(-2.5 * (hidden_u[u] * hidden_i[i]).sum(1) / np.sqrt(dim))) if signal else np.full(rows, 0.5)
    labels = (rng.random(rows) < p).astype(np.float32)
    fields = np.stack([u, i, rng.integers(0, 3, rows), rng.integers(0, 2, rows), rng.integers(0, 4, rows),
                       rng.integers(0, 6, rows)], 1).astype(np.int64)
    order = rng.permutation(rows)
    data = CTRData(fields, np.zeros((rows, 2), np.float32), labels, u, i, [users, items, 3, 2, 4, 6],
                   order[: int(0.8 * rows)], order[int(0.8 * rows) : int(0.9 * rows)], order[int(0.9 * rows) :])
    noise = 0.3
    knowledge = ((hidden_u + noise * rng.standard_normal(hidden_u.shape)).astype(np.float32),
                 (hidden_i + noise * rng.standard_normal(hidden_i.shape)).astype(np.float32))
    return data, knowledge


def test_auc_and_logloss_against_hand_computed_values():
    labels = np.array([0, 0, 1, 1], np.float32)
    assert auc(labels, np.array([0.1, 0.4, 0.35, 0.8])) == pytest.approx(0.75)
    assert auc(labels, np.array([0.5, 0.5, 0.5, 0.5])) == pytest.approx(0.5)
    assert logloss(labels, np.array([0.5, 0.5, 0.5, 0.5])) == pytest.approx(np.log(2))


def test_a_planted_signal_in_the_knowledge_is_found():
    data, knowledge = synthetic(signal=True)
    with_knowledge = train_and_test(data, knowledge, seed=0, epochs=8, batch=256)
    without = train_and_test(data, None, seed=0, epochs=8, batch=256)
    assert with_knowledge["auc"] > 0.65, with_knowledge  # an oracle with the noisy knowledge reaches 0.86 here
    assert with_knowledge["auc"] > without["auc"] + 0.1, (with_knowledge, without)


def test_no_signal_gives_about_half():
    data, knowledge = synthetic(signal=False)
    result = train_and_test(data, knowledge, seed=0, epochs=8, batch=256)
    assert 0.45 < result["auc"] < 0.55, result


def test_compare_pairs_relaxed_with_ar_per_seed():
    data, knowledge = synthetic(signal=True, rows=6_000, users=400, items=400)
    report = compare(data, {"none": None, "ar": knowledge, "relaxed": knowledge}, seeds=2)
    assert set(report["variants"]) == {"none", "ar", "relaxed"}
    assert len(report["variants"]["ar"]["auc"]) == 2
    assert report["relaxed_vs_ar"]["auc_diffs"] == pytest.approx([0.0, 0.0])  # same vectors, same seeds: identical runs
