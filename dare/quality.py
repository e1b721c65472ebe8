"""`dare eval quality`: is relaxed knowledge as useful downstream as greedy knowledge? (KAR style)

CTR task on MovieLens-100k (or any catalogue with ratings, `dare.data`): label = rating >= 4. Split by time over all ratings: the oldest 80 %
train, the next 10 % validate (early stopping), the newest 10 % test: the model predicts the
future from the past, as it would in production (a random split leaks later tastes into training).

Model: DeepFM (Guo et al. 2017): a first-order term, a factorisation machine over every pair of
field embeddings, and an MLP over their concatenation, summed into one logit. Chosen because it is
the standard small CTR baseline that KAR also reports, and its FM part models the user x item
interaction that knowledge is meant to sharpen, while it trains in seconds on two cores. Fields:
user id, item id, age bucket, gender, occupation, release-year bucket, genres (mean of their
embeddings). Knowledge enters as in KAR: each entity's text encoded once by the packaged MiniLM
(384-d, frozen), then a small adaptor MLP per side (384 → 64 → field size) whose output is one more
field for the user and one for the item, trained with the CTR model.

Variants: none (no knowledge fields); two controls that tell whether the LLM added anything —
prompt-only (each entity's prompt itself, as of the train/validation boundary, encoded the same way: what
the LLM was given, without the LLM) and shuffled (each entity gets another entity's ar vector: knowledge-
shaped input with no link to the entity) —; ar and relaxed, and any other knowledge file given (`--also`: a
guarded relaxed run, say). Each seed trains every variant on the same split
from the same seed, so relaxed and ar differ only in the texts behind their knowledge vectors. Reported on
the whole test set and on its cold-start slice (test rows whose user or item has at most `COLD_START`
training rows), each as AUC and LogLoss (mean ± std over seeds) and, for relaxed − ar (and each other file − ar),
the paired per-seed differences with a 95 % t interval. Also: text metrics per mode and entity kind (`dare.text_metrics`),
agreement between the two files (MiniLM cosine, length ratio, share identical), and the files' prompt cut-off
(`as_of`), checked against the test's boundary: a file whose prompts saw later ratings is reported as leaking.
"""

from __future__ import annotations

import copy
import json
import statistics
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from dare.data import (
    EVAL_TRAIN_SHARE,
    Catalogue,
    DataError,
    item_prompt,
    load_movielens,
    packaged_templates,
    read_templates,
    templates_dir,
    user_prompt,
)
from dare.text_metrics import text_metrics
from schemas import KnowledgeRecord, decode

FIELD_DIM = 16
AGE_BUCKETS = (18, 25, 35, 45, 50, 56)
COLD_START = 5  # a test row is cold-start when its user or its item has at most this many training rows


