"""The adaptive-K policy (host, no jax): speculation where it pays, none at high load or with
poor acceptance, caps honoured, and the acceptance estimate follows what the target accepts."""

from jaxserve.speculative.policy import SpecPolicy


def stats(policy, alpha, n):
    out = []
    for _ in range(n):
        s = policy.new_stats()
        s.accepted, s.verified = alpha * 100, 100.0
        out.append(s)
    return out


def test_speculates_at_low_load_and_not_at_high_load():
    p = SpecPolicy.make(max_k=4, cost_tokens=24.0)
    K, ks = p.choose(stats(p, 0.8, 1), [4])
    assert K == 4 and ks == [4]
    # 128 decodes: the step is compute-bound, a draft accepted 80% of the time costs more than
    # it brings.
    K, ks = p.choose(stats(p, 0.8, 128), [4] * 128)
    assert K == 0 and ks == [0] * 128
    # A cheap step at large batch (accelerator cost model) keeps speculating.
    g = SpecPolicy.make(max_k=4, cost_tokens=512.0)
    K, ks = g.choose(stats(g, 0.8, 64), [4] * 64)
    assert K > 0 and all(k > 0 for k in ks)


def test_poor_acceptance_or_costly_drafts_turn_it_off():
    p = SpecPolicy.make(max_k=4, cost_tokens=24.0)
    assert p.choose(stats(p, 0.02, 4), [4] * 4)[0] == 0
    costly = SpecPolicy.make(max_k=4, cost_tokens=24.0, draft_cost=0.9)
    assert costly.choose(stats(costly, 0.5, 1), [4])[0] == 0
    cheap = SpecPolicy.make(max_k=4, cost_tokens=24.0, draft_cost=0.1)
    assert cheap.choose(stats(cheap, 0.9, 1), [4])[0] > 0


def test_only_sequences_that_pay_take_drafts_and_caps_hold():
    p = SpecPolicy.make(max_k=8, cost_tokens=24.0)
    good, bad = stats(p, 0.9, 2), stats(p, 0.01, 2)
    K, ks = p.choose(good + bad, [8, 2, 8, 8])
    assert K > 0 and ks[0] > 0 and 0 < ks[1] <= 2 and ks[2:] == [0, 0]
    fixed = SpecPolicy.make(max_k=6, cost_tokens=1.0, adaptive=False)
    assert fixed.choose(bad, [3, 9]) == (6, [3, 6])


def test_update_tracks_acceptance_and_recovers_when_idle():
    p = SpecPolicy.make(max_k=4, cost_tokens=24.0)
    s = p.new_stats()
    for _ in range(30):
        p.update(s, 4, 4)
    assert s.alpha > 0.95 and (s.num_proposed, s.num_accepted) == (120, 120)
    for _ in range(30):
        p.update(s, 4, 0)
    assert s.alpha < 0.05
    low = s.alpha
    for _ in range(20):
        p.update(s, 0, 0)  # not speculating: drifts back toward the prior
    assert low < s.alpha < p.prior and s.num_proposed == 240


def test_draft_share_follows_the_cost_model():
    assert SpecPolicy.make(max_k=4, cost_tokens=24.0).draft_share(4, 5) == 0.0  # n-gram
    p = SpecPolicy.make(max_k=4, cost_tokens=24.0, draft_cost=0.25)
    # 4 rounds of a draft a quarter of the target's cost, 24 target tokens: 1 / (1 + 1 + 1).
    assert abs(p.draft_share(4, 24) - 1 / 3) < 1e-12
    assert p.draft_share(2, 24) < p.draft_share(4, 24) and p.draft_share(4, 240) < 1 / 3


def test_step_overhead_turns_off_marginal_speculation():
    """A fused step dearer than a plain one (the CPU's measured 1.35 plain tokens): a sequence
    accepting 35% of its drafts pays without that overhead and not with it."""
    free = SpecPolicy.make(max_k=4, cost_tokens=15.0)
    dear = SpecPolicy.make(max_k=4, cost_tokens=15.0, step_overhead=1.35)
    assert free.choose(stats(free, 0.35, 1), [4])[0] > 0
    assert dear.choose(stats(dear, 0.35, 1), [4])[0] == 0
    assert dear.choose(stats(dear, 0.7, 1), [4])[0] == 4  # a good one still does
    assert dear.draft_share(4, 5) == 0.0
    both = SpecPolicy.make(max_k=4, cost_tokens=15.0, draft_cost=0.25, step_overhead=1.35)
    assert abs(both.draft_share(4, 15) - 1 / 3.35) < 1e-12


def test_a_batch_with_middling_acceptance_decodes_plainly():
    """The CPU cost model (15 tokens double a step, 1.35 overhead): 16 sequences accepting 45%
    of their drafts do not pay for verifying them (measured: 0.57x requests/s when they did),
    while sequences that accept ~all of theirs still do."""
    p = SpecPolicy.make(max_k=4, cost_tokens=15.0, step_overhead=1.35)
    assert p.choose(stats(p, 0.45, 16), [4] * 16) == (0, [0] * 16)
    K, ks = p.choose(stats(p, 0.97, 16), [4] * 16)
    assert K > 0 and all(k > 0 for k in ks)
