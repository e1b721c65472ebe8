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
    # 2,400 test rows, a signal planted to be found by a wide margin: over training seeds 0-3 the model reached
    # 0.679-0.686 with the knowledge and 0.488-0.497 without (an oracle with the noisy knowledge: 0.86)
    assert with_knowledge["auc"] > 0.62, with_knowledge
    assert with_knowledge["auc"] > without["auc"] + 0.1, (with_knowledge, without)


def test_no_signal_gives_about_half():
    data, knowledge = synthetic(signal=False)
    result = train_and_test(data, knowledge, seed=0, epochs=8, batch=256)
    assert 0.45 < result["auc"] < 0.55, result  # seeds 0-3: 0.492-0.520 (coin flips on 2,400 rows: sd ~0.012)


def test_compare_pairs_relaxed_with_ar_per_seed():
    data, knowledge = synthetic(signal=True, rows=6_000, users=400, items=400)
    report = compare(data, {"none": None, "ar": knowledge, "relaxed": knowledge}, seeds=2)
    assert set(report["variants"]) == {"none", "ar", "relaxed"}
    assert len(report["variants"]["ar"]["auc"]) == 2
    assert report["relaxed_vs_ar"]["auc_diffs"] == pytest.approx([0.0, 0.0])  # same vectors, same seeds: identical runs


def test_cold_start_rows_are_test_rows_of_rarely_seen_users_or_items():
    data, _ = synthetic(signal=True, rows=6_000, users=400, items=400)
    seen_u = np.bincount(data.user_index[data.train], minlength=400)
    seen_i = np.bincount(data.item_index[data.train], minlength=400)
    assert data.cold is not None and 0 < len(data.cold) < len(data.test) and set(data.cold) <= set(data.test)
    assert all(seen_u[data.user_index[r]] <= 5 or seen_i[data.item_index[r]] <= 5 for r in data.cold)
    warm = np.setdiff1d(data.test, data.cold)
    assert all(seen_u[data.user_index[r]] > 5 and seen_i[data.item_index[r]] > 5 for r in warm)


def test_the_shuffled_control_moves_every_vector_to_another_entity():
    from dare.quality import shuffled

    users = np.arange(40, dtype=np.float32).reshape(10, 4) + 1
    users[3] = 0.0  # an entity without knowledge keeps none
    items = np.arange(20, dtype=np.float32).reshape(5, 4) + 1
    u, i = shuffled((users, items))
    assert not u[3].any() and sorted(map(tuple, u)) == sorted(map(tuple, users)) and sorted(map(tuple, i)) == sorted(map(tuple, items))
    assert (u != users).any(1).sum() >= 7  # almost every entity now holds another's vector


def test_the_95_interval_of_paired_differences():
    from dare.quality import interval

    low, high = interval([0.001, 0.003, 0.002, 0.004, 0.000])
    assert low == pytest.approx(0.002 - 2.776 * 0.0015811 / 5 ** 0.5, abs=1e-5) and high == pytest.approx(0.004 - low, abs=1e-9)


def test_compare_reports_intervals_and_the_cold_start_slice():
    data, knowledge = synthetic(signal=True, rows=6_000, users=400, items=400)
    report = compare(data, {"none": None, "ar": knowledge, "relaxed": knowledge}, seeds=2)
    assert report["relaxed_vs_ar"]["ci95"] == pytest.approx([0.0, 0.0])
    assert report["relaxed_vs_ar_cold_start"]["ci95"] == pytest.approx([0.0, 0.0])
    assert set(report["cold_start"]) == {"none", "ar", "relaxed"} and report["cold_start_rows"] == len(data.cold)
    cold = report["cold_start"]["ar"]  # 21 cold rows: their AUC is reported, its value decides nothing
    assert len(cold["auc"]) == 2 and all(0.0 <= a <= 1.0 for a in cold["auc"]) and cold["auc_mean"] == pytest.approx(sum(cold["auc"]) / 2)
    assert len(report["variants"]["ar"]["auc_ci95"]) == 2


def test_text_metrics_see_templates_loops_and_copies():
    from dare.text_metrics import longest_copied_spans, text_metrics, words

    varied = ["A quiet drama about two brothers in Ohio.", "Loud action with cars and a heist in Rome.",
              "Gentle comedy of a baker who sings.", "Dark thriller set on a night train."]
    templated = ["I analyzed their preferences. They like drama.", "I analyzed their preferences. They like action.",
                 "I analyzed their preferences. They like comedy.", "I analyzed their preferences. They like thrillers."]
    v, t = text_metrics(varied, [9, 10, 8, 8], cap=10), text_metrics(templated, [8, 8, 8, 8], cap=10)
    assert v["shared_first_sentence"] == 0.0 and t["shared_first_sentence"] == 1.0
    assert v["distinct_2"] > t["distinct_2"] and v["copied_span_mean"] < t["copied_span_mean"]
    assert v["truncated"] == 0.25 and text_metrics(varied, [1, 1, 1, 1], cap=None)["truncated"] is None
    looping = text_metrics(["it is a film that is a film that is a film that is a film"], [14], cap=96)
    assert looping["repeated_6gram"] > 0.5 and v["repeated_6gram"] == 0.0
    assert longest_copied_spans([words("a b c d e"), words("x b c d y"), words("q r s")]) == [3, 3, 0]


