from __future__ import annotations

import json
import shutil

import ml_dtypes
import numpy as np
import pytest

from jaxserve.config import RopeScaling
from jaxserve.errors import CheckpointError
from jaxserve.loading import load_checkpoint
from jaxserve.loading.common import config_from_dict, config_to_dict
from jaxserve.loading.orbax_ckpt import is_orbax_dir, load_orbax, save_orbax

from .helpers import random_params, tiny_config, to_hf, write_gguf, write_hf_dir


def _flat(tree, prefix=""):
    for k, v in tree.items():
        if isinstance(v, dict):
            yield from _flat(v, f"{prefix}{k}.")
        else:
            yield prefix + k, v


def _assert_bit_identical(got, want):
    got, want = dict(_flat(got)), dict(_flat(want))
    assert got.keys() == want.keys()
    for k in want:
        assert isinstance(got[k], np.ndarray) and got[k].dtype == want[k].dtype, k
        # Compare bits, not values: NaN payloads or -0.0 would slip past a value comparison.
        np.testing.assert_array_equal(got[k].view(np.uint8), want[k].view(np.uint8), err_msg=k)


class FakeTokenizer:
    def save(self, directory):
        (directory / "tokenizer.json").write_text("{}")


@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16])
def test_save_load_bit_identical(tmp_path, dtype):
    cfg = tiny_config(rope_scaling=RopeScaling(factor=8.0), eos_token_ids=(2, 7),
                      sliding_window=128)
    params = random_params(cfg, seed=5, dtype=dtype)
    params["layers"]["wq"][0, 0, 0, :2] = [-0.0, np.nan]
    save_orbax(tmp_path / "ck", cfg, params, tokenizer=FakeTokenizer())
    assert is_orbax_dir(tmp_path / "ck")
    assert (tmp_path / "ck" / "tokenizer.json").is_file()
    got_cfg, got = load_orbax(tmp_path / "ck")
    assert got_cfg == cfg
    _assert_bit_identical(got, params)
    # Saving again over an existing checkpoint replaces it.
    params2 = random_params(cfg, seed=6, dtype=dtype)
    save_orbax(tmp_path / "ck", cfg, params2)
    _assert_bit_identical(load_orbax(tmp_path / "ck")[1], params2)


def test_config_dict_roundtrip():
    cfg = tiny_config(rope_scaling=RopeScaling(rope_type="linear", factor=2.0),
                      eos_token_ids=(2, 3), model_type="qwen2", attention_bias=True)
    assert config_from_dict(json.loads(json.dumps(config_to_dict(cfg)))) == cfg


def test_corrupt_and_missing(tmp_path):
    cfg = tiny_config()
    save_orbax(tmp_path / "ck", cfg, random_params(cfg))
    with pytest.raises(CheckpointError, match="not a jaxserve Orbax checkpoint"):
        load_orbax(tmp_path / "nothing")
    shutil.rmtree(tmp_path / "ck" / "params")
    (tmp_path / "ck" / "params").mkdir()
    with pytest.raises(CheckpointError, match="params"):
        load_orbax(tmp_path / "ck")
    (tmp_path / "ck" / "model_config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="model_config.json"):
        load_orbax(tmp_path / "ck")


def test_config_params_mismatch(tmp_path):
    cfg = tiny_config()
    save_orbax(tmp_path / "ck", cfg, random_params(cfg))
    d = config_to_dict(cfg)
    d["intermediate_size"] = 128
    (tmp_path / "ck" / "model_config.json").write_text(json.dumps(d))
    with pytest.raises(CheckpointError, match="w_gate"):
        load_orbax(tmp_path / "ck")


def test_load_checkpoint_detects_formats(tmp_path):
    cfg = tiny_config(tie_word_embeddings=True)
    params = random_params(cfg, seed=7)
    sd = to_hf(cfg, params)
    write_gguf(tmp_path / "m.gguf", cfg, sd)
    write_hf_dir(tmp_path / "hf", cfg, sd)
    save_orbax(tmp_path / "ob", cfg, params)
    for path in (tmp_path / "m.gguf", tmp_path / "hf", tmp_path / "ob"):
        got_cfg, got = load_checkpoint(path)
        assert got_cfg == cfg, path
        _assert_bit_identical(got, params)
    got_cfg, got = load_checkpoint(tmp_path / "ob", dtype="bfloat16")
    assert all(v.dtype == ml_dtypes.bfloat16 for _, v in _flat(got))
    np.testing.assert_array_equal(got["embed"], params["embed"].astype(ml_dtypes.bfloat16))
    _, got = load_checkpoint(tmp_path / "hf", dtype="float16")
    assert got["layers"]["wo"].dtype == np.float16


def test_load_checkpoint_unknown(tmp_path):
    with pytest.raises(CheckpointError, match=r"no such file.*\.gguf.*Orbax.*Hugging Face"):
        load_checkpoint(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="none of the known layouts"):
        load_checkpoint(tmp_path / "empty")
    (tmp_path / "w.bin").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="w.bin"):
        load_checkpoint(tmp_path / "w.bin")
    with pytest.raises(ValueError, match="dtype"):
        load_checkpoint(tmp_path / "empty", dtype="int8")
