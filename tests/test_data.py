import pytest

from dare.data import DataError, item_events, item_prompt, load_movielens, prompt_request, user_events, user_prompt


@pytest.fixture(scope="module")
def ml():
    return load_movielens()


def test_movielens_sizes(ml):
    assert len(ml.users) == 943
    assert len(ml.items) == 1682
    assert len(ml.ratings) == 100_000
    assert [r.timestamp for r in ml.ratings] == sorted(r.timestamp for r in ml.ratings)


def test_user_prompt_lists_the_most_recent_rated_titles(ml):
    history = ml.by_user["1"]
    prompt = user_prompt(ml, "1")
    recent = [ml.items[r.item_id].title for r in history[-15:]]
    older = ml.items[history[0].item_id].title
    assert all(title in prompt for title in recent)
    assert older not in recent and older not in prompt
    assert "aged 24" in prompt and "technician" in prompt
    assert "stars" in prompt


def test_item_prompt_names_title_year_and_genres(ml):
    prompt = item_prompt(ml, "1")
    assert "Toy Story (1995)" in prompt and "Animation" in prompt


def test_unknown_ids_are_clear_errors(ml):
    with pytest.raises(DataError, match="unknown ml-100k user"):
        user_prompt(ml, "99999")
    with pytest.raises(DataError, match="unknown ml-100k item"):
        item_prompt(ml, "0")


def test_events_follow_the_data_in_time_order(ml):
    events = list(user_events(ml, limit=1000))
    assert len(events) == 1000
    assert [e.timestamp for e in events] == sorted(e.timestamp for e in events)
    items = list(item_events(ml))
    assert len(items) == 1682
    assert [e.timestamp for e in items] == sorted(e.timestamp for e in items)


def test_prompt_request_is_schema_valid(ml):
    request = prompt_request(ml, "user", "7")
    assert request.request_id == "user-7" and request.entity_id == "7"


# ---------------------------------------------------------------- your own catalogue (RecBole atomic files)


def test_default_prompts_are_kar_s_text_exactly(ml):
    assert item_prompt(ml, "1") == (
        "Introduce the movie Toy Story (1995) (Animation, Children's, Comedy) and describe its attributes precisely "
        "(including but not limited to genre, director/actors, time period/country, character, plot/theme, mood/tone, "
        "critical acclaim/award, production quality, and soundtrack).")
    assert user_prompt(ml, "1").startswith("Given a male user who is aged 24 and is a technician, this user's movie viewing history")


def test_an_atomic_catalogue_with_its_own_columns_and_templates(shop_files):
    from dare.data import load_catalogue

    shop = load_catalogue(*shop_files)
    assert shop.name == "shop" and len(shop.users) == 30 and len(shop.items) == 12 and len(shop.ratings) == 180
    assert shop.user_ids()[:3] == ["c0", "c1", "c10"]  # ids that are not numbers sort as text
    prompt = user_prompt(shop, "c3")
    last = shop.by_user["c3"][-1]
    assert prompt.startswith("Customer c3 (a user who is aged 23, region3) bought:\n")
    assert f"Item number {last.item_id[1:]}, " in prompt and f"{int(last.rating)} stars" in prompt
    assert item_prompt(shop, "p5") == "Describe Item number 5 by brand2 (Kitchen, Gifts)."
    request = prompt_request(shop, "item", "p5", request_id="shop-p5")
    assert request.prompt == item_prompt(shop, "p5")
    events = list(user_events(shop))
    assert len(events) == 180 and events[0].event_id == "shop-r0" and events[0].age == 20 and events[0].gender is None
    assert [e.item_id for e in item_events(shop)] and all(e.genres for e in item_events(shop))


