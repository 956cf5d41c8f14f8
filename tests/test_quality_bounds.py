"""Quality of every quantisation mode on a small slice of the evaluation corpus, against f32:
bounds set from measurement (1 window of 256 tokens, 127 scored; measured values in comments)
with about 2x margin on KL and ~6 points on top-1 agreement. The full table is
benchmarks/quality.py's job."""

from __future__ import annotations

import pytest

from jaxserve.evaluation import run_quality

pytestmark = pytest.mark.slow  # the real model on the real corpus

BOUNDS = {  # mode: (max mean KL, min top-1 agreement %)
    "gguf": (1e-6, 100.0),  # measured ~0, 100: the same values as the f32 model
    "int4-g32": (0.002, 85.0),  # 0.00083, 91.3
    "int8": (0.008, 84.0),  # 0.0036, 90.6
    "kv-int8": (0.0015, 90.0),  # 0.00064, 96.1
    "w8a8": (0.07, 76.0),  # 0.034, 84.3
}


@pytest.fixture(scope="module")
def quality(real_gguf_path, brown_corpus_text):
    return run_quality(real_gguf_path, ["f32", *BOUNDS], windows=1, window=256)


@pytest.mark.parametrize("mode", list(BOUNDS))
def test_mode_quality_within_measured_bounds(quality, mode):
    kl_max, top1_min = BOUNDS[mode]
    vs = quality["models"][mode]["vs_base"]
    assert quality["tokens_scored"] >= 100
    assert vs["kl_mean"] <= kl_max, vs
    assert vs["top1_agreement_pct"] >= top1_min, vs
