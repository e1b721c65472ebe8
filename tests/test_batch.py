"""Batched DARE on a tiny random float64 Llama: every row's strict output is its own greedy output,
whatever the batch does around it (rows of different lengths, finishing at different steps,
joining and leaving mid-run)."""

import random

import pytest

from tests.device_model import ModelledDevice
from tests.test_engine import EOS, VOCAB, greedy, tiny_llama
from workers.engine.algorithm.accept import Acceptance
from workers.engine.algorithm.budget import Budget
from workers.engine.algorithm.cost import CostModel
from workers.engine.algorithm.draft import DraftConfig, RetrievalDrafter
from workers.engine.algorithm.trie import Pool
from workers.engine.backends.batch import BatchDecoder


@pytest.fixture(scope="module")
def tiny():
    return tiny_llama()


def pools_with_answers(model, prompts, rng):
    """A pool holding noisy copies of the rows' true continuations: long, partly right drafts."""
    pool = Pool(depth=8)
    for i, prompt in enumerate(prompts):
        truth = greedy(model, prompt, 30, eos=False)
        noisy = [t if rng.random() > 0.15 else rng.randrange(2, VOCAB) for t in truth]
        pool.add(f"t{i}", prompt[-3:] + noisy)
    return pool


def join(decoder, key, prompt, pool, n, mode="strict"):
    drafter = RetrievalDrafter([(pool, 1.0)], DraftConfig(), prompt=prompt)
    decoder.add(key, prompt, drafter, Budget(CostModel.flat()), Acceptance(mode), n)


def run_to_end(decoder, joining=()):
    """Step until empty; `joining` holds (step, key, prompt, pool, n) rows that join at that step."""
    results, step = {}, 0
    pending = list(joining)
    while len(decoder) or pending:
        for item in [j for j in pending if j[0] <= step]:
            join(decoder, *item[1:])
            pending.remove(item)
        for finished in decoder.step():
            results[finished.key] = finished
        step += 1
    return results


def test_strict_batched_rows_equal_their_own_greedy_decoding(tiny):
    rng = random.Random(3)
    prompts = [[rng.randrange(2, VOCAB) for _ in range(rng.randrange(2, 30))] for _ in range(9)]
    lengths = [rng.randrange(5, 40) for _ in prompts]
    pool = pools_with_answers(tiny, prompts, rng)
    decoder = ModelledDevice.following(CostModel.flat()).attach(BatchDecoder(tiny, {EOS}))  # drafts pay, as the curve says
    for i, (prompt, n) in enumerate(zip(prompts, lengths)):
        join(decoder, i, prompt, pool, n)
    results = run_to_end(decoder)
    assert sorted(results) == list(range(len(prompts)))
    for i, (prompt, n) in enumerate(zip(prompts, lengths)):
        assert results[i].token_ids == greedy(tiny, prompt, n), f"row {i}"
    assert sum(sum(r.stats.accepted) for r in results.values()) > 1.5 * sum(r.stats.steps for r in results.values())
    assert len({r.stats.steps for r in results.values()}) > 1  # rows finished at different steps


def test_rows_starting_with_the_shared_prefix_decode_as_if_prefilled_whole(tiny):
    rng = random.Random(5)
    prefix = [rng.randrange(2, VOCAB) for _ in range(6)]
    tails = [[rng.randrange(2, VOCAB) for _ in range(rng.randrange(1, 20))] for _ in range(7)]
    prompts = [prefix + t for t in tails[:5]] + [prefix[:4] + tails[5], prefix + tails[6][:0], [prefix[0], 3]]
    pool = pools_with_answers(tiny, prompts, rng)
    decoder = BatchDecoder(tiny, {EOS}, rows=3, prefix=prefix)
    for i in (0, 5, 7):
        join(decoder, i, prompts[i], pool, 20)
    joining = [(step, i, prompts[i], pool, 20) for step, i in zip((1, 1, 3, 3, 6), (1, 2, 3, 4, 6))]  # some after the prefix is cached
    results = run_to_end(decoder, joining)
    assert decoder.prefix_kv is not None
    for i, prompt in enumerate(prompts):
        assert results[i].token_ids == greedy(tiny, prompt, 20), f"row {i}"


def test_rows_joining_and_leaving_mid_run_change_no_other_row(tiny):
    rng = random.Random(11)
    prompts = [[rng.randrange(2, VOCAB) for _ in range(rng.randrange(2, 25))] for _ in range(8)]
    pool = pools_with_answers(tiny, prompts, rng)
    decoder = BatchDecoder(tiny, {EOS})
    join(decoder, 0, prompts[0], pool, 40)
    join(decoder, 1, prompts[1], pool, 6)  # leaves early
    joining = [(step, i, prompts[i], pool, rng.randrange(8, 35)) for step, i in zip((1, 2, 2, 4, 7, 9), range(2, 8))]
    results = run_to_end(decoder, joining)
    wanted = {0: 40, 1: 6} | {i: n for _, i, _, _, n in joining}
    for i, n in wanted.items():
        assert results[i].token_ids == greedy(tiny, prompts[i], n), f"row {i}"


