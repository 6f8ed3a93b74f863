"""A one-run privacy audit of record-level DP (Steinke, Nasr and Jagielski, NeurIPS 2023).

Each enterprise adds `m` canaries to its training records, each included independently with
probability 1/2 (the node's secret coin). After the run, a canary whose loss training lowered
more than the others' was probably trained on: the node guesses "in" for the `k` canaries whose
loss fell most (final adapter vs the frozen base) and "out" for the `k` whose fell least, and
counts correct guesses. Under (epsilon, delta)-DP w.r.t. each
record, r guesses are correct no more often than r coin flips with bias e^eps / (1 + e^eps) (plus
a delta term), so many correct guesses refute small epsilons: the largest epsilon that the count
refutes at the chosen confidence is a lower bound on the run's true epsilon. Canaries are records
like any other (the budget covers them) and never leave the node; only the counts do. Counts of
independent enterprises add up: DP holds for every record, whichever enterprise holds it.

Pure functions; nothing here knows about Flower or the federation.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable

import numpy as np
from scipy import stats


def make_canaries(
    seed: bytes,
    count: int,
    seq_len: int,
    vocab_size: int,
    next_token_probs: Callable[[np.ndarray], np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """`count` canaries of `seq_len` tokens and their inclusion coins, all determined by the
    node's secret `seed` (the same every round of a run).

    With `next_token_probs` (prefixes [count, t] -> next-token probabilities [count, vocab]) the
    canaries are samples of that model, e.g. the frozen base: text the model finds plausible is
    what training visibly memorises, while uniformly random tokens barely move its loss."""
    state = int.from_bytes(hashlib.sha256(b"fedmoe canaries\0" + seed).digest(), "little")
    rng = np.random.Generator(np.random.PCG64(state))
    included = rng.random(count) < 0.5
    tokens = rng.integers(0, vocab_size, size=(count, seq_len), dtype=np.int64)
    if next_token_probs is not None:
        for t in range(1, seq_len):
            probs = np.asarray(next_token_probs(tokens[:, :t]), dtype=np.float64)
            cumulative = np.cumsum(probs / probs.sum(axis=1, keepdims=True), axis=1)
            draws = rng.random((count, 1))
            tokens[:, t] = np.minimum((cumulative < draws).sum(axis=1), vocab_size - 1)
    return tokens, included


def score_guesses(scores: np.ndarray, included: np.ndarray, per_side: int) -> tuple[int, int]:
    """(guesses, correct): "in" for the `per_side` lowest scores (e.g. how much training lowered
    a canary's loss), "out" for the highest."""
    if not 0 <= 2 * per_side <= len(scores):
        raise ValueError(f"cannot guess {per_side} per side from {len(scores)} canaries")
    order = np.argsort(scores, kind="stable")
    guessed_in, guessed_out = order[:per_side], order[len(order) - per_side :]
    correct = int(included[guessed_in].sum() + (~included[guessed_out]).sum())
    return 2 * per_side, correct


def p_value(canaries: int, guesses: int, correct: int, epsilon: float, delta: float) -> float:
    """Probability of at least `correct` right guesses out of `guesses` (from `canaries`) under
    an (epsilon, delta)-DP mechanism: the binomial tail plus the delta correction of Steinke et
    al.'s Theorem 3.3 (each canary's delta can add a right guess)."""
    if not 0 <= correct <= guesses <= canaries:
        raise ValueError("need 0 <= correct <= guesses <= canaries")
    q = 1.0 / (1.0 + math.exp(-epsilon))  # randomized response's accuracy at epsilon
    tail = stats.binom.sf(correct - 1, guesses, q)
    if correct == 0:
        return 1.0
    # alpha = max over i of P[correct - i <= Bin(guesses, q) < correct] / i
    steps = np.arange(1, correct + 1)
    windows = np.cumsum(stats.binom.pmf(correct - steps, guesses, q))
    alpha = float(np.max(windows / steps))
    return min(1.0, float(tail) + 2 * canaries * delta * alpha)


def epsilon_lower_bound(
    canaries: int, guesses: int, correct: int, delta: float, confidence: float = 0.95
) -> float:
    """The largest epsilon that `correct` right guesses refute at `confidence` (0: none)."""
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    level = 1.0 - confidence
    if p_value(canaries, guesses, correct, 0.0, delta) > level:
        return 0.0
    low, high = 0.0, 1.0
    while p_value(canaries, guesses, correct, high, delta) <= level and high < 100.0:
        low, high = high, 2 * high
    for _ in range(50):  # bisection to ~1e-15 relative
        mid = (low + high) / 2
        low, high = (
            (mid, high) if p_value(canaries, guesses, correct, mid, delta) <= level else (low, mid)
        )
    return low
