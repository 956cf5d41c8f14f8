"""The on-device n-gram search equals the plain-Python reference on random histories (with
repeats planted, lengths 0..H, matches at the window's edges)."""

import random

import jax
import numpy as np
import pytest

from jaxserve.speculative.ngram import (
    NgramProposer,
    history_width,
    ngram_propose,
    ngram_propose_reference,
)

_propose = jax.jit(ngram_propose, static_argnums=(2, 3, 4))


@pytest.mark.parametrize("min_n,max_n,K", [(1, 1, 3), (2, 4, 4), (1, 3, 8)])
def test_matches_reference(min_n, max_n, K):
    rng = random.Random(min_n * 100 + max_n * 10 + K)
    H, N = 64, 48
    rows = []
    for i in range(N):
        L = rng.choice([0, 1, 2, 3, max_n, max_n + 1, rng.randint(4, H), H])
        vocab = rng.choice([3, 5, 50])  # small vocabularies: many (and overlapping) matches
        toks = [rng.randrange(vocab) for _ in range(L)]
        if L > 8 and i % 3 == 0:  # plant a repeat of the suffix earlier on
            n = rng.randint(1, max_n)
            at = rng.randrange(0, L - n - 1)
            toks[at:at + n] = toks[L - n:]
        rows.append(toks)
    history = np.zeros((N, H), np.int32)
    lens = np.array([len(r) for r in rows], np.int32)
    for i, r in enumerate(rows):
        history[i, :len(r)] = r
    got = np.asarray(_propose(history, lens, K, min_n, max_n))
    want = np.array([ngram_propose_reference(r, K, min_n, max_n) for r in rows])
    np.testing.assert_array_equal(got, want)
    assert (got[:, 0] >= 0).sum() > N // 6  # the cases exercise matches, not only misses


def test_host_inputs_take_the_last_window():
    class Seq:
        def __init__(self, toks):
            self.toks = toks
            self.num_tokens = len(toks)

        def tokens(self, a, b):
            return self.toks[a:b]

    long = Seq(list(range(10_000)))
    short = Seq([5, 6, 7])
    out = NgramProposer().host_inputs([long, short], 4)
    H = history_width(10_000)
    assert out["history"].shape == (4, H) and list(out["hist_len"]) == [H, 3, 0, 0]
    assert out["history"][0, H - 1] == 9_999 and list(out["history"][1, :3]) == [5, 6, 7]


def test_bad_sizes_are_rejected():
    with pytest.raises(ValueError, match="ngram sizes"):
        NgramProposer(min_n=3, max_n=2)