def test_rows_prefilled_a_group_a_step_while_others_decode_change_no_row(tiny):
    rng = random.Random(13)
    prompts = [[rng.randrange(2, VOCAB) for _ in range(rng.randrange(4, 40))] for _ in range(9)]
    pool = pools_with_answers(tiny, prompts, rng)
    decoder = BatchDecoder(tiny, {EOS}, prefill_per_step=1)  # one prefill call between two steps
    results, overlapping, step = {}, 0, 0
    while step < 5 or len(decoder):
        for i in range(2 * step - 1, 2 * step + 1) if step < 5 else ():
            if i >= 0:
                join(decoder, i, prompts[i], pool, 25)
        results.update({f.key: f for f in decoder.step()})
        overlapping += bool(decoder.rows and decoder.filling)
        step += 1
    assert overlapping >= 2  # rows decoded while others still waited for their prefill
    for i, prompt in enumerate(prompts):
        assert results[i].token_ids == greedy(tiny, prompt, 25), f"row {i}"
    # the time rows stood still for the others' prefills is counted; a row decoded alone stood still for none
    stats = [results[i].stats for i in range(len(prompts))]
    assert sum(s.stalled_s > 0 for s in stats) >= 3
    assert all(0 <= s.stalled_s < s.wall_s and s.prefill_s > 0 for s in stats)
    alone = BatchDecoder(tiny, {EOS})
    join(alone, 0, prompts[0], pool, 25)
    only = run_to_end(alone)[0].stats
    assert only.stalled_s == 0 and only.prefill_s > 0


def test_relaxed_rows_decode_and_draft_from_their_own_pools(tiny):
    rng = random.Random(5)
    prompts = [[rng.randrange(2, VOCAB) for _ in range(12)] for _ in range(4)]
    pools = [pools_with_answers(tiny, [p], rng) for p in prompts]
    decoder = ModelledDevice.following(CostModel.flat()).attach(BatchDecoder(tiny, {EOS}))
    for i, prompt in enumerate(prompts):
        join(decoder, i, prompt, pools[i], 25, mode="relaxed")
    results = run_to_end(decoder)
    assert all(0 < len(results[i].token_ids) <= 25 for i in range(4))
    assert all(r.stats.mean_accepted > 1.0 for r in results.values())
    assert len(decoder) == 0 and decoder.cache.data.shape[2] >= 4  # everyone left; the cache kept its rows


def test_the_batch_budget_picks_a_width_the_cost_curve_pays_for():
    from workers.engine.algorithm.budget import allocate

    scores = [[0.9, 0.8, 0.7, 0.6], [0.1, 0.05, 0.01], [0.5, 0.5]]
    flat = CostModel({1: 1.0, 512: 1.0})
    assert allocate(scores, [1.0, 1.0, 1.0], flat) == [4, 3, 2]  # free verification: send everything
    steep = CostModel({1: 1.0, 2: 2.0, 64: 64.0})
    assert allocate(scores, [1.0, 1.0, 1.0], steep) == [0, 0, 0]  # each token costs a step: send nothing
    cpu_like = CostModel({1: 1.0, 3: 1.1, 6: 1.4, 12: 2.5, 24: 5.0, 64: 13.0})  # by total tokens (rows x width)
    likely, unlikely = [[0.9**i for i in range(1, 9)]] * 3, [[0.5**i for i in range(1, 9)]] * 3
    confident = allocate(likely, [1.0] * 3, cpu_like)
    assert len(set(confident)) == 1 and 0 < allocate(unlikely, [1.0] * 3, cpu_like)[0] < confident[0] < 8  # likely drafts buy a wider tree
    assert allocate(likely, [0.2] * 3, cpu_like)[0] < confident[0]  # rows whose drafts failed lately: narrower
    assert allocate(scores, [1.0, 0.0, 1.0], flat) == [4, 0, 2]  # a row whose drafts never pass sends none


