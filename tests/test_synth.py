"""`dare data synth`: a synthetic catalogue in RecBole's atomic files, skewed like a real one, readable by
`dare.data` and valid on the wire."""

from collections import Counter

import numpy as np

from dare.data import item_events, load_catalogue, user_events, user_prompt
from dare.synth import synth


def test_a_synthetic_catalogue_has_power_law_activity_popularity_and_tastes(tmp_path):
    counts = synth(tmp_path / "synthetic", users=500, items=120, ratings=20_000, genres=8, seed=3)
    shop = load_catalogue(tmp_path / "synthetic")
    assert counts == {"users": 500, "items": 120, "ratings": 20_000, "genres": 8}
    assert len(shop.ratings) == 20_000 and len(shop.items) == 120 and len(shop.users) == 500
    assert [r.timestamp for r in shop.ratings] == sorted(r.timestamp for r in shop.ratings)

    def top_tenth_share(counter, n):
        ranked = sorted(counter.values(), reverse=True)
        return sum(ranked[: n // 10]) / sum(ranked)

    assert top_tenth_share(Counter(r.user_id for r in shop.ratings), 500) > 0.3  # uniform: 0.1
    assert top_tenth_share(Counter(r.item_id for r in shop.ratings), 120) > 0.3
    # a user's ratings fall in few genres (uniform over 8 main genres: 0.25 in any two)
    shares = []
    for ratings in shop.by_user.values():
        if len(ratings) >= 20:
            genres = Counter(shop.items[r.item_id].genres[0] for r in ratings)
            shares.append(sum(c for _, c in genres.most_common(2)) / len(ratings))
    assert len(shares) > 50 and np.mean(shares) > 0.5
    assert {r.rating for r in shop.ratings} == {1.0, 2.0, 3.0, 4.0, 5.0}
    # its events are valid messages, and prompts can be written for it
    assert len(list(user_events(shop, 100))) == 100 and len(list(item_events(shop))) == 120
    user = max(shop.by_user, key=lambda u: len(shop.by_user[u]))
    assert user_prompt(shop, user).count(" stars") == 15


def test_the_same_seed_writes_the_same_catalogue(tmp_path):
    synth(tmp_path / "a" / "synthetic", users=50, items=20, ratings=500, genres=4, seed=1)
    synth(tmp_path / "b" / "synthetic", users=50, items=20, ratings=500, genres=4, seed=1)
    for ext in ("inter", "item", "user"):
        assert (tmp_path / "a" / "synthetic" / f"synthetic.{ext}").read_text() == (tmp_path / "b" / "synthetic" / f"synthetic.{ext}").read_text()
