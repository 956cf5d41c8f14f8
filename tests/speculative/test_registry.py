"""A proposer registered under a new name is what `LLM(speculative_method=name)` builds; an
unknown name is a ConfigError listing the registered ones."""

import dataclasses

import pytest

from jaxserve.config import EngineConfig
from jaxserve.errors import ConfigError
from jaxserve.llm import LLM
from jaxserve.speculative.ngram import NgramProposer
from jaxserve.speculative.proposer import PROPOSERS, register


def test_registered_proposer_is_built_and_unknown_is_rejected():
    @register("bigram_test")
    @dataclasses.dataclass(frozen=True)
    class BigramProposer(NgramProposer):
        min_n: int = 1
        max_n: int = 1

    try:
        proposer, params = LLM._make_proposer(EngineConfig(speculative_method="bigram_test"),
                                              None, None)
        assert isinstance(proposer, BigramProposer) and params is None
        with pytest.raises(ConfigError, match="ngram"):
            LLM._make_proposer(EngineConfig(speculative_method="nope"), None, None)
    finally:
        del PROPOSERS["bigram_test"]
