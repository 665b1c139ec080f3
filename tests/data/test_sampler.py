import numpy as np
import pytest

from docev.data.sampler import DocEVBatchSampler


def _lengths(n=400, seed=0):
    rng = np.random.default_rng(seed)
    l3 = rng.integers(40, 400, size=n)
    return {2: l3 + rng.integers(50, 300, size=n), 3: l3}


def _sampler(**kw):
    args = dict(lengths=_lengths(), sources=np.zeros(400, dtype=int), weights=[1.0], batch_size=4, max_seq_len=1024,
                ratios=[2, 3], seed=7)  # fmt: skip
    args.update(kw)
    return DocEVBatchSampler(**args)


def _all(sampler):
    return [list(b) for b in sampler]


@pytest.mark.parametrize("mode", [{}, {"bucket_by_length": True}, {"packed": True}])
def test_resume_mid_epoch_equals_uninterrupted(mode):
    full = _all(_sampler(**mode))
    first = _sampler(**mode)
    it = iter(first)
    head = [next(it) for _ in range(5)]
    first.advance(5)
    resumed = _sampler(**mode)
    resumed.load_state_dict(first.state_dict())
    assert head + _all(resumed) == full


@pytest.mark.parametrize("mode", [{}, {"bucket_by_length": True}, {"packed": True}])
def test_ranks_agree_on_ratio_and_split_the_data(mode):
    r0 = _all(_sampler(num_replicas=2, rank=0, **mode))
    r1 = _all(_sampler(num_replicas=2, rank=1, **mode))
    assert len(r0) == len(r1) > 0
    for a, b in zip(r0, r1, strict=True):
        assert {r for _, r, _ in a} == {r for _, r, _ in b} and len({r for _, r, _ in a}) == 1
    seen0 = {i for b in r0 for i, _, _ in b}
    seen1 = {i for b in r1 for i, _, _ in b}
    assert not seen0 & seen1


def test_ratio_is_random_per_step_and_raised_when_needed():
    s = _sampler(max_seq_len=600)
    ratios = [b[0][1] for b in s]
    assert set(ratios) == {2, 3}
    lengths = _lengths()
    for batch in s:
        r = batch[0][1]
        assert all(lengths[r][i] <= 600 for i, _, _ in batch) or r == 3
    fixed = _sampler(random_ratio=False)
    assert {b[0][1] for b in fixed} == {2}


def test_packed_rows_fit_and_are_full():
    s = _sampler(packed=True, batch_size=2)
    lengths = _lengths()
    used = total = 0
    for batch in s:
        r = batch[0][1]
        rows = {}
        for i, _, row in batch:
            rows.setdefault(row, []).append(i)
        assert len(rows) == 2
        for members in rows.values():
            n = sum(lengths[r][i] for i in members)
            assert n <= 1024
            used, total = used + n, total + 1024
    assert used / total > 0.95


def test_epochs_differ_and_seed_is_deterministic():
    a, b = _sampler(), _sampler()
    assert _all(a) == _all(b)
    b.set_epoch(1)
    assert _all(a) != _all(b)
    assert _all(_sampler(seed=8)) != _all(a)


def test_source_weights_mix_counts():
    sources = np.array([0] * 200 + [1] * 200)
    s = _sampler(sources=sources, weights=[1.0, 0.25], batch_size=1)
    picked = [i for b in s for i, _, _ in b]
    assert sum(i < 200 for i in picked) == 200 and sum(i >= 200 for i in picked) == 50
    up = _sampler(sources=sources, weights=[2.0, 0.0], batch_size=1)
    picked = [i for b in up for i, _, _ in b]
    assert len(picked) == 400 and all(i < 200 for i in picked)


def test_bucketing_reduces_padding():
    lengths = _lengths()[2]

    def waste(sampler):
        pad = 0
        for batch in sampler:
            ls = [lengths[i] for i, _, _ in batch]
            pad += max(ls) * len(ls) - sum(ls)
        return pad

    plain = waste(_sampler(batch_size=8, random_ratio=False))
    bucketed = waste(_sampler(batch_size=8, random_ratio=False, bucket_by_length=True))
    assert bucketed < plain / 3


def test_unfittable_sample_is_an_error():
    lengths = {2: np.array([2000, 10]), 3: np.array([1500, 10])}
    s = _sampler(lengths=lengths, sources=np.zeros(2, dtype=int), packed=True, batch_size=1)
    with pytest.raises(ValueError, match="longer than max_seq_len"):
        len(s)