def test_allocate_packed_sends_drafts_only_where_they_pay():
    from workers.engine.algorithm.budget import allocate_packed

    scores = [[0.9, 0.8, 0.1], [0.5], []]
    flat = CostModel({1: 1.0, 64: 1.0})
    assert allocate_packed(scores, [1.0, 1.0, 0.0], flat, rows=3) == [3, 1, 0]  # free tokens: send all
    steep = CostModel({1: 1.0, 2: 2.0, 64: 64.0})  # every token costs a whole step
    assert allocate_packed(scores, [1.0, 1.0, 0.0], steep, rows=3) == [0, 0, 0]
    mild = CostModel({1: 1.0, 3: 1.0, 6: 1.5, 64: 20.0})  # a few tokens almost free, then expensive
    sizes = allocate_packed(scores, [1.0, 1.0, 0.0], mild, rows=3)
    assert sizes[0] >= 1 and sizes[0] >= sizes[1] and sizes[2] == 0
    assert allocate_packed(scores, [0.0, 0.0, 0.0], flat, rows=3) == [0, 0, 0]  # uncalibrated rows send none
    linear = CostModel({1: 1.0, 64: 64.0})  # 1 s a token: a wide step on a compute-bound CPU, by the curve
    likely = [[0.9, 0.8], [0.7], [0.2]]
    assert allocate_packed(likely, [1.0] * 3, linear) == [0, 0, 0]  # 3 tokens in 3 s beat 5.4 in 6 s
    # measured, a plain step of these 3 rows takes 6 s, not 3 (attention over their contexts): each draft token
    # still adds 1 s, so the likely ones pay, the unlikely one does not
    assert allocate_packed(likely, [1.0] * 3, linear, plain_s=6.0) == [2, 1, 0]
    assert allocate_packed(likely, [1.0] * 3, linear, overhead_s=3.0, plain_s=6.0) == [0, 0, 0]  # retrieval eats it


def test_drafting_overhead_counts_against_the_drafts():
    from workers.engine.algorithm.budget import allocate

    likely = [[0.9, 0.8]] * 4
    mild = CostModel({1: 1.0, 4: 1.0, 8: 1.3, 12: 1.6})  # 4 rows: each draft per row adds 30 %
    assert allocate(likely, [1.0] * 4, mild) == [2, 2, 2, 2]  # 10.8 tokens in 1.6 beat 4 in 1
    assert allocate(likely, [1.0] * 4, mild, overhead_s=0.5) == [2, 2, 2, 2]  # ... and in 2.1
    assert allocate(likely, [1.0] * 4, mild, overhead_s=2.0) == [0, 0, 0, 0]  # not in 3.6: retrieval costing 2 steps


def test_retrieval_that_does_not_pay_is_valued_below_one():
    from workers.engine.algorithm.budget import drafting_value

    mild = CostModel({1: 1.0, 4: 1.0, 8: 1.3, 12: 1.6})
    assert drafting_value([[0.9, 0.8]] * 4, [1.0] * 4, mild, 0.1, 0.0) == pytest.approx((10.8 / 1.7) / 4)
    assert drafting_value([[0.1]] * 4, [1.0] * 4, mild, 0.25, 0.0) == pytest.approx(1 / 1.25)  # a plain step, 0.25 later


def test_a_drafting_pause_backs_off_while_drafts_do_not_pay_and_ends_when_they_do():
    from workers.engine.algorithm.budget import DraftPause

    pause = DraftPause(longest=4)
    seen = []
    for _ in range(16):
        drafting = pause.drafting(rows=8)
        seen.append(drafting)
        if drafting:
            pause.judge(0.5, rows=8)
    # the optimistic start absorbs one bad step; then pauses of 1, 2, 4, 4 steps between probes
    assert seen == [True, True, False, True, False, False, True, False, False, False, False, True, False, False, False, False]
    for _ in range(4):
        pause.judge(2.0, rows=8)  # drafting pays again: no pause, the backoff starts over
    assert pause.value >= 1.0 and pause.backoff == 1 and pause.remaining == 0
    while not pause.remaining:
        pause.judge(0.1, rows=8)
    assert pause.remaining == 1 and not pause.drafting(rows=7)  # one row left a full batch: it is back at the next poll
    while not pause.remaining:
        pause.judge(0.1, rows=8)
    assert pause.drafting(rows=5)  # the batch shrank to a quarter less or fewer: draft again at once
    one_bad = DraftPause()
    for value in (2.0, 2.0, 0.9, 2.0, 0.9, 2.0):  # batch 1 passing a stretch its pools do not cover
        one_bad.judge(value, rows=1)
    assert one_bad.remaining == 0  # occasional weak trees do not pause a request whose drafts pay


