from __future__ import annotations

import json

import ml_dtypes
import numpy as np
import pytest

from jaxserve.errors import CheckpointError
from jaxserve.loading.hf import load_hf

from .helpers import random_params, tiny_config, to_hf, write_hf_dir


def _assert_tree_equal(got, want, prefix=""):
    assert set(got) == set(want), prefix
    for k in want:
        if isinstance(want[k], dict):
            _assert_tree_equal(got[k], want[k], f"{prefix}{k}.")
        else:
            assert got[k].dtype == want[k].dtype, prefix + k
            np.testing.assert_array_equal(got[k], want[k], err_msg=prefix + k)


@pytest.mark.parametrize("shards", [1, 2])
def test_roundtrip(tmp_path, shards):
    cfg = tiny_config()
    params = random_params(cfg, seed=3)
    sd = to_hf(cfg, params)
    sd["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.ones(8, np.float32)
    write_hf_dir(tmp_path / "m", cfg, sd, shards=shards)
    got_cfg, got = load_hf(tmp_path / "m")
    assert got_cfg == cfg
    _assert_tree_equal(got, params)


def test_qwen2_biases_tied_bf16(tmp_path):
    cfg = tiny_config(model_type="qwen2", attention_bias=True, tie_word_embeddings=True)
    params = random_params(cfg, seed=4, dtype=ml_dtypes.bfloat16)
    sd = to_hf(cfg, params)
    sd["lm_head.weight"] = sd["model.embed_tokens.weight"]  # some exporters save the tied head
    write_hf_dir(tmp_path / "q", cfg, sd)
    got_cfg, got = load_hf(tmp_path / "q", dtype="bfloat16")
    assert got_cfg == cfg
    _assert_tree_equal(got, params)
    _, as_f32 = load_hf(tmp_path / "q")
    np.testing.assert_array_equal(as_f32["layers"]["bq"], params["layers"]["bq"].astype(np.float32))


def test_missing_tensor(tmp_path):
    cfg = tiny_config()
    sd = to_hf(cfg, random_params(cfg))
    del sd["model.layers.1.mlp.up_proj.weight"]
    write_hf_dir(tmp_path / "m", cfg, sd)
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        load_hf(tmp_path / "m")


def test_wrong_shape(tmp_path):
    cfg = tiny_config()
    sd = to_hf(cfg, random_params(cfg))
    sd["model.layers.0.mlp.down_proj.weight"] = sd["model.layers.0.mlp.up_proj.weight"]
    write_hf_dir(tmp_path / "m", cfg, sd)
    with pytest.raises(CheckpointError,
                       match=r"model\.safetensors.*model\.layers\.0\.mlp\.down_proj\.weight.*"
                             r"\(96, 64\).*\(64, 96\)"):
        load_hf(tmp_path / "m")


def test_missing_shard(tmp_path):
    cfg = tiny_config()
    d = write_hf_dir(tmp_path / "m", cfg, to_hf(cfg, random_params(cfg)), shards=2)
    (d / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors"):
        load_hf(d)


def test_index_points_at_wrong_shard(tmp_path):
    cfg = tiny_config()
    d = write_hf_dir(tmp_path / "m", cfg, to_hf(cfg, random_params(cfg)), shards=2)
    index = json.loads((d / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.norm.weight"] = "model-00002-of-00002.safetensors"
    index["weight_map"]["model.embed_tokens.weight"] = "model-00001-of-00002.safetensors"
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"model\.(norm|embed_tokens)\.weight"):
        load_hf(d)


def test_truncated_file(tmp_path):
    cfg = tiny_config()
    d = write_hf_dir(tmp_path / "m", cfg, to_hf(cfg, random_params(cfg)))
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_hf(d)


def test_unexpected_tensor(tmp_path):
    cfg = tiny_config()
    sd = to_hf(cfg, random_params(cfg))
    sd["model.layers.0.self_attn.o_proj.bias"] = np.zeros(cfg.hidden_size, np.float32)
    write_hf_dir(tmp_path / "m", cfg, sd)
    with pytest.raises(CheckpointError, match=r"o_proj\.bias"):
        load_hf(tmp_path / "m")


def test_missing_config(tmp_path):
    cfg = tiny_config()
    d = write_hf_dir(tmp_path / "m", cfg, to_hf(cfg, random_params(cfg)))
    (d / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json"):
        load_hf(d)
