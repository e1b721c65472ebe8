"""`dare eval quality`: is relaxed knowledge as useful downstream as greedy knowledge? (KAR style)

CTR task on MovieLens-100k: label = rating >= 4. Split by time over all ratings: the oldest 80 %
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

Variants: none (no knowledge fields), ar, relaxed; each seed trains every variant on the same
split from the same seed, so relaxed and ar differ only in the texts behind their knowledge vectors. Reports AUC and LogLoss (mean ± std over
seeds), a paired t-test and the per-seed differences of relaxed vs ar, and text-level agreement
between the two knowledge files (MiniLM cosine, length ratio, share identical).
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from dare.data import MovieLens, load_movielens
from schemas import KnowledgeRecord, decode

FIELD_DIM = 16
AGE_BUCKETS = (18, 25, 35, 45, 50, 56)


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


def movielens_ctr(ml: MovieLens, train_share: float = 0.8, valid_share: float = 0.1) -> tuple[CTRData, list[str], list[str]]:
    """The CTR rows of every rating, split by time; also the user and item ids in index order."""
    users = sorted(ml.users, key=int)
    items = sorted(ml.items, key=int)
    u_index = {u: n for n, u in enumerate(users)}
    i_index = {i: n for n, i in enumerate(items)}
    occupations = sorted({u.occupation for u in ml.users.values()})
    genres = sorted({g for i in ml.items.values() for g in i.genres})
    years = [i.year for i in ml.items.values() if i.year]
    year_edges = np.quantile(years, [0.2, 0.4, 0.6, 0.8])
    ratings = sorted(ml.ratings, key=lambda r: r.timestamp)
    rows, genre_rows, labels = [], np.zeros((len(ratings), len(genres)), np.float32), []
    for n, r in enumerate(ratings):
        user, item = ml.users[r.user_id], ml.items[r.item_id]
        year = 0 if not item.year else 1 + int(np.searchsorted(year_edges, item.year))
        rows.append((u_index[r.user_id], i_index[r.item_id], int(np.searchsorted(AGE_BUCKETS, user.age)),
                     int(user.gender == "F"), occupations.index(user.occupation), year))
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
    return {"auc": auc(data.labels[data.test], probs), "logloss": logloss(data.labels[data.test], probs), "valid_auc": best}


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


def generation_figures(summary_file: Path) -> dict[str, float]:
    if not summary_file.exists():
        return {}
    s = json.loads(summary_file.read_text())
    return {"tokens_per_s": s["tokens_per_s"], "wall_s": s["wall_s"], "mean_accepted": s["mean_accepted"], "entities": s["entities"]}


def compare(data: CTRData, variants: dict[str, tuple[np.ndarray, np.ndarray] | None], seeds: int) -> dict:  # type: ignore[type-arg]
    """Every variant trained with each seed; per variant mean ± std; relaxed vs ar paired."""
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in variants}
    for seed in range(seeds):
        for name, knowledge in variants.items():
            runs[name].append(train_and_test(data, knowledge, seed))
            print(f"  seed {seed} {name}: AUC {runs[name][-1]['auc']:.4f} LogLoss {runs[name][-1]['logloss']:.4f}", flush=True)
    out = {"variants": {}}
    for name, results in runs.items():
        aucs, losses = [r["auc"] for r in results], [r["logloss"] for r in results]
        out["variants"][name] = {"auc_mean": statistics.mean(aucs), "auc_std": statistics.stdev(aucs) if len(aucs) > 1 else 0.0,
                                 "logloss_mean": statistics.mean(losses),
                                 "logloss_std": statistics.stdev(losses) if len(losses) > 1 else 0.0,
                                 "auc": aucs, "logloss": losses}
    if "ar" in runs and "relaxed" in runs and seeds > 1:
        from scipy.stats import ttest_rel

        diffs = [r["auc"] - a["auc"] for r, a in zip(runs["relaxed"], runs["ar"], strict=True)]
        test = ttest_rel([r["auc"] for r in runs["relaxed"]], [a["auc"] for a in runs["ar"]])
        out["relaxed_vs_ar"] = {"auc_diff_mean": statistics.mean(diffs), "auc_diff_std": statistics.stdev(diffs),
                                "auc_diffs": diffs, "paired_t": float(test.statistic), "p_value": float(test.pvalue)}
    return out


def plot(report: dict, path: Path) -> None:  # type: ignore[type-arg]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["variants"])
    means = [report["variants"][n]["auc_mean"] for n in names]
    stds = [report["variants"][n]["auc_std"] for n in names]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.bar(names, means, yerr=stds, capsize=6, color=["#999999", "#4477aa", "#ee6677"][: len(names)])
    low = min(m - s for m, s in zip(means, stds, strict=True))
    ax.set_ylim(low - 0.01, max(m + s for m, s in zip(means, stds, strict=True)) + 0.005)
    ax.set_ylabel("test AUC (mean ± std over seeds)")
    ax.set_title("DeepFM on MovieLens-100k, by knowledge", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_quality(ar_path: Path, relaxed_path: Path, seeds: int = 5) -> dict:  # type: ignore[type-arg]
    from pool_builder.embeddings import TextEncoder

    ml = load_movielens()
    data, users, items = movielens_ctr(ml)
    encoder = TextEncoder()
    ar, relaxed = read_knowledge(ar_path), read_knowledge(relaxed_path)
    print(f"CTR rows: {len(data.train)} train, {len(data.valid)} valid, {len(data.test)} test (split by time); "
          f"knowledge: {len(ar)} ar, {len(relaxed)} relaxed entities", flush=True)
    variants = {"none": None, "ar": knowledge_vectors(ar, users, items, encoder),
                "relaxed": knowledge_vectors(relaxed, users, items, encoder)}
    report = compare(data, variants, seeds)
    report["text"] = text_agreement(ar, relaxed, encoder)
    report["generation"] = {mode: generation_figures(path.with_name(path.name.removesuffix(".jsonl") + ".summary.json"))
                            for mode, path in (("ar", ar_path), ("relaxed", relaxed_path))}
    report["setup"] = {"model": "DeepFM", "field_dim": FIELD_DIM, "seeds": seeds, "split": "by time: 80% train, 10% valid, 10% test",
                       "label": "rating >= 4", "rows": {"train": len(data.train), "valid": len(data.valid), "test": len(data.test)}}
    return report


def format_report(report: dict) -> str:  # type: ignore[type-arg]
    lines = ["| knowledge | AUC (mean ± std) | LogLoss (mean ± std) | seeds |", "| --- | ---: | ---: | ---: |"]
    for name, v in report["variants"].items():
        lines.append(f"| {name} | {v['auc_mean']:.4f} ± {v['auc_std']:.4f} | {v['logloss_mean']:.4f} ± {v['logloss_std']:.4f} "
                     f"| {len(v['auc'])} |")
    if "relaxed_vs_ar" in report:
        p = report["relaxed_vs_ar"]
        lines.append(f"relaxed - ar AUC: {p['auc_diff_mean']:+.4f} ± {p['auc_diff_std']:.4f} (paired t {p['paired_t']:.2f}, "
                     f"p = {p['p_value']:.3f})")
    if "text" in report:
        t = report["text"]
        lines.append(f"texts ({t['entities']} entities): MiniLM cosine relaxed vs ar {t['relaxed_vs_ar_cosine_mean']:.3f} "
                     f"(median {t['relaxed_vs_ar_cosine_median']:.3f}), length ratio {t['length_ratio_mean']:.2f}, "
                     f"identical {100 * t['identical_share']:.1f}%")
    return "\n".join(lines)
