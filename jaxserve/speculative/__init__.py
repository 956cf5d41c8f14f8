"""Speculative decoding: proposers that draft tokens on device, the host policy that picks how
many, and the exact verification. The draft, the target forward over the drafts and the
verification run as ONE compiled program per step (engine/runner.py `spec_step`).

  proposer.py    the `Proposer` interface and the registry (one file per method)
  ngram.py       prompt lookup over each sequence's own history, searched on device
  draft_model.py a smaller (or quantised, or layer-cut) model with its own paged KV cache
  medusa.py      K residual heads on the target's features, read by its own LM head
  eagle.py       a one-layer draft decoder extrapolating the target's features, chained K times
  features.py    the feature cache those two read (on the KV cache's slots)
  checkpoint.py  their Orbax checkpoints, bound to the target model they were trained for
  train.py       self-distillation training of the heads (`jaxserve train-draft`)
  rejection.py   rejection sampling for drafts with their own distribution q
  policy.py      adaptive K per step from the batch and each sequence's acceptance (host, no jax)

This package's __init__ imports nothing, so the host-side policy stays jax-free.
"""
