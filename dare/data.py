"""Catalogues in RecBole's atomic-file format, knowledge prompts from template files, and change events.

A catalogue is a directory `NAME/` holding `NAME.inter` (interactions: `user_id`, `item_id`, and optionally
`rating` and `timestamp`), `NAME.item` (`item_id`, optionally a title, a year, genres and any other columns)
and optionally `NAME.user` (`user_id`, optionally `age`, `gender`, `occupation` and any others): tab-separated,
each file's first line naming its columns as `name:type` (RecBole's atomic files,
https://recbole.io/docs/user_guide/data/atomic_files.html). The default is MovieLens-100k from the installed
recbole package (GroupLens terms: read from the package, never copied into the repo).

Prompts are the files `user.txt` and `item.txt` of a templates directory, with `{placeholders}` filled per
entity: see `user_values` and `item_values`. Two sets ship in `dare/templates/`: `kar` (the default: KAR's
open-ended preference-reasoning and factual-knowledge prompts) and `short` (the same facts, answered in at most
four short sentences, so the model can finish). A set's version (`Templates.version`: its name and the hash of its
text) travels with every prompt into its knowledge record.
"""

from __future__ import annotations

import bisect
import hashlib
import importlib.util
import os
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from schemas import ItemEvent, PromptRequest, UserEvent

HISTORY_LIMIT = 15
EVAL_TRAIN_SHARE = 0.8  # `dare eval quality` trains on the oldest 80 % of the ratings; prompts see only those by default
TEMPLATES_DIR = Path(__file__).parent / "templates"  # one directory per packaged set of templates
DEFAULT_TEMPLATES = "kar"
OCCUPATIONS_AS_SPOKEN = {"none": "not employed", "other": "in another occupation"}

# RecBole's column names for the fields prompts and events use (first match wins); every other column is
# kept as it is and can be named in a template.
TITLE_COLUMNS = ("title", "movie_title", "item_name", "name")
YEAR_COLUMNS = ("year", "release_year")
GENRE_COLUMNS = ("genres", "genre", "class", "categories", "category")


class DataError(RuntimeError):
    """A catalogue or template is missing or malformed, or an id is unknown."""


@dataclass(frozen=True)
class Item:
    item_id: str
    title: str
    year: int | None
    genres: tuple[str, ...]
    extra: dict[str, str] = field(default_factory=dict, compare=False)  # the item file's other columns

    def label(self) -> str:
        return f"{self.title} ({self.year})" if self.year else self.title


@dataclass(frozen=True)
class User:
    user_id: str
    age: int | None
    gender: str | None
    occupation: str | None
    extra: dict[str, str] = field(default_factory=dict, compare=False)


@dataclass(frozen=True)
class Rating:
    user_id: str
    item_id: str
    rating: float
    timestamp: int


@dataclass(frozen=True)
class Templates:
    user: str
    item: str
    source: Path

    @property
    def version(self) -> str:
        """"kar-1a2b3c4d": the set's directory name and the hash of both texts, so an edited set is told apart."""
        digest = hashlib.sha256(f"{self.user}\0{self.item}".encode()).hexdigest()[:8]
        return f"{self.source.name}-{digest}"


@dataclass
class Catalogue:
    name: str
    users: dict[str, User]
    items: dict[str, Item]
    ratings: list[Rating]  # in timestamp order
    by_user: dict[str, list[Rating]] = field(default_factory=dict)
    rated: bool = True  # the interactions carry ratings (else every one counts 1, and prompts show none)
    templates: Templates | None = None

    def history(self, user_id: str, limit: int = HISTORY_LIMIT, as_of: int | None = None) -> list[Rating]:
        """The user's `limit` most recent ratings before `as_of` (a timestamp; None: all), oldest first."""
        if user_id not in self.users:
            raise DataError(f"unknown {self.name} user {user_id!r}")
        ratings = self.by_user.get(user_id, [])
        if as_of is not None:
            ratings = ratings[: bisect.bisect_left([r.timestamp for r in ratings], as_of)]
        return ratings[-limit:]

    def time_cut(self, share: float) -> int:
        """The timestamp before which the oldest `share` of the ratings lie (the CTR test's train/validation
        boundary is `time_cut(EVAL_TRAIN_SHARE)`): the first timestamp of the rest."""
        return self.ratings[min(len(self.ratings) - 1, int(share * len(self.ratings)))].timestamp

    def user_ids(self) -> list[str]:
        return sorted_ids(self.users)

    def item_ids(self) -> list[str]:
        return sorted_ids(self.items)


