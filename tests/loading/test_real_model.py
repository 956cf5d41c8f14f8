"""The real SmolLM2-135M-Instruct Q4_1 GGUF (fetched once into checkpoints/, see conftest)."""

from __future__ import annotations

import importlib.util
import os
import time

import numpy as np
import pytest

from jaxserve.loading.gguf import gguf_config, load_gguf
from jaxserve.model.params import validate_params

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def loaded(real_gguf_path):
    t0 = time.perf_counter()
    cfg, params = load_gguf(real_gguf_path)
    return cfg, params, time.perf_counter() - t0


def test_config(real_gguf_path):
    cfg = gguf_config(real_gguf_path)
    assert (cfg.num_layers, cfg.hidden_size, cfg.intermediate_size) == (30, 576, 1536)
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.vocab_size) == (9, 3, 64, 49152)
    assert cfg.rope_theta == 1e5 and cfg.rms_norm_eps == 1e-5 and cfg.rope_scaling is None
    assert cfg.tie_word_embeddings and not cfg.attention_bias and cfg.model_type == "llama"
    assert cfg.max_position_embeddings == 8192
    assert cfg.bos_token_id == 1 and cfg.eos_token_ids == (2,)


def test_all_tensors_and_load_time(loaded):
    cfg, params, seconds = loaded
    validate_params(cfg, params, "real gguf")
    assert "lm_head" not in params
    assert all(np.isfinite(params["layers"][n]).all() for n in ("wq", "wk", "w_down"))
    # Vectorised dequantisation: a few seconds on 2 CPU cores, not minutes.
    assert seconds < 30, f"loading took {seconds:.1f}s"


def _have_hf_gguf() -> bool:
    return all(importlib.util.find_spec(m) for m in ("torch", "transformers", "accelerate"))


@pytest.mark.skipif(not _have_hf_gguf(), reason="needs torch, transformers and accelerate")
def test_matches_transformers_gguf_loader(loaded, real_gguf_path):
    """transformers dequantises and un-permutes GGUFs itself; our q/k must agree with its
    q_proj/k_proj, or rope would rotate the wrong pairs of dimensions."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import torch
    from transformers import AutoModelForCausalLM

    cfg, params, _ = loaded
    model = AutoModelForCausalLM.from_pretrained(
        real_gguf_path.parent, gguf_file=real_gguf_path.name, dtype=torch.float32)
    sd = {k: v.numpy() for k, v in model.state_dict().items()}
    D = cfg.hidden_size
    for layer in (0, cfg.num_layers - 1):
        pre = f"model.layers.{layer}."
        for ours, theirs in (("wq", "self_attn.q_proj"), ("wk", "self_attn.k_proj"),
                             ("wv", "self_attn.v_proj")):
            got = params["layers"][ours][layer].reshape(D, -1).T  # [D,H,Dh] -> HF [H*Dh, D]
            np.testing.assert_allclose(got, sd[pre + theirs + ".weight"], atol=1e-6, rtol=0)
        got = params["layers"]["wo"][layer].reshape(-1, D).T
        np.testing.assert_allclose(got, sd[pre + "self_attn.o_proj.weight"], atol=1e-6, rtol=0)
        np.testing.assert_allclose(params["layers"]["w_down"][layer].T,
                                   sd[pre + "mlp.down_proj.weight"], atol=1e-6, rtol=0)
    np.testing.assert_allclose(params["embed"], sd["model.embed_tokens.weight"], atol=1e-6,
                               rtol=0)
