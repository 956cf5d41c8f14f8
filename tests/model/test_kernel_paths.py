"""The real model through the Pallas kernels (interpret mode on CPU) and through the kernels'
jnp references gives the greedy tokens of the default XLA path (transformers' golden tokens)."""

import json
from pathlib import Path

import pytest

from jaxserve import LLM, SamplingParams
from jaxserve.errors import ConfigError

GOLDEN = json.loads((Path(__file__).parent.parent / "data" / "golden_smollm2.json").read_text())
pytestmark = pytest.mark.slow


@pytest.mark.parametrize("kernels", ["interpret", "reference"])
def test_greedy_tokens_through_kernels(real_gguf_path, kernels):
    llm = LLM(real_gguf_path, num_pages=64, kernels=kernels)
    cases = GOLDEN["generate"][3:5]  # two chat prompts of different lengths, batched
    n = 6
    outs = llm.generate([c["prompt_ids"] for c in cases],
                        SamplingParams(temperature=0.0, max_tokens=n))
    for c, out in zip(cases, outs, strict=True):
        assert out.token_ids == c["output_ids"][:n]


def test_kernel_mode_from_environment(real_gguf_path, monkeypatch):
    monkeypatch.setenv("JAXSERVE_KERNELS", "bogus")
    with pytest.raises(ConfigError, match="JAXSERVE_KERNELS"):
        LLM(real_gguf_path, num_pages=64)
    monkeypatch.setenv("JAXSERVE_KERNELS", "reference")
    assert LLM(real_gguf_path, num_pages=64).engine_config.kernels == "reference"