MovieLens = Catalogue  # the default catalogue's type, by its old name


def sorted_ids(ids: dict[str, object]) -> list[str]:
    """Numerically when every id is a number (MovieLens: 1, 2, ..., 10), else as text."""
    return sorted(ids, key=int) if all(i.isdigit() for i in ids) else sorted(ids)


def movielens_dir() -> Path:
    # Located without importing recbole (its import pulls in a training stack we do not need).
    spec = importlib.util.find_spec("recbole")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("MovieLens-100k comes from the recbole package (run `make install`)")
    path = Path(next(iter(spec.submodule_search_locations))) / "dataset_example" / "ml-100k"
    if not (path / "ml-100k.inter").is_file():
        raise DataError(f"recbole is installed but {path / 'ml-100k.inter'} is missing")
    return path


def read_atomic(path: Path) -> Iterator[dict[str, str]]:
    """Rows of one atomic file as {column name: text}; the header's `:type` suffixes are dropped."""
    try:
        f = path.open(encoding="utf-8")
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror})") from None
    with f:
        header = f.readline().rstrip("\n").split("\t")
        names = [h.split(":", 1)[0].strip() for h in header]
        if not any(names):
            raise DataError(f"{path}:1: no header (RecBole atomic files start with `name:type` columns, tab-separated)")
        for number, line in enumerate(f, start=2):
            line = line.rstrip("\n")
            if not line:
                continue
            values = line.split("\t")
            if len(values) != len(names):
                raise DataError(f"{path}:{number}: {len(values)} fields, the header names {len(names)}")
            yield dict(zip(names, values))


def first(row: dict[str, str], columns: tuple[str, ...]) -> str | None:
    return next((row[c] for c in columns if c in row), None)


def number(text: str | None, path: Path, what: str, kind: type = float):  # type: ignore[no-untyped-def]
    if text is None or not text.strip():
        return None
    try:
        return kind(float(text)) if kind is int else kind(text)
    except ValueError:
        raise DataError(f"{path}: {what} {text!r} is not a number") from None


def whole(text: str | None) -> int | None:
    """A year or an age; anything else (MovieLens has a year "unkonwn") is unknown."""
    return int(text) if text and text.strip().isdigit() else None


def packaged_templates() -> list[str]:
    return sorted(p.name for p in TEMPLATES_DIR.iterdir() if (p / "user.txt").is_file())


def templates_dir(templates: Path | str | None) -> Path:
    """A packaged set's name (`kar`, `short`) or a directory holding user.txt and item.txt; None: the default set."""
    if templates is None or str(templates) in packaged_templates():
        return TEMPLATES_DIR / str(templates or DEFAULT_TEMPLATES)
    path = Path(templates)
    if not path.is_dir() and os.sep not in str(templates) and not path.suffix:
        raise DataError(f"--templates {templates}: neither a packaged set ({', '.join(packaged_templates())}) nor a directory")
    return path


def load_catalogue(path: Path | None = None, templates: Path | str | None = None) -> Catalogue:
    """The catalogue in directory `path` (default: MovieLens-100k) with the prompt templates `templates` (see
    `templates_dir`). Errors name the file and line at fault."""
    root = Path(path) if path is not None else movielens_dir()
    return _load(root.resolve(), templates_dir(templates).resolve())


