"""`dare data synth`: a synthetic catalogue of any size in RecBole's atomic files (`dare.data` reads it; its
events have the wire's schemas), for scale benches and as a test fixture.

What makes it look like a real catalogue:

- **Power-law activity and popularity.** Each rating's user is drawn with weight ∝ 1 / rank^`user_skew`, and
  within a genre each item with weight ∝ 1 / rank^`item_skew` (Zipf), so a few users rate a lot, most rate a
  little, and a few items take most ratings.
- **Genre structure.** Genres themselves are Zipf-popular; an item has a main genre and up to two others; a user
  has a taste, a Dirichlet draw over genres concentrated on a few, and picks each rating's genre from it. So
  users of one taste rate the same items: segments exist to be found.
- **Ratings** 1–5: a user's bias, an item's quality, +1 for the user's favourite genres, and noise.
- **Time**: ratings spread uniformly over `days` from a fixed start, written in time order.

Everything is drawn with numpy from `seed`, in chunks (`CHUNK` ratings), so 10M ratings need ~1 GB, not the
catalogue's objects.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

START = 1_600_000_000  # 2020-09-13, Unix seconds
CHUNK = 1_000_000
WORDS_A = ("Silent", "Golden", "Broken", "Hidden", "Last", "Red", "Wild", "Lost", "Bright", "Cold", "Secret", "Long", "Little",
           "Dark", "Final", "Electric", "Quiet", "Burning", "Northern", "Paper")
WORDS_B = ("Harbor", "Garden", "Letter", "River", "Machine", "Summer", "Kingdom", "Road", "Island", "Promise", "Signal",
           "Orchard", "Mirror", "Voyage", "Station", "Winter", "Empire", "Song", "Bridge", "Forest")
OCCUPATIONS = ("student", "engineer", "educator", "artist", "healthcare", "administrator", "writer", "technician",
               "retired", "other")


def zipf_weights(n: int, skew: float) -> np.ndarray:
    weights = 1.0 / np.arange(1, n + 1) ** skew
    return weights / weights.sum()


def synth(out: Path, users: int, items: int, ratings: int, genres: int = 18, user_skew: float = 0.9, item_skew: float = 1.0,
          days: int = 365, seed: int = 0, progress: bool = False) -> dict[str, int]:
    """Write `out/NAME.item`, `out/NAME.user` and `out/NAME.inter` (NAME: `out`'s name); returns the counts."""
    if min(users, items, ratings, genres) < 1:
        raise ValueError("users, items, ratings and genres must each be at least 1")
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    name = out.name
    genre_names = [f"genre{g:02d}" for g in range(genres)]

    # items: a main genre (Zipf-popular genres), up to two more; a quality; a rank of popularity within the main genre
    main = rng.choice(genres, size=items, p=zipf_weights(genres, 1.0))
    extra = rng.integers(0, genres, size=(items, 2))
    n_extra = rng.integers(0, 3, size=items)
    quality = rng.normal(0.0, 0.5, size=items)
    with (out / f"{name}.item").open("w", encoding="utf-8") as f:
        f.write("item_id:token\ttitle:token_seq\tyear:token\tgenre:token_seq\n")
        for i in range(items):
            tags = [genre_names[main[i]], *dict.fromkeys(genre_names[g] for g in extra[i, : n_extra[i]] if g != main[i])]
            title = f"The {WORDS_A[rng.integers(len(WORDS_A))]} {WORDS_B[rng.integers(len(WORDS_B))]} {i}"
            f.write(f"i{i}\t{title}\t{1950 + int(rng.integers(0, 76))}\t{' '.join(tags)}\n")
    by_genre = [np.flatnonzero(main == g) for g in range(genres)]
    item_popularity = [zipf_weights(len(members), item_skew) if len(members) else None for members in by_genre]

    # users: a taste over genres concentrated on a few (Dirichlet), its two favourites, a rating bias, a profile
    taste = rng.dirichlet(np.full(genres, 0.3), size=users)
    favourites = np.argsort(-taste, axis=1)[:, :2]
    bias = rng.normal(0.0, 0.4, size=users)
    with (out / f"{name}.user").open("w", encoding="utf-8") as f:
        f.write("user_id:token\tage:token\tgender:token\toccupation:token\n")
        ages, genders, jobs = rng.integers(16, 75, size=users), rng.choice(["M", "F"], size=users), rng.integers(0, len(OCCUPATIONS), size=users)
        for u in range(users):
            f.write(f"u{u}\t{ages[u]}\t{genders[u]}\t{OCCUPATIONS[jobs[u]]}\n")

    # ratings, in time order, chunk by chunk: user by activity, genre by the user's taste, item by popularity in it
    activity = zipf_weights(users, user_skew)
    rng.shuffle(activity)  # the most active users are not the first ids
    genres_with_items = np.array([len(m) > 0 for m in by_genre])
    times = np.sort(rng.integers(START, START + days * 86_400, size=ratings))
    written = 0
    with (out / f"{name}.inter").open("w", encoding="utf-8") as f:
        f.write("user_id:token\titem_id:token\trating:float\ttimestamp:float\n")
        for begin in range(0, ratings, CHUNK):
            n = min(CHUNK, ratings - begin)
            who = rng.choice(users, size=n, p=activity)
            weights = taste[who] * genres_with_items  # a genre without items is never picked
            weights /= weights.sum(axis=1, keepdims=True)
            genre = (weights.cumsum(axis=1) > rng.random((n, 1))).argmax(axis=1)
            what = np.empty(n, dtype=np.int64)
            for g in np.unique(genre):
                rows = np.flatnonzero(genre == g)
                what[rows] = by_genre[g][rng.choice(len(by_genre[g]), size=len(rows), p=item_popularity[g])]
            liked = (main[what] == favourites[who, 0]) | (main[what] == favourites[who, 1])
            stars = np.clip(np.rint(3.2 + bias[who] + quality[what] + 0.8 * liked + rng.normal(0.0, 0.8, size=n)), 1, 5).astype(int)
            f.writelines(f"u{u}\ti{i}\t{s}\t{t}\n" for u, i, s, t in zip(who, what, stars, times[begin : begin + n]))
            written += n
            if progress:
                print(f"\r{out / f'{name}.inter'}: {written:,}/{ratings:,} ratings", end="", file=sys.stderr, flush=True)
    if progress:
        print(file=sys.stderr)
    return {"users": users, "items": items, "ratings": ratings, "genres": genres}