@dataclass
class CTRData:
    """Rows of categorical fields and labels, already split; `knowledge` maps a side to a matrix
    with one vector per user (or item) index."""

    fields: np.ndarray  # int64 [rows, n_fields]
    genres: np.ndarray  # float32 [rows, n_genres], rows normalised to mean pooling
    labels: np.ndarray  # float32 [rows]
    user_index: np.ndarray  # int64 [rows] (also fields[:, 0])
    item_index: np.ndarray  # int64 [rows]
    cardinalities: list[int]
    train: np.ndarray  # row indices
    valid: np.ndarray
    test: np.ndarray
    cold: np.ndarray | None = None  # the test rows whose user or item is cold-start (row indices)

    def __post_init__(self) -> None:
        if self.cold is None:
            seen_u = np.bincount(self.user_index[self.train], minlength=self.cardinalities[0])
            seen_i = np.bincount(self.item_index[self.train], minlength=self.cardinalities[1])
            test_u, test_i = self.user_index[self.test], self.item_index[self.test]
            self.cold = self.test[(seen_u[test_u] <= COLD_START) | (seen_i[test_i] <= COLD_START)]


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve by the rank statistic (ties get their mean rank)."""
    from scipy.stats import rankdata

    positives = labels > 0.5
    n_pos, n_neg = int(positives.sum()), int((~positives).sum())
    if not n_pos or not n_neg:
        return float("nan")
    ranks = rankdata(scores)
    return float((ranks[positives].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def logloss(labels: np.ndarray, probs: np.ndarray) -> float:
    p = np.clip(probs, 1e-7, 1 - 1e-7)
    return float(-np.mean(labels * np.log(p) + (1 - labels) * np.log(1 - p)))


def catalogue_ctr(ml: Catalogue, train_share: float = EVAL_TRAIN_SHARE, valid_share: float = 0.1) -> tuple[CTRData, list[str], list[str]]:
    """The CTR rows of every rating, split by time (the catalogue's order: `ml.time_cut(train_share)` is the
    first validation row's time); also the user and item ids in index order. Fields the catalogue lacks
    (age, gender, occupation, year, genres) are one constant value."""
    if not ml.rated:
        raise DataError(f"{ml.name}: `eval quality` needs ratings (its labels are rating >= 4); the interactions have none")
    users = ml.user_ids()
    items = ml.item_ids()
    u_index = {u: n for n, u in enumerate(users)}
    i_index = {i: n for n, i in enumerate(items)}
    occupations = sorted({u.occupation or "" for u in ml.users.values()})
    genres = sorted({g for i in ml.items.values() for g in i.genres}) or ["(none)"]
    years = [i.year for i in ml.items.values() if i.year]
    year_edges = np.quantile(years, [0.2, 0.4, 0.6, 0.8]) if years else np.array([])
    ratings = ml.ratings  # in time order
    rows, genre_rows, labels = [], np.zeros((len(ratings), len(genres)), np.float32), []
    for n, r in enumerate(ratings):
        user, item = ml.users[r.user_id], ml.items[r.item_id]
        year = 0 if not item.year else 1 + int(np.searchsorted(year_edges, item.year))
        age = 0 if user.age is None else int(np.searchsorted(AGE_BUCKETS, user.age))
        rows.append((u_index[r.user_id], i_index[r.item_id], age, int(user.gender == "F"), occupations.index(user.occupation or ""), year))
        for g in item.genres:
            genre_rows[n, genres.index(g)] = 1.0 / len(item.genres)
        labels.append(1.0 if r.rating >= 4 else 0.0)
    fields = np.array(rows, np.int64)
    cut1, cut2 = int(train_share * len(rows)), int((train_share + valid_share) * len(rows))
    order = np.arange(len(rows))
    data = CTRData(fields, genre_rows, np.array(labels, np.float32), fields[:, 0], fields[:, 1],
                   [len(users), len(items), len(AGE_BUCKETS) + 1, 2, len(occupations), 6], order[:cut1], order[cut1:cut2], order[cut2:])
    return data, users, items


class DeepFM(nn.Module):
    def __init__(self, cardinalities: list[int], n_genres: int, knowledge_dim: int | None, dim: int = FIELD_DIM) -> None:
        super().__init__()
        self.embeddings = nn.ModuleList(nn.Embedding(c, dim) for c in cardinalities)
        self.first_order = nn.ModuleList(nn.Embedding(c, 1) for c in cardinalities)
        self.genre = nn.Linear(n_genres, dim, bias=False)
        n_fields = len(cardinalities) + 1
        self.adaptors = None
        if knowledge_dim is not None:  # KAR's knowledge adaptor: one per side
            self.adaptors = nn.ModuleList(nn.Sequential(nn.Linear(knowledge_dim, 64), nn.ReLU(), nn.Linear(64, dim)) for _ in range(2))
            n_fields += 2
        self.deep = nn.Sequential(nn.Linear(n_fields * dim, 128), nn.ReLU(), nn.Dropout(0.1), nn.Linear(128, 64), nn.ReLU(),
                                  nn.Linear(64, 1))
        self.bias = nn.Parameter(torch.zeros(1))
        for table in [*self.embeddings, *self.first_order]:  # small starts keep the FM's pairwise sums near 0
            nn.init.normal_(table.weight, std=0.01)

    def forward(self, fields: torch.Tensor, genres: torch.Tensor, knowledge: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        vectors = [emb(fields[:, n]) for n, emb in enumerate(self.embeddings)] + [self.genre(genres)]
        if self.adaptors is not None and knowledge is not None:
            vectors += [adaptor(k) for adaptor, k in zip(self.adaptors, knowledge, strict=True)]
        stack = torch.stack(vectors, dim=1)  # [batch, fields, dim]
        first = sum(w(fields[:, n]) for n, w in enumerate(self.first_order)).squeeze(-1)
        fm = 0.5 * (stack.sum(1).pow(2) - stack.pow(2).sum(1)).sum(-1)
        return self.bias + first + fm + self.deep(stack.flatten(1)).squeeze(-1)


def train_and_test(data: CTRData, knowledge: tuple[np.ndarray, np.ndarray] | None, seed: int, epochs: int = 10,
                   batch: int = 512, patience: int = 2) -> dict[str, float]:
    """One model: trained on the train split, the epoch with the best validation AUC kept, scored on test."""
    torch.manual_seed(seed)
    model = DeepFM(data.cardinalities, data.genres.shape[1], None if knowledge is None else knowledge[0].shape[1])
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-6)
    fields, genres = torch.from_numpy(data.fields), torch.from_numpy(data.genres)
    labels = torch.from_numpy(data.labels)
    know = None if knowledge is None else (torch.from_numpy(knowledge[0]), torch.from_numpy(knowledge[1]))

    def logits(rows: np.ndarray) -> torch.Tensor:
        index = torch.from_numpy(rows)
        k = None if know is None else (know[0][fields[index, 0]], know[1][fields[index, 1]])
        return model(fields[index], genres[index], k)

    def predict(rows: np.ndarray) -> np.ndarray:
        model.eval()
        with torch.no_grad():
            return torch.sigmoid(torch.cat([logits(rows[i : i + 8192]) for i in range(0, len(rows), 8192)])).numpy()

    rng = np.random.default_rng(seed)
    best, best_state, waited = -1.0, None, 0
    for _ in range(epochs):
        model.train()
        order = rng.permutation(data.train)
        for i in range(0, len(order), batch):
            rows = order[i : i + batch]
            loss = nn.functional.binary_cross_entropy_with_logits(logits(rows), labels[torch.from_numpy(rows)])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
        valid_auc = auc(data.labels[data.valid], predict(data.valid))
        if valid_auc > best:
            best, waited = valid_auc, 0
            best_state = {k: v.clone() for k, v in model.state_dict().items()}
        else:
            waited += 1
            if waited >= patience:
                break
    assert best_state is not None
    model.load_state_dict(best_state)
    probs = predict(data.test)
    assert data.cold is not None
    cold = np.isin(data.test, data.cold)
    return {"auc": auc(data.labels[data.test], probs), "logloss": logloss(data.labels[data.test], probs), "valid_auc": best,
            "cold_auc": auc(data.labels[data.test][cold], probs[cold]) if cold.any() else float("nan")}


def read_knowledge(path: Path) -> dict[tuple[str, str], KnowledgeRecord]:
    records = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            record = decode(KnowledgeRecord, line.encode())
            records[(record.entity_kind, record.entity_id)] = record
    return records


def knowledge_vectors(records: dict[tuple[str, str], KnowledgeRecord], users: list[str], items: list[str],
                      encoder) -> tuple[np.ndarray, np.ndarray]:  # type: ignore[no-untyped-def]
    """MiniLM vectors of every user's and item's text, in index order (zeros where an entity has none)."""
    def side(kind: str, ids: list[str]) -> np.ndarray:
        texts = [records[(kind, i)].text if (kind, i) in records else "" for i in ids]
        vectors = encoder.encode([t or " " for t in texts])
        vectors[[n for n, t in enumerate(texts) if not t.strip()]] = 0.0
        return vectors.astype(np.float32)

    return side("user", users), side("item", items)


def other_templates(ml: Catalogue, version: str) -> Catalogue | None:
    """The catalogue with the packaged templates of `version` instead of its own; None if no packaged set has it."""
    if template_set(version) not in packaged_templates():
        return None
    other = copy.copy(ml)
    try:
        other.templates = read_templates(templates_dir(template_set(version)), ml)
    except DataError:  # the set does not fit this catalogue's fields
        return None
    return other if other.templates.version == version else None


def prompt_vectors(ml: Catalogue, users: list[str], items: list[str], as_of: int, encoder) -> tuple[np.ndarray, np.ndarray]:  # type: ignore[no-untyped-def]
    """The `prompt-only` control: each entity's prompt as of `as_of`, encoded like its knowledge (no LLM)."""
    u = encoder.encode([user_prompt(ml, user, as_of=as_of) for user in users]).astype(np.float32)
    i = encoder.encode([item_prompt(ml, item) for item in items]).astype(np.float32)
    return u, i


def shuffled(vectors: tuple[np.ndarray, np.ndarray], seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The `shuffled` control: every entity with a vector gets another such entity's (one permutation per side)."""
    rng = np.random.default_rng(seed)
    out = []
    for side in vectors:
        side = side.copy()
        present = np.flatnonzero(np.abs(side).sum(1) > 0)
        side[present] = side[rng.permutation(present)]
        out.append(side)
    return out[0], out[1]


def interval(diffs: list[float]) -> list[float]:
    """The 95 % t interval of the mean of paired differences, [low, high]."""
    from scipy.stats import t

    mean = statistics.mean(diffs)
    if len(diffs) < 2:
        return [mean, mean]
    half = float(t.ppf(0.975, len(diffs) - 1)) * statistics.stdev(diffs) / len(diffs) ** 0.5
    return [mean - half, mean + half]


def file_texts(records: dict[tuple[str, str], KnowledgeRecord], summary: dict) -> dict:  # type: ignore[type-arg]
    """Text metrics of one knowledge file, over all its texts and per entity kind; the token cap is the
    largest limit of the file's runs."""
    caps = [r["max_new_tokens"] for r in summary.get("runs", []) if r.get("max_new_tokens")]
    cap = max(caps) if caps else None

    def of(kind: str | None) -> dict:  # type: ignore[type-arg]
        chosen = [r for (k, _), r in sorted(records.items()) if kind is None or k == kind]
        return text_metrics([r.text for r in chosen], [r.token_count for r in chosen], cap)

    return of(None) | {"token_cap": cap, "by_kind": {kind: of(kind) for kind in ("user", "item")}}


def text_agreement(ar: dict, relaxed: dict, encoder) -> dict[str, float]:  # type: ignore[no-untyped-def,type-arg]
    """Per entity present in both: MiniLM cosine of the two texts, token-count ratio, identical or not."""
    both = sorted(ar.keys() & relaxed.keys())
    a = encoder.encode([ar[k].text or " " for k in both])
    r = encoder.encode([relaxed[k].text or " " for k in both])
    cosines = (a * r).sum(1)  # unit vectors
    ratios = [relaxed[k].token_count / ar[k].token_count for k in both if ar[k].token_count]
    return {"entities": len(both), "relaxed_vs_ar_cosine_mean": float(np.mean(cosines)),
            "relaxed_vs_ar_cosine_median": float(np.median(cosines)), "length_ratio_mean": float(np.mean(ratios)),
            "identical_share": float(np.mean([ar[k].text == relaxed[k].text for k in both]))}


def read_summary(knowledge_file: Path) -> dict:  # type: ignore[type-arg]
    from dare.generate_all import summary_path

    path = summary_path(knowledge_file)
    return json.loads(path.read_text()) if path.exists() else {}


def variant_name(knowledge_file: Path, templates_version: str | None = None) -> str:
    """A knowledge file's name in the report, from its summary: its mode, its relaxed guard if any
    (`relaxed-top1-0.5`), and its templates where they are not `templates_version` (the report's: `ar-kar`);
    the file's stem without a summary."""
    summary = read_summary(knowledge_file)
    if "mode" not in summary:
        return knowledge_file.name.removesuffix(".jsonl")
    guard = summary.get("relaxed_max_top1") or 1.0
    version = summary.get("prompt_version")
    other = f"-{template_set(version)}" if version and templates_version and version != templates_version else ""
    return summary["mode"] + (f"-top1-{guard:g}" if guard < 1.0 else "") + other


def template_set(version: str) -> str:
    """`kar` of a prompt version `kar-1a2b3c4d`."""
    return version.rsplit("-", 1)[0]


def generation_figures(summary: dict) -> dict[str, float]:  # type: ignore[type-arg]
    if not summary:
        return {}
    return {"tokens_per_s": summary["tokens_per_s"], "wall_s": summary["wall_s"], "mean_accepted": summary["mean_accepted"],
            "entities": summary["entities"]}


def compare(data: CTRData, variants: dict[str, tuple[np.ndarray, np.ndarray] | None], seeds: int,
            paired: tuple[str, ...] = ("relaxed",)) -> dict:  # type: ignore[type-arg]
    """Every variant trained with each seed; per variant mean ± std; each of `paired` against ar, paired by seed
    (`<name>_vs_ar`, `<name>_vs_ar_cold_start`)."""
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in variants}
    for seed in range(seeds):
        for name, knowledge in variants.items():
            runs[name].append(train_and_test(data, knowledge, seed))
            print(f"  seed {seed} {name}: AUC {runs[name][-1]['auc']:.4f} LogLoss {runs[name][-1]['logloss']:.4f}", flush=True)
    def spread(values: list[float]) -> dict:  # type: ignore[type-arg]
        return {"mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                "ci95": interval(values)}

    out: dict = {"variants": {}, "cold_start": {}}  # type: ignore[type-arg]
    for name, results in runs.items():
        aucs, losses, cold = [r["auc"] for r in results], [r["logloss"] for r in results], [r["cold_auc"] for r in results]
        a, loss, c = spread(aucs), spread(losses), spread(cold)
        out["variants"][name] = {"auc_mean": a["mean"], "auc_std": a["std"], "auc_ci95": a["ci95"], "logloss_mean": loss["mean"],
                                 "logloss_std": loss["std"], "auc": aucs, "logloss": losses}
        out["cold_start"][name] = {"auc_mean": c["mean"], "auc_std": c["std"], "auc_ci95": c["ci95"], "auc": cold}
    out["cold_start_rows"] = len(data.cold) if data.cold is not None else 0
    if "ar" in runs and seeds > 1:
        from scipy.stats import ttest_rel

        for name in paired:
            for key, metric in ((f"{name}_vs_ar", "auc"), (f"{name}_vs_ar_cold_start", "cold_auc")):
                diffs = [r[metric] - a[metric] for r, a in zip(runs[name], runs["ar"], strict=True)]
                test = ttest_rel([r[metric] for r in runs[name]], [a[metric] for a in runs["ar"]])
                out[key] = {"auc_diff_mean": statistics.mean(diffs), "auc_diff_std": statistics.stdev(diffs), "ci95": interval(diffs),
                            "auc_diffs": diffs, "paired_t": float(test.statistic), "p_value": float(test.pvalue)}
    return out


def plot(report: dict, path: Path) -> None:  # type: ignore[type-arg]
    """Left: test AUC per variant with 95 % intervals over seeds, whole test set and cold-start slice, on an
    axis from 0.5 (chance). Right: each knowledge variant − ar per seed and its 95 % interval, on an axis centred at 0."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["variants"])
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.8), gridspec_kw={"width_ratios": [3, 1.6]})
    x = np.arange(len(names))
    for offset, (label, key, colour) in zip((-0.2, 0.2), (("whole test set", "variants", "#4477aa"),
                                                          ("cold-start slice", "cold_start", "#ee6677"))):
        means = np.array([report[key][n]["auc_mean"] for n in names])
        ci = np.array([report[key][n]["auc_ci95"] for n in names])
        left.bar(x + offset, means - 0.5, 0.4, bottom=0.5, yerr=[means - ci[:, 0], ci[:, 1] - means], capsize=4, color=colour,
                 label=label)
    left.set_xticks(x, [name.replace("-", "-\n", 1) if len(name) > 8 else name for name in names], fontsize=8)
    left.set_ylim(0.5, max(0.8, max(report["variants"][n]["auc_ci95"][1] for n in names) + 0.02))
    left.set_ylabel("test AUC (axis from 0.5 = chance)")
    left.legend(fontsize=8, loc="upper left")
    left.set_title(f"DeepFM on {report['setup']['dataset']}, by knowledge (95 % CI over seeds)", fontsize=10)
    compared = [n for n in names if f"{n}_vs_ar" in report]
    ticks = [(f"{n}_vs_ar{suffix}", f"{n}\n{where}") for n in compared for suffix, where in (("", "whole"), ("_cold_start", "cold"))]
    for n, (key, _) in enumerate(ticks):
        diff = report[key]
        right.scatter([n] * len(diff["auc_diffs"]), diff["auc_diffs"], s=12, color="grey")
        right.errorbar([n], [diff["auc_diff_mean"]], yerr=[[diff["auc_diff_mean"] - diff["ci95"][0]], [diff["ci95"][1] - diff["auc_diff_mean"]]],
                       fmt="o", color="black", capsize=5)
    right.axhline(0, color="black", lw=0.8)
    for bound in (-0.002, 0.002):
        right.axhline(bound, color="grey", lw=0.8, ls="--")
    right.set_xticks(range(len(ticks)), [label for _, label in ticks], fontsize=7)
    right.set_xlim(-0.6, len(ticks) - 0.4)
    right.set_ylabel("variant − ar AUC (dashes: ±0.002)")
    right.set_title("per seed, mean and 95 % CI", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_quality(ar_path: Path, relaxed_path: Path, seeds: int = 5, catalogue: Catalogue | None = None,
                extra: dict[str, Path] | None = None) -> dict:  # type: ignore[type-arg]
    """The whole downstream test on `catalogue` (default MovieLens-100k) with the two knowledge files, and any
    `extra` ones (name → file, e.g. a guarded relaxed run), each compared with ar like relaxed."""
    from pool_builder.embeddings import TextEncoder

    ml = catalogue or load_movielens()
    data, users, items = catalogue_ctr(ml)
    boundary = ml.time_cut(EVAL_TRAIN_SHARE)
    encoder = TextEncoder()
    paths = {"ar": ar_path, "relaxed": relaxed_path, **(extra or {})}
    files = {name: read_knowledge(path) for name, path in paths.items()}
    summaries = {name: read_summary(path) for name, path in paths.items()}
    as_of = {name: summary.get("as_of") for name, summary in summaries.items()}
    leaking = [name for name, cut in as_of.items() if cut is None or cut > boundary]
    print(f"CTR rows: {len(data.train)} train, {len(data.valid)} valid, {len(data.test)} test (split by time at {boundary}), "
          f"{len(data.cold)} test rows cold-start; knowledge: "
          f"{', '.join(f'{len(records)} {name}' for name, records in files.items())} entities", flush=True)
    if leaking:
        print(f"warning: the {' and '.join(leaking)} prompts saw ratings after the train/validation boundary (as of "
              f"{', '.join(str(as_of[m] or 'every rating') for m in leaking)}): the knowledge rows leak test-period ratings; "
              "regenerate with `dare generate-all` (its default --as-of eval)", flush=True)
    versions = {name: summary.get("prompt_version") for name, summary in summaries.items()}
    controls = {"prompt-only": prompt_vectors(ml, users, items, boundary, encoder)}
    for version in sorted({v for v in versions.values() if v and ml.templates and v != ml.templates.version}):
        other = other_templates(ml, version)  # files made with another set: its own prompt-only control
        if other is None:
            print(f"warning: no templates of version {version} here (edited since?): its files have no prompt-only control",
                  flush=True)
        else:
            controls[f"prompt-only-{template_set(version)}"] = prompt_vectors(other, users, items, boundary, encoder)
    knowledge = {name: knowledge_vectors(records, users, items, encoder) for name, records in files.items()}
    variants = {"none": None, **controls, "shuffled": shuffled(knowledge["ar"]), **knowledge}
    report = compare(data, variants, seeds, paired=tuple(n for n in files if n != "ar"))
    report["as_of"] = {"boundary": boundary, "files": as_of, "leaking": leaking}
    report["prompt_version"] = {"prompt-only": ml.templates.version if ml.templates else None, **versions}
    report["text"] = {name: file_texts(records, summaries[name]) for name, records in files.items()}
    report["agreement"] = text_agreement(files["ar"], files["relaxed"], encoder)
    if extra:
        report["agreement_extra"] = {name: text_agreement(files["ar"], files[name], encoder) for name in extra}
    report["generation"] = {name: generation_figures(summary) for name, summary in summaries.items()}
    report["setup"] = {"dataset": ml.name, "model": "DeepFM", "field_dim": FIELD_DIM, "seeds": seeds, "split": "by time: 80% train, 10% valid, 10% test",
                       "label": "rating >= 4", "cold_start": f"test rows whose user or item has <= {COLD_START} training rows",
                       "rows": {"train": len(data.train), "valid": len(data.valid), "test": len(data.test), "cold_start": len(data.cold)},
                       "files": {name: str(path) for name, path in paths.items()}}
    return report


def format_report(report: dict) -> str:  # type: ignore[type-arg]
    lines = ["| knowledge | AUC, whole test set (mean ± std) | 95 % CI | AUC, cold start | 95 % CI | LogLoss | seeds |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, v in report["variants"].items():
        c = report.get("cold_start", {}).get(name, {})
        cold = f"{c['auc_mean']:.4f} ± {c['auc_std']:.4f} | [{c['auc_ci95'][0]:.4f}, {c['auc_ci95'][1]:.4f}]" if c else "— | —"
        lines.append(f"| {name} | {v['auc_mean']:.4f} ± {v['auc_std']:.4f} | [{v['auc_ci95'][0]:.4f}, {v['auc_ci95'][1]:.4f}] | {cold} "
                     f"| {v['logloss_mean']:.4f} | {len(v['auc'])} |")
    compared = [n for n in report["variants"] if f"{n}_vs_ar" in report]
    for key, label in ((k, f"{n} - ar AUC{where}") for n in compared
                       for k, where in ((f"{n}_vs_ar", ""), (f"{n}_vs_ar_cold_start", ", cold start"))):
        if key in report:
            p = report[key]
            lines.append(f"{label}: {p['auc_diff_mean']:+.4f}, 95 % CI [{p['ci95'][0]:+.4f}, {p['ci95'][1]:+.4f}] "
                         f"(paired t {p['paired_t']:.2f}, p = {p['p_value']:.3f})")
    if report.get("as_of", {}).get("leaking"):
        lines.append(f"LEAKING: the {' and '.join(report['as_of']['leaking'])} prompts saw ratings after the train/validation "
                     f"boundary ({report['as_of']['boundary']})")
    if "text" in report:
        lines += ["", "| mode | kind | texts | distinct-2 | shared first sentence | repeated 6-grams | copied span mean / p95 (words) | truncated |",
                  "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for mode, t in report["text"].items():
            for kind, m in (("all", t), *t["by_kind"].items()):
                truncated = "—" if m["truncated"] is None else f"{100 * m['truncated']:.1f}%"
                lines.append(f"| {mode} | {kind} | {m['texts']} | {m['distinct_2']:.3f} | {100 * m['shared_first_sentence']:.1f}% "
                             f"| {100 * m['repeated_6gram']:.1f}% | {m['copied_span_mean']:.1f} / {m['copied_span_p95']:.0f} | {truncated} |")
    if "agreement" in report:
        t = report["agreement"]
        lines.append(f"texts ({t['entities']} entities): MiniLM cosine relaxed vs ar {t['relaxed_vs_ar_cosine_mean']:.3f} "
                     f"(median {t['relaxed_vs_ar_cosine_median']:.3f}), length ratio {t['length_ratio_mean']:.2f}, "
                     f"identical {100 * t['identical_share']:.1f}%")
    return "\n".join(lines)