def test_interactions_without_ratings_or_timestamps(shop_files):
    from dare.data import load_catalogue

    root, templates = shop_files
    lines = (root / "shop.inter").read_text().splitlines()
    (root / "shop.inter").write_text("user_id:token\titem_id:token\n" + "".join("\t".join(line.split("\t")[:2]) + "\n" for line in lines[1:]))
    shop = load_catalogue(root, templates)
    assert not shop.rated and [r.timestamp for r in shop.ratings] == sorted(r.timestamp for r in shop.ratings)
    assert "stars" not in user_prompt(shop, "c0")


@pytest.mark.parametrize("breakage, message", [
    (lambda root, t: (root / "shop.inter").unlink(), "no shop.inter"),
    (lambda root, t: (root / "shop.item").unlink(), "no shop.item"),
    (lambda root, t: (root / "shop.inter").write_text("user_id:token\titem_id:token\trating:float\nc1\tp1\t7\n"),
     r"shop.inter:2: rating '7' is not on the 0–5 scale"),
    (lambda root, t: (root / "shop.inter").write_text("user_id:token\titem_id:token\nc1\tnope\n"),
     r"shop.inter:2: item 'nope' is not in shop.item"),
    (lambda root, t: (root / "shop.inter").write_text("user_id:token\titem_id:token\nc1\n"), r"shop.inter:2: 1 fields, the header names 2"),
    (lambda root, t: (t / "user.txt").write_text("Hello {nickname}\n"), r"user.txt: unknown placeholder \{nickname\}; known: .*profile"),
    (lambda root, t: (t / "item.txt").write_text("Hello {\n"), r"item.txt: not a template"),
    (lambda root, t: (t / "item.txt").unlink(), r"item.txt: cannot read the item prompt template"),
])
def test_a_bad_catalogue_or_template_is_a_clear_error(shop_files, breakage, message):
    from dare.data import load_catalogue

    root, templates = shop_files
    breakage(root, templates)
    with pytest.raises(DataError, match=message):
        load_catalogue(root, templates)


def test_no_rating_at_or_after_the_cut_off_reaches_a_prompt(ml):
    cut = ml.time_cut(0.8)
    assert sum(r.timestamp < cut for r in ml.ratings) <= 80_000 < sum(r.timestamp <= cut for r in ml.ratings)
    for user_id in ml.users:
        before = [r for r in ml.by_user.get(user_id, []) if r.timestamp < cut][-15:]
        assert ml.history(user_id, as_of=cut) == before
    # at prompt level: a user active on both sides of the cut sees only the ratings before it
    user_id = next(u for u, rs in ml.by_user.items() if rs[-1].timestamp >= cut and len([r for r in rs if r.timestamp < cut]) >= 3)
    lines = user_prompt(ml, user_id, as_of=cut).splitlines()[1:-1]
    expected = [f"{ml.items[r.item_id].label()}, {'/'.join(ml.items[r.item_id].genres)}, {int(r.rating)} stars"
                for r in ml.by_user[user_id] if r.timestamp < cut][-15:]
    assert lines == expected
    assert user_prompt(ml, user_id) != user_prompt(ml, user_id, as_of=cut)


def test_packaged_templates_by_name_and_their_versions(ml, tmp_path):
    """`--templates kar|short|DIR`: each set's version is its name and a hash of its text, in every prompt request."""
    from dare.data import DataError, load_catalogue, prompt_request

    kar, short = load_catalogue(templates="kar"), load_catalogue(templates="short")
    assert ml.templates.version == kar.templates.version and kar.templates.version.startswith("kar-")
    assert short.templates.version.startswith("short-") and short.templates.version != kar.templates.version
    assert "at most four short sentences" in prompt_request(short, "item", "1").prompt
    assert prompt_request(short, "user", "1").prompt_version == short.templates.version
    edited = tmp_path / "kar"
    edited.mkdir()
    for kind in ("user", "item"):
        (edited / f"{kind}.txt").write_text((kar.templates.source / f"{kind}.txt").read_text() + " Be brief.")
    assert load_catalogue(templates=edited).templates.version != kar.templates.version  # same name, other text
    with pytest.raises(DataError, match="neither a packaged set"):
        load_catalogue(templates="shrot")
