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
    with pytest.raises(DataError, match="unknown MovieLens user"):
        user_prompt(ml, "99999")
    with pytest.raises(DataError, match="unknown MovieLens item"):
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