def write_knowledge(path, catalogue, mode, text_of, as_of, relaxed_max_top1=None, prompt_version=None):
    """A knowledge file and its summary, as `dare generate-all` writes them, with texts from `text_of`."""
    import json

    from schemas import DecodeStats, KnowledgeRecord

    records = [KnowledgeRecord(request_id=f"{mode}-{kind}-{e}", entity_kind=kind, entity_id=e, text=text_of(kind, e), token_count=12,
                               mode=mode, model="m", stats=DecodeStats(steps=12, new_tokens=12, mean_accepted=1.0, wall_s=0.1),
                               worker="w")
               for kind, ids in (("user", catalogue.user_ids()), ("item", catalogue.item_ids())) for e in ids]
    path.write_text("".join(r.model_dump_json() + "\n" for r in records))
    summary = {"as_of": as_of, "tokens_per_s": 10.0, "wall_s": 1.0, "mean_accepted": 1.0, "entities": len(records),
               "runs": [{"max_new_tokens": 12}], "mode": mode}
    if relaxed_max_top1 is not None:
        summary["relaxed_max_top1"] = relaxed_max_top1
    if prompt_version is not None:
        summary["prompt_version"] = prompt_version
    path.with_name(path.name.removesuffix(".jsonl") + ".summary.json").write_text(json.dumps(summary))


def test_the_downstream_test_on_a_catalogue_of_ones_own(shop_files, tmp_path):
    """`dare eval quality --dataset`: every variant, the controls, the cold-start slice, intervals, the cut-off
    check and the text metrics, on the synthetic shop (its knowledge: what category each entity is about)."""
    from dare.data import load_catalogue
    from dare.quality import format_report, interval, other_templates, plot, run_quality, variant_name

    shop = load_catalogue(*shop_files)
    category = {i: shop.items[i].genres[0] for i in shop.item_ids()}
    favourite = {u: category[shop.by_user[u][-1].item_id] for u in shop.user_ids()}
    text = lambda kind, e: f"They like {favourite[e]} things." if kind == "user" else f"A {category[e]} product."
    write_knowledge(tmp_path / "shop-ar.jsonl", shop, "ar", text, shop.time_cut(0.8))
    write_knowledge(tmp_path / "shop-relaxed.jsonl", shop, "relaxed", text, None)  # prompts from every rating: leaking
    guarded = tmp_path / "shop-relaxed-top1-0.5.jsonl"  # a guarded run whose texts lost the category: no signal left
    write_knowledge(guarded, shop, "relaxed", lambda kind, e: "Some things." if kind == "user" else "A product.", shop.time_cut(0.8),
                    relaxed_max_top1=0.5)
    assert variant_name(guarded) == "relaxed-top1-0.5" and variant_name(tmp_path / "shop-ar.jsonl") == "ar"
    kar = tmp_path / "shop-kar-ar.jsonl"  # made with other templates: named after them, no prompt-only control of its own here
    write_knowledge(kar, shop, "ar", text, shop.time_cut(0.8), prompt_version="kar-00000000")
    assert variant_name(kar, shop.templates.version) == "ar-kar" and variant_name(kar) == "ar"
    assert other_templates(shop, "kar-00000000") is None and other_templates(shop, "mine-12345678") is None
    report = run_quality(tmp_path / "shop-ar.jsonl", tmp_path / "shop-relaxed.jsonl", seeds=2, catalogue=shop,
                         extra={"relaxed-top1-0.5": guarded})
    assert list(report["variants"]) == ["none", "prompt-only", "shuffled", "ar", "relaxed", "relaxed-top1-0.5"]
    # The paired difference is the guarded run's AUC minus ar's, seed by seed, with its mean and interval: checked as
    # arithmetic, not as an outcome (18 test rows and 2 seeds decide nothing; the AUCs move with the CPU's rounding).
    guarded_vs_ar = report["relaxed-top1-0.5_vs_ar"]
    diffs = [g - a for g, a in zip(report["variants"]["relaxed-top1-0.5"]["auc"], report["variants"]["ar"]["auc"], strict=True)]
    assert guarded_vs_ar["auc_diffs"] == pytest.approx(diffs) and len(diffs) == 2
    assert guarded_vs_ar["auc_diff_mean"] == pytest.approx(sum(diffs) / 2) and guarded_vs_ar["ci95"] == pytest.approx(interval(diffs))
    assert report["text"]["relaxed-top1-0.5"]["distinct_2"] < report["text"]["ar"]["distinct_2"]
    assert "relaxed-top1-0.5 - ar AUC" in format_report(report)
    assert set(report["cold_start"]) == set(report["variants"]) and report["setup"]["dataset"] == "shop"
    assert report["relaxed_vs_ar"]["ci95"] == pytest.approx([0.0, 0.0])  # the same texts: the same vectors, the same runs
    assert report["as_of"]["leaking"] == ["relaxed"] and report["as_of"]["boundary"] == shop.time_cut(0.8)
    ar = report["text"]["ar"]
    assert ar["texts"] == 42 and ar["by_kind"]["user"]["texts"] == 30 and ar["truncated"] == 1.0  # 12 tokens of 12
    assert ar["by_kind"]["user"]["shared_first_sentence"] >= 0.9  # 30 customers, 4 categories: openings shared
    assert "LEAKING" in format_report(report)
    plot(report, tmp_path / "quality.png")
    assert (tmp_path / "quality.png").stat().st_size > 10_000
