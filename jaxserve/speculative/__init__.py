"""Speculative decoding: proposers that draft tokens on device, the host policy that picks how
many, and the exact verification. The draft, the target forward over the drafts and the
verification run as ONE compiled program per step (engine/runner.py `spec_step`).

  proposer.py    the `Proposer` interface and the registry (one file per method)
  ngram.py       prompt lookup over each sequence's own history, searched on device
  draft_model.py a smaller (or quantised, or layer-cut) model with its own paged KV cache
  rejection.py   rejection sampling for drafts with their own distribution q
  policy.py      adaptive K per step from the batch and each sequence's acceptance (host, no jax)

This package's __init__ imports nothing, so the host-side policy stays jax-free.
"""
