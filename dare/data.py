"""MovieLens-100k from the installed recbole package, KAR-style prompts, and change events.

GroupLens terms: the data is read from the installed package and never copied into the repo.
"""

from __future__ import annotations

import importlib.util
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from schemas import ItemEvent, PromptRequest, UserEvent

HISTORY_LIMIT = 15

# The factors KAR asks the LLM to reason about (Xi et al., "Towards Open-World Recommendation
# with Knowledge Augmentation from Large Language Models").
FACTORS = (
    "genre, director/actors, time period/country, character, plot/theme, mood/tone, "
    "critical acclaim/award, production quality, and soundtrack"
)

OCCUPATIONS_AS_SPOKEN = {"none": "not employed", "other": "in another occupation"}


class DataError(RuntimeError):
    """MovieLens data is missing, or an id is unknown."""


@dataclass(frozen=True)
class Item:
    item_id: str
    title: str
    year: int | None
    genres: tuple[str, ...]

    def label(self) -> str:
        return f"{self.title} ({self.year})" if self.year else self.title


@dataclass(frozen=True)
class User:
    user_id: str
    age: int
    gender: str
    occupation: str


@dataclass(frozen=True)
class Rating:
    user_id: str
    item_id: str
    rating: float
    timestamp: int


@dataclass
class MovieLens:
    users: dict[str, User]
    items: dict[str, Item]
    ratings: list[Rating]  # in timestamp order
    by_user: dict[str, list[Rating]] = field(default_factory=dict)

    def history(self, user_id: str, limit: int = HISTORY_LIMIT) -> list[Rating]:
        """The user's `limit` most recent ratings, oldest first."""
        if user_id not in self.users:
            raise DataError(f"unknown MovieLens user {user_id!r} (ids are 1..{len(self.users)})")
        return self.by_user.get(user_id, [])[-limit:]


def movielens_dir() -> Path:
    # Located without importing recbole (its import pulls in a training stack we do not need).
    spec = importlib.util.find_spec("recbole")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("MovieLens-100k comes from the recbole package (run `make install`)")
    path = Path(next(iter(spec.submodule_search_locations))) / "dataset_example" / "ml-100k"
    if not (path / "ml-100k.inter").is_file():
        raise DataError(f"recbole is installed but {path / 'ml-100k.inter'} is missing")
    return path


def _rows(path: Path) -> Iterator[list[str]]:
    with path.open(encoding="utf-8") as f:
        next(f)  # header: name:type columns
        for line in f:
            line = line.rstrip("\n")
            if line:
                yield line.split("\t")


@lru_cache(maxsize=1)
def load_movielens() -> MovieLens:
    root = movielens_dir()
    items = {}
    for item_id, title, year, genres in _rows(root / "ml-100k.item"):
        items[item_id] = Item(item_id, title.strip(), int(year) if year.strip().isdigit() else None, tuple(genres.split()))
    users = {uid: User(uid, int(age), gender, occupation) for uid, age, gender, occupation, _zip in _rows(root / "ml-100k.user")}
    ratings = [Rating(u, i, float(r), int(float(t))) for u, i, r, t in _rows(root / "ml-100k.inter")]
    ratings.sort(key=lambda r: (r.timestamp, r.user_id, r.item_id))
    by_user: dict[str, list[Rating]] = defaultdict(list)
    for rating in ratings:
        by_user[rating.user_id].append(rating)
    return MovieLens(users, items, ratings, dict(by_user))


# ---------------------------------------------------------------------------- prompts


def user_prompt(ml: MovieLens, user_id: str, limit: int = HISTORY_LIMIT) -> str:
    """KAR's preference-reasoning prompt: profile plus the most recent rated movies."""
    user = ml.users.get(user_id)
    history = ml.history(user_id, limit)
    assert user is not None
    gender = {"M": "male", "F": "female"}.get(user.gender, "")
    occupation = OCCUPATIONS_AS_SPOKEN.get(user.occupation, f"a {user.occupation}")
    lines = [
        f"{ml.items[r.item_id].label()}, {'/'.join(ml.items[r.item_id].genres)}, {int(r.rating)} stars"
        for r in history
    ]
    return (
        f"Given a {gender} user who is aged {user.age} and is {occupation}, this user's movie viewing "
        "history over time is listed below (title, genres, rating out of 5).\n"
        + "\n".join(lines)
        + f"\nAnalyze the user's preferences on movies (consider factors like {FACTORS}). "
        "Provide clear explanations based on relevant details from the user's viewing history."
    )


def item_prompt(ml: MovieLens, item_id: str) -> str:
    """KAR's factual-knowledge prompt for one movie."""
    item = ml.items.get(item_id)
    if item is None:
        raise DataError(f"unknown MovieLens item {item_id!r} (ids are 1..{len(ml.items)})")
    return (
        f"Introduce the movie {item.label()} ({', '.join(item.genres)}) and describe its attributes precisely "
        f"(including but not limited to {FACTORS})."
    )


def prompt_request(ml: MovieLens, entity_kind: str, entity_id: str, request_id: str | None = None, **extra: object) -> PromptRequest:
    prompt = user_prompt(ml, entity_id) if entity_kind == "user" else item_prompt(ml, entity_id)
    return PromptRequest(
        request_id=request_id or f"{entity_kind}-{entity_id}",
        entity_kind=entity_kind,  # type: ignore[arg-type]
        entity_id=entity_id,
        prompt=prompt,
        **extra,  # type: ignore[arg-type]
    )


# ---------------------------------------------------------------------------- events


def user_events(ml: MovieLens, limit: int | None = None) -> Iterator[UserEvent]:
    """One event per rating, in timestamp order, for replay into Kafka."""
    for n, r in enumerate(ml.ratings[:limit]):
        user = ml.users[r.user_id]
        yield UserEvent(
            event_id=f"ml100k-r{n}",
            user_id=r.user_id,
            item_id=r.item_id,
            rating=r.rating,
            timestamp=r.timestamp,
            age=user.age,
            gender=user.gender if user.gender in ("M", "F") else "O",
            occupation=user.occupation,
        )


def item_events(ml: MovieLens) -> Iterator[ItemEvent]:
    """One event per movie, stamped with its first rating's time (items appear before use)."""
    first_seen: dict[str, int] = {}
    for r in ml.ratings:
        first_seen.setdefault(r.item_id, r.timestamp)
    for item in sorted(ml.items.values(), key=lambda i: (first_seen.get(i.item_id, 0), int(i.item_id))):
        yield ItemEvent(
            event_id=f"ml100k-i{item.item_id}",
            item_id=item.item_id,
            title=item.title,
            year=item.year,
            genres=list(item.genres),
            timestamp=first_seen.get(item.item_id, 0),
        )