@lru_cache(maxsize=4)
def _load(root: Path, templates_dir: Path) -> Catalogue:
    name = root.name
    inter, item_file, user_file = (root / f"{name}.{ext}" for ext in ("inter", "item", "user"))
    if not inter.is_file():
        raise DataError(f"{root}: no {inter.name} (a catalogue directory NAME/ holds NAME.inter, NAME.item and optionally NAME.user)")
    if not item_file.is_file():
        raise DataError(f"{root}: no {item_file.name}: prompts need the items' titles")
    items = {}
    for row in read_atomic(item_file):
        item_id = row.get("item_id")
        if not item_id:
            raise DataError(f"{item_file}: no item_id column")
        year = whole(first(row, YEAR_COLUMNS))
        genres = tuple((first(row, GENRE_COLUMNS) or "").split())
        extra = {k: v for k, v in row.items() if k not in ("item_id", *TITLE_COLUMNS, *YEAR_COLUMNS, *GENRE_COLUMNS)}
        items[item_id] = Item(item_id, (first(row, TITLE_COLUMNS) or item_id).strip(), year, genres, extra)
    users = {}
    if user_file.is_file():
        for row in read_atomic(user_file):
            user_id = row.get("user_id")
            if not user_id:
                raise DataError(f"{user_file}: no user_id column")
            extra = {k: v for k, v in row.items() if k not in ("user_id", "age", "gender", "occupation")}
            users[user_id] = User(user_id, whole(row.get("age")), row.get("gender") or None,
                                  row.get("occupation") or None, extra)
    ratings, rated = [], True
    for n, row in enumerate(read_atomic(inter)):
        if "user_id" not in row or "item_id" not in row:
            raise DataError(f"{inter}: the header needs user_id and item_id columns")
        rated = "rating" in row
        value = number(row.get("rating"), inter, "rating") if rated else 1.0
        if value is None or not 0.0 <= value <= 5.0:
            raise DataError(f"{inter}:{n + 2}: rating {row.get('rating')!r} is not on the 0–5 scale the wire carries (rescale it)")
        if row["item_id"] not in items:
            raise DataError(f"{inter}:{n + 2}: item {row['item_id']!r} is not in {item_file.name}")
        timestamp = number(row.get("timestamp"), inter, "timestamp", int)
        ratings.append(Rating(row["user_id"], row["item_id"], value, n if timestamp is None else timestamp))
        users.setdefault(row["user_id"], User(row["user_id"], None, None, None))
    ratings.sort(key=lambda r: (r.timestamp, r.user_id, r.item_id))
    by_user: dict[str, list[Rating]] = defaultdict(list)
    for rating in ratings:
        by_user[rating.user_id].append(rating)
    catalogue = Catalogue(name, users, items, ratings, dict(by_user), rated)
    catalogue.templates = read_templates(templates_dir, catalogue)
    return catalogue


def load_movielens() -> Catalogue:
    """MovieLens-100k with the default prompts."""
    return load_catalogue()


# ---------------------------------------------------------------------------- prompts


def read_templates(directory: Path, catalogue: Catalogue) -> Templates:
    """`user.txt` and `item.txt` of `directory`, checked against the catalogue's first user and item."""
    texts = {}
    for kind in ("user", "item"):
        path = directory / f"{kind}.txt"
        try:
            texts[kind] = path.read_text(encoding="utf-8").removesuffix("\n")
        except OSError as exc:
            raise DataError(f"{path}: cannot read the {kind} prompt template ({exc.strerror})") from None
    templates = Templates(texts["user"], texts["item"], directory)
    for kind, values in (("user", user_values(catalogue, next(iter(catalogue.users)))) if catalogue.users else (),
                         ("item", item_values(catalogue, next(iter(catalogue.items)))) if catalogue.items else ()):
        render(texts[kind], values, directory / f"{kind}.txt")
    return templates


def render(template: str, values: dict[str, str], source: Path) -> str:
    try:
        return template.format_map(values)
    except KeyError as exc:
        raise DataError(f"{source}: unknown placeholder {{{exc.args[0]}}}; known: {', '.join(sorted(values))}") from None
    except (ValueError, IndexError) as exc:
        raise DataError(f"{source}: not a template ({exc}); write a literal brace as {{{{ or }}}}") from None


def profile(user: User) -> str:
    """"a male user who is aged 24 and is a technician", with what the catalogue knows."""
    gender = {"M": "male", "F": "female"}.get(user.gender or "", "")
    text = f"a {gender} user" if gender else "a user"
    occupation = OCCUPATIONS_AS_SPOKEN.get(user.occupation, f"a {user.occupation}") if user.occupation else None
    if user.age is not None:
        text += f" who is aged {user.age}" + (f" and is {occupation}" if occupation else "")
    elif occupation:
        text += f" who is {occupation}"
    return text


