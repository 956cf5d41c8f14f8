"""Speculative decoding: proposers that draft tokens and the rejection sampler that verifies
them against the target model's distribution (``rejection.py``: pure, traceable, [B, K])."""
