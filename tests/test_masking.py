"""Masking policies as pure functions: properties checked with hypothesis, no model needed."""

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from curate import masking

pytestmark = pytest.mark.fast

# A batch of examples as flat token buffers, the way Arrow stores list columns.
logprob = st.one_of(st.none(), st.floats(min_value=-30, max_value=0, allow_nan=False))


@st.composite
def token_batches(draw):
    lengths = draw(st.lists(st.integers(min_value=1, max_value=30), min_size=1, max_size=8))
    n = sum(lengths)
    logprobs = np.array(
        [np.nan if v is None else v for v in draw(st.lists(logprob, min_size=n, max_size=n))], dtype=np.float32
    )
    target = np.array(draw(st.lists(st.booleans(), min_size=n, max_size=n)))
    protected = target & np.array(draw(st.lists(st.booleans(), min_size=n, max_size=n)))
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    return logprobs, target, protected, offsets


def test_threshold_masks_exactly_the_tokens_above_tau():
    logprobs = np.log(np.array([np.nan, 0.9, 0.5, 0.41, 0.39, 0.1, 0.401], dtype=np.float64)).astype(np.float32)
    target = np.array([False, True, True, True, True, False, True])
    keep = masking.threshold_keep(logprobs, target, threshold=2.5)
    # ppl: -, 1.11, 2, 2.44, 2.56, 10 (not a target), 2.49
    assert keep.tolist() == [False, True, True, True, False, False, True]


@given(token_batches(), st.floats(min_value=1.0, max_value=50.0))
def test_labels_are_a_subset_of_target_tokens(batch, threshold):
    logprobs, target, protected, offsets = batch
    for keep in (
        masking.threshold_keep(logprobs, target, threshold),
        masking.per_sample_keep(logprobs, target, protected, offsets, 0.3),
        masking.cutoff_keep(logprobs, target, protected, *masking.ratio_cutoff(-logprobs[target & ~protected], 0.3))[0],
    ):
        assert not (keep & ~target).any()


@given(token_batches(), st.floats(min_value=1.0, max_value=50.0), st.floats(min_value=1.0, max_value=50.0))
def test_raising_tau_never_masks_more(batch, a, b):
    logprobs, target, _, _ = batch
    low, high = sorted((a, b))
    assert (masking.threshold_keep(logprobs, target, high) >= masking.threshold_keep(logprobs, target, low)).all()


@settings(max_examples=200)
@given(token_batches(), st.floats(min_value=0, max_value=1), st.integers(min_value=1, max_value=4))
def test_mask_ratio_masks_within_one_token_of_r_across_batches(batch, ratio, pieces):
    logprobs, target, protected, offsets = batch
    maskable_nll = -logprobs[target & ~protected].astype(np.float64)
    cutoff, ties = masking.ratio_cutoff(maskable_nll, ratio)
    # Apply the cut-off batch by batch (as export does shard by shard).
    bounds = np.linspace(0, logprobs.size, pieces + 1).astype(int)
    masked = 0
    for start, end in zip(bounds[:-1], bounds[1:]):
        keep, ties = masking.cutoff_keep(logprobs[start:end], target[start:end], protected[start:end], cutoff, ties)
        masked += int((target[start:end] & ~keep).sum())
    scored = int(np.isfinite(maskable_nll).sum())
    assert abs(masked - ratio * scored) <= 1


@given(token_batches(), st.floats(min_value=0, max_value=1))
def test_mask_ratio_masks_the_most_surprising_tokens(batch, ratio):
    logprobs, target, protected, _ = batch
    cutoff, ties = masking.ratio_cutoff(-logprobs[target & ~protected].astype(np.float64), ratio)
    keep, _ = masking.cutoff_keep(logprobs, target, protected, cutoff, ties)
    nll = -logprobs.astype(np.float64)
    masked = target & ~keep
    kept_maskable = keep & ~protected & np.isfinite(nll)
    if masked.any() and kept_maskable.any():
        assert nll[masked].min() >= nll[kept_maskable].max()


@given(token_batches(), st.floats(min_value=0, max_value=1))
def test_per_sample_ratio_masks_round_r_of_each_example(batch, ratio):
    logprobs, target, protected, offsets = batch
    keep = masking.per_sample_keep(logprobs, target, protected, offsets, ratio)
    for start, end in zip(offsets[:-1], offsets[1:]):
        span = slice(start, end)
        candidates = target[span] & ~protected[span] & np.isfinite(logprobs[span])
        assert int((target[span] & ~keep[span]).sum()) == round(ratio * candidates.sum())
        assert not (target[span] & protected[span] & ~keep[span]).any()


def test_protected_tokens_stay_trained_whatever_their_perplexity():
    logprobs = np.array([np.nan, -9.0, -9.0], dtype=np.float32)
    target = np.array([False, True, True])
    protected = np.array([False, False, True])
    keep = masking.protect(masking.threshold_keep(logprobs, target, 2.5), target, protected)
    assert keep.tolist() == [False, False, True]


def test_default_threshold_is_the_papers():
    """τ = 2.5, i.e. the paper's p < 0.4: without a threshold given, a target token the model gives
    probability 0.41 stays trained and one it gives 0.39 is masked."""
    logprobs = np.log(np.array([0.41, 0.39], dtype=np.float64)).astype(np.float32)
    assert masking.DEFAULT_THRESHOLD == 2.5
    assert masking.threshold_keep(logprobs, np.array([True, True])).tolist() == [True, False]