def user_values(catalogue: Catalogue, user_id: str, limit: int = HISTORY_LIMIT, as_of: int | None = None) -> dict[str, str]:
    """A user template's placeholders: {user_id}, {profile}, {history} (one line per recent interaction
    before `as_of`: title (year), genres, stars) and every other column of the user file."""
    user = catalogue.users.get(user_id)
    history = catalogue.history(user_id, limit, as_of)
    assert user is not None
    lines = []
    for r in history:
        item = catalogue.items[r.item_id]
        parts = [item.label(), "/".join(item.genres)] + ([f"{int(r.rating)} stars"] if catalogue.rated else [])
        lines.append(", ".join(p for p in parts if p))
    return {**user.extra, "user_id": user_id, "profile": profile(user), "history": "\n".join(lines)}


def item_values(catalogue: Catalogue, item_id: str) -> dict[str, str]:
    """An item template's placeholders: {item_id}, {title}, {year}, {label} (title and year), {genres}
    (comma-separated) and every other column of the item file."""
    item = catalogue.items.get(item_id)
    if item is None:
        raise DataError(f"unknown {catalogue.name} item {item_id!r}")
    return {**item.extra, "item_id": item_id, "title": item.title, "year": str(item.year or ""), "label": item.label(),
            "genres": ", ".join(item.genres)}


def user_prompt(catalogue: Catalogue, user_id: str, limit: int = HISTORY_LIMIT, as_of: int | None = None) -> str:
    """The user template (default: KAR's preference-reasoning prompt: profile plus the most recent ratings,
    only those before `as_of` when given)."""
    assert catalogue.templates is not None
    return render(catalogue.templates.user, user_values(catalogue, user_id, limit, as_of), catalogue.templates.source / "user.txt")


def item_prompt(catalogue: Catalogue, item_id: str) -> str:
    """The item template (default: KAR's factual-knowledge prompt)."""
    assert catalogue.templates is not None
    return render(catalogue.templates.item, item_values(catalogue, item_id), catalogue.templates.source / "item.txt")


def prompt_request(ml: Catalogue, entity_kind: str, entity_id: str, request_id: str | None = None, as_of: int | None = None,
                   **extra: object) -> PromptRequest:
    prompt = user_prompt(ml, entity_id, as_of=as_of) if entity_kind == "user" else item_prompt(ml, entity_id)
    assert ml.templates is not None
    return PromptRequest(
        request_id=request_id or f"{entity_kind}-{entity_id}",
        entity_kind=entity_kind,  # type: ignore[arg-type]
        entity_id=entity_id,
        prompt=prompt,
        prompt_version=ml.templates.version,
        **extra,  # type: ignore[arg-type]
    )


# ---------------------------------------------------------------------------- events


def event_prefix(catalogue: Catalogue) -> str:
    """Event ids start with the catalogue's name without dashes (MovieLens-100k: `ml100k`)."""
    return catalogue.name.replace("-", "")


def user_events(ml: Catalogue, limit: int | None = None) -> Iterator[UserEvent]:
    """One event per rating, in timestamp order, for replay into Kafka."""
    prefix = event_prefix(ml)
    for n, r in enumerate(ml.ratings[:limit]):
        user = ml.users[r.user_id]
        yield UserEvent(
            event_id=f"{prefix}-r{n}",
            user_id=r.user_id,
            item_id=r.item_id,
            rating=r.rating,
            timestamp=r.timestamp,
            age=user.age,
            gender=user.gender if user.gender in ("M", "F") else "O" if user.gender else None,
            occupation=user.occupation,
        )


def item_events(ml: Catalogue) -> Iterator[ItemEvent]:
    """One event per item, stamped with its first rating's time (items appear before use)."""
    first_seen: dict[str, int] = {}
    for r in ml.ratings:
        first_seen.setdefault(r.item_id, r.timestamp)
    order = {item_id: n for n, item_id in enumerate(ml.item_ids())}
    for item in sorted(ml.items.values(), key=lambda i: (first_seen.get(i.item_id, 0), order[i.item_id])):
        yield ItemEvent(
            event_id=f"{event_prefix(ml)}-i{item.item_id}",
            item_id=item.item_id,
            title=item.title,
            year=item.year,
            genres=list(item.genres),
            timestamp=first_seen.get(item.item_id, 0),
        )