def test_the_step_clock_judges_drafting_steps_by_their_measured_tokens_per_second():
    from workers.engine.algorithm.budget import StepClock

    curve = CostModel({1: 0.010, 64: 0.073})  # 1 ms a token past the first
    clock = StepClock(probe_rows=4, stale_after=3, keep=5, trusted=3)
    assert not clock.wants_plain(rows=2) and clock.wants_plain(rows=8)  # small batches never spend a step measuring
    assert clock.gain(0.05, 16, 8, curve) is None  # no plain step timed yet
    for seconds in (0.5, 0.034, 0.034):  # 8 rows: a first slow step, then 2x what the one-row curve says (0.017 s)
        clock.plain(seconds, 8, curve)
    assert clock.ratio == pytest.approx(2.0) and not clock.wants_plain(rows=8)  # the median: one slow step does not set it
    assert clock.gain(0.068, 16, 8, curve) == pytest.approx(1.0)  # twice the tokens in twice the time
    assert clock.gain(0.136, 16, 8, curve) == pytest.approx(0.5)
    assert clock.gain(0.034, 24, 8, curve) == pytest.approx(3.0)
    assert clock.wants_plain(rows=8)  # three drafting steps since the last plain one: time a plain step again


class CountingDrafter(RetrievalDrafter):
    """Counts its retrievals; each costs `retrieval_s` of the device's time."""

    calls = 0

    def __init__(self, *args, device: ModelledDevice, retrieval_s: float = 0.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.device, self.retrieval_s = device, retrieval_s

    def get_candidates(self, context):
        CountingDrafter.calls += 1
        self.device.spend(self.retrieval_s)
        return super().get_candidates(context)


@pytest.mark.parametrize(("cost", "retrieves"), [(CostModel({1: 0.001, 512: 0.001}), "every step"),
                                                 (CostModel({1: 0.001, 512: 0.512}), "seldom")])
def test_the_scheduler_retrieves_only_while_drafts_pay(tiny, cost, retrieves):
    """Steps flat in tokens (a GPU): drafts every step. Steps linear in tokens (a compute-bound CPU at a
    wide batch; 1 ms a token, and a retrieval costs 0.1 ms): no drafts are sent, retrieval pauses after a
    few probes, and the output is still each row's greedy decoding. The device's steps take what its curve
    says (`ModelledDevice`), whatever the machine running the test."""
    rng = random.Random(5)
    prompts = [[rng.randrange(2, VOCAB) for _ in range(rng.randrange(3, 12))] for _ in range(4)]
    pool = pools_with_answers(tiny, prompts, rng)
    device = ModelledDevice.following(cost)
    decoder = device.attach(BatchDecoder(tiny, {EOS}))
    CountingDrafter.calls = 0
    for i, prompt in enumerate(prompts):
        drafter = CountingDrafter([(pool, 1.0)], DraftConfig(), prompt=prompt, device=device, retrieval_s=0.0001)
        decoder.add(i, prompt, drafter, Budget(cost), Acceptance("strict"), 40)
    results, steps = {}, 0
    while len(decoder):
        results.update({f.key: f for f in decoder.step()})
        steps += 1
    row_steps = sum(r.stats.steps for r in results.values())
    if retrieves == "every step":  # all but the plain steps that time the device (the first 3, then 1 in 33), 4 rows each
        assert CountingDrafter.calls >= row_steps - 4 * (3 + steps // 33) and all(r.stats.mean_accepted > 1.5 for r in results.values())
    else:
        assert CountingDrafter.calls <= row_steps / 3 and sum(sum(r.stats.drafted) for r in results.values()) == 0
    for i, prompt in enumerate(prompts):
        assert results[i].token_ids == greedy(tiny, prompt, 40)[: len(results[i].token_ids)]


def test_drafts_pause_where_the_device_is_slower_than_the_curve_says(tiny):
    """The cost curve says a step costs the same at any width (as measured for one request), but this
    batch's steps take 3 ms a token, 6 ms in a drafting step: drafting steps are measured against plain
    ones and retrieval pauses, and every row is still its own greedy decoding."""
    rng = random.Random(7)
    prompts = [[rng.randrange(2, VOCAB) for _ in range(rng.randrange(3, 12))] for _ in range(6)]
    pool = pools_with_answers(tiny, prompts, rng)
    flat = CostModel({1: 0.003, 512: 0.003})
    device = ModelledDevice(lambda tokens, wide: 0.003 * tokens * (2 if wide else 1))
    decoder = device.attach(BatchDecoder(tiny, {EOS}, rows=6))
    CountingDrafter.calls = 0
    for i, prompt in enumerate(prompts):
        decoder.add(i, prompt, CountingDrafter([(pool, 1.0)], DraftConfig(), prompt=prompt, device=device), Budget(flat, max_tokens=8),
                    Acceptance("strict"), 100)
    results = {}
    while len(decoder):
        results.update({f.key: f for f in decoder.step()})
    row_steps = sum(r.stats.steps for r in results.values())
    assert decoder.clock.ratio == pytest.approx(6.0)  # 6 tokens: 18 ms against the curve's 3
    assert CountingDrafter.calls <= row_steps / 3, (CountingDrafter.calls, row_steps)
    for i, prompt in enumerate(prompts):
        assert results[i].token_ids == greedy(tiny, prompt, 100)[: len(results[i].token_ids)]
