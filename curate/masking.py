"""Keep-masks from per-token log-probabilities: which target tokens stay in the loss.

Pure functions over flat numpy buffers (one entry per token of a batch of examples, as
Arrow stores list columns), no model and no I/O. A token's perplexity is
exp(-logprob), logprob being the natural-log probability under the model to be tuned;
a token without a logprob (the first of a sequence) is never masked.

Selective Token Masking (arXiv 2501.14315): drop from the loss every target token whose
perplexity exceeds τ (strictly). τ = 2.5, i.e. p < 0.4, is the paper's default.
"""

from __future__ import annotations

import numpy as np

DEFAULT_THRESHOLD = 2.5


def token_nll(logprobs: np.ndarray) -> np.ndarray:
    """Negative log-likelihood per token (NaN where there is no logprob)."""
    return -np.asarray(logprobs, dtype=np.float64)


def threshold_keep(logprobs: np.ndarray, target: np.ndarray, threshold: float = DEFAULT_THRESHOLD) -> np.ndarray:
    """STM: keep target tokens whose perplexity exp(-logprob) is at most `threshold`."""
    if threshold <= 0:
        raise ValueError("the perplexity threshold must be positive")
    nll = token_nll(logprobs)
    surprising = nll > np.log(threshold)  # NaN compares False: unscored tokens are kept
    return target & ~surprising


def ratio_cutoff(target_nll: np.ndarray, ratio: float) -> tuple[float, int]:
    """For masking the `ratio` most surprising tokens of a whole set: the NLL cut-off and
    how many tokens exactly at the cut-off must also be masked (ties), so that exactly
    round(ratio * n) tokens are masked. `target_nll` holds the NLL of every maskable token."""
    if not 0 <= ratio <= 1:
        raise ValueError("the mask ratio must be between 0 and 1")
    values = target_nll[np.isfinite(target_nll)]
    count = int(round(ratio * values.size))
    if count == 0:
        return np.inf, 0
    cutoff = float(np.partition(values, values.size - count)[values.size - count])
    above = int(np.count_nonzero(values > cutoff))
    return cutoff, count - above


def cutoff_keep(logprobs: np.ndarray, target: np.ndarray, protected: np.ndarray, cutoff: float, ties: int) -> tuple[np.ndarray, int]:
    """Apply a `ratio_cutoff` to one batch: mask maskable tokens above the cut-off and the
    first `ties` tokens exactly at it. Returns the keep-mask and the ties still to mask
    (batches are processed in order, so the set as a whole masks exactly the count)."""
    nll = token_nll(logprobs)
    maskable = target & ~protected
    masked = maskable & (nll > cutoff)
    if ties > 0:
        at_cutoff = np.flatnonzero(maskable & (nll == cutoff))[:ties]
        masked[at_cutoff] = True
        ties -= at_cutoff.size
    return target & ~masked, ties


def per_sample_keep(logprobs: np.ndarray, target: np.ndarray, protected: np.ndarray, offsets: np.ndarray, ratio: float) -> np.ndarray:
    """Mask the round(ratio * n) most surprising maskable tokens within each example
    (n = that example's maskable, scored target tokens). `offsets` are Arrow list offsets."""
    if not 0 <= ratio <= 1:
        raise ValueError("the per-sample ratio must be between 0 and 1")
    nll = token_nll(logprobs)
    example = np.repeat(np.arange(len(offsets) - 1), np.diff(offsets))
    candidates = np.flatnonzero(target & ~protected & np.isfinite(nll))
    per_example = np.bincount(example[candidates], minlength=len(offsets) - 1)
    quota = np.rint(ratio * per_example).astype(np.int64)
    # Sort candidates by example, then most surprising first; rank within each example.
    order = candidates[np.lexsort((-nll[candidates], example[candidates]))]
    starts = np.concatenate([[0], np.cumsum(per_example)[:-1]])
    rank = np.arange(order.size) - np.repeat(starts, per_example)
    masked = np.zeros_like(target)
    masked[order[rank < quota[example[order]]]] = True
    return target & ~masked


def random_positions(target_tokens: int, maskable_tokens: int, ratio: float, seed: int) -> np.ndarray:
    """The control STM is measured against: which of a set's maskable tokens (numbered 0.. in set
    order) to mask so that round(ratio * target_tokens) are masked, drawn uniformly with `seed`.
    `ratio` is a share of all target tokens, as STM's masked share is reported."""
    if not 0 <= ratio <= 1:
        raise ValueError("the mask ratio must be between 0 and 1")
    count = int(round(ratio * target_tokens))
    if count > maskable_tokens:
        raise ValueError(f"cannot mask {count} tokens: only {maskable_tokens} target tokens are maskable "
                         "(the end-of-turn token always stays trained)")
    return np.sort(np.random.default_rng(seed).choice(maskable_tokens, size=count, replace=False))


def positions_keep(target: np.ndarray, protected: np.ndarray, positions: np.ndarray, start: int) -> tuple[np.ndarray, int]:
    """Apply `random_positions` to one batch whose first maskable token has number `start`.
    Returns the keep-mask and the number of the next batch's first maskable token."""
    maskable = np.flatnonzero(target & ~protected)
    local = positions[(positions >= start) & (positions < start + maskable.size)] - start
    keep = target.copy()
    keep[maskable[local]] = False
    return keep, start + maskable.size


def protect(keep: np.ndarray, target: np.ndarray, protected: np.ndarray) -> np.ndarray:
    """Target tokens that must stay trained whatever their perplexity (end-of-turn)."""
    return keep | (target & protected)
