"""The fast-lane guard in tests/conftest.py: real weights in a test not marked slow fail it."""

from __future__ import annotations

import pytest

from jaxserve.loading import load_checkpoint
from jaxserve.tokenizer import load_tokenizer


def test_loading_real_weights_outside_the_slow_lane_fails_naming_the_mark(real_gguf_path):
    with pytest.raises(pytest.fail.Exception, match="mark it @pytest.mark.slow"):
        load_checkpoint(real_gguf_path)


def test_the_real_tokenizer_is_allowed_in_the_fast_lane(real_gguf_path):
    assert load_tokenizer(real_gguf_path).encode("Hello") != []


@pytest.mark.slow
def test_slow_tests_may_load_real_weights(real_gguf_path):
    cfg, params = load_checkpoint(real_gguf_path)
    assert cfg.num_layers == 30 and params["embed"].shape[0] == cfg.vocab_size
