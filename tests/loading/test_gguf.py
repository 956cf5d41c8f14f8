from __future__ import annotations

import gguf
import ml_dtypes
import numpy as np
import pytest

from jaxserve.errors import CheckpointError, ConfigError
from jaxserve.loading.gguf import (
    config_from_gguf,
    dequantize_tensor,
    gguf_config,
    load_gguf,
    open_reader,
)
from jaxserve.model.params import param_specs

from .helpers import gguf_name, random_params, tiny_config, to_hf, write_gguf

Q = gguf.GGMLQuantizationType


def _expected_params(cfg, sd, expected):
    """param tree the reader must produce: `expected` (dequantised HF-layout values) pushed
    through to_hf's inverse by hand."""
    D = cfg.hidden_size
    lay = {}
    hf = {k: expected[gguf_name(k)] for k in sd if gguf_name(k) in expected}

    def stack(fmt, fn):
        return np.stack([fn(hf[fmt.format(i)]) for i in range(cfg.num_layers)])

    p = "model.layers.{}."
    lay["attn_norm"] = stack(p + "input_layernorm.weight", lambda w: w)
    lay["mlp_norm"] = stack(p + "post_attention_layernorm.weight", lambda w: w)
    for n, h, heads in (("wq", "q_proj", cfg.num_heads), ("wk", "k_proj", cfg.num_kv_heads),
                        ("wv", "v_proj", cfg.num_kv_heads)):
        lay[n] = stack(p + f"self_attn.{h}.weight", lambda w, h=heads: w.T.reshape(D, h, -1))
        if cfg.attention_bias:
            lay["b" + n[1]] = stack(p + f"self_attn.{h}.bias", lambda w, h=heads: w.reshape(h, -1))
    lay["wo"] = stack(p + "self_attn.o_proj.weight",
                      lambda w: w.T.reshape(cfg.num_heads, cfg.head_dim, D))
    lay["w_gate"] = stack(p + "mlp.gate_proj.weight", lambda w: w.T)
    lay["w_up"] = stack(p + "mlp.up_proj.weight", lambda w: w.T)
    lay["w_down"] = stack(p + "mlp.down_proj.weight", lambda w: w.T)
    out = {"embed": hf["model.embed_tokens.weight"], "final_norm": hf["model.norm.weight"],
           "layers": lay}
    if "lm_head.weight" in hf:
        out["lm_head"] = hf["lm_head.weight"].T
    return out


def _assert_tree_equal(got, want, prefix=""):
    assert set(got) == set(want), prefix
    for k in want:
        if isinstance(want[k], dict):
            _assert_tree_equal(got[k], want[k], f"{prefix}{k}.")
        else:
            assert got[k].shape == want[k].shape, prefix + k
            np.testing.assert_array_equal(got[k], want[k], err_msg=prefix + k)


# Mixed storage types, as in real files: quantised matrices, f32 norms, a few f16/bf16.
LLAMA_QTYPES = {"token_embd.weight": Q.Q8_0, "blk.0.attn_q.weight": Q.Q4_1,
                "blk.0.attn_k.weight": Q.Q4_0, "blk.1.attn_q.weight": Q.Q8_0,
                "blk.1.attn_k.weight": Q.F16, "blk.0.ffn_down.weight": Q.Q4_1,
                "blk.1.ffn_up.weight": Q.BF16, "blk.1.attn_output.weight": Q.Q4_0}


@pytest.fixture
def llama_gguf(tmp_path):
    cfg = tiny_config(tie_word_embeddings=True)
    sd = to_hf(cfg, random_params(cfg, seed=1))
    path = tmp_path / "tiny-llama.gguf"
    expected = write_gguf(path, cfg, sd, LLAMA_QTYPES)
    return path, cfg, sd, expected


def test_llama_roundtrip_unpermutes_and_dequantises(llama_gguf):
    path, cfg, sd, expected = llama_gguf
    got_cfg, params = load_gguf(path)
    assert got_cfg == cfg
    _assert_tree_equal(params, _expected_params(cfg, sd, expected))
    # F32 storage is lossless, so this one must be the written weight bit for bit.
    np.testing.assert_array_equal(params["layers"]["wv"][0],
                                  sd["model.layers.0.self_attn.v_proj.weight"].T.reshape(
                                      cfg.hidden_size, cfg.num_kv_heads, cfg.head_dim))


def test_qwen2_with_biases_is_not_permuted(tmp_path):
    cfg = tiny_config(model_type="qwen2", attention_bias=True, tie_word_embeddings=False,
                      sliding_window=None)
    sd = to_hf(cfg, random_params(cfg, seed=2))
    path = tmp_path / "tiny-qwen2.gguf"
    expected = write_gguf(path, cfg, sd, {"blk.0.attn_q.weight": Q.Q8_0,
                                          "output.weight": Q.Q4_1})
    got_cfg, params = load_gguf(path)
    assert got_cfg == cfg
    _assert_tree_equal(params, _expected_params(cfg, sd, expected))
    assert params["lm_head"].shape == (cfg.hidden_size, cfg.vocab_size)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", np.float32])
def test_dtype_cast(llama_gguf, dtype):
    path, cfg, sd, expected = llama_gguf
    _, params = load_gguf(path, dtype)
    want = {"bfloat16": ml_dtypes.bfloat16, "float16": np.float16}.get(dtype, np.float32)
    assert params["embed"].dtype == want and params["layers"]["wq"].dtype == want
    ref = _expected_params(cfg, sd, expected)["layers"]["w_up"].astype(want)
    np.testing.assert_array_equal(params["layers"]["w_up"], ref)


def test_config_keys():
    meta = {"general.architecture": "llama", "llama.block_count": 3,
            "llama.embedding_length": 128, "llama.feed_forward_length": 256,
            "llama.attention.head_count": 4, "llama.attention.head_count_kv": 1,
            "llama.attention.key_length": 64, "llama.rope.freq_base": np.float32(5e5),
            "llama.attention.layer_norm_rms_epsilon": float(np.float32(1e-5)),
            "llama.context_length": 4096, "llama.vocab_size": 1000,
            "llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 4.0,
            "llama.attention.sliding_window": 512,
            "tokenizer.ggml.bos_token_id": 5, "tokenizer.ggml.eos_token_id": 6,
            "tokenizer.ggml.eot_token_id": 7}
    cfg = config_from_gguf(meta, ["token_embd.weight", "output.weight", "blk.0.attn_q.bias"])
    assert (cfg.num_layers, cfg.hidden_size, cfg.intermediate_size) == (3, 128, 256)
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (4, 1, 64)
    assert cfg.rms_norm_eps == 1e-5 and cfg.rope_theta == 5e5
    assert cfg.rope_scaling.rope_type == "linear" and cfg.rope_scaling.factor == 4.0
    assert cfg.sliding_window == 512 and cfg.max_position_embeddings == 4096
    assert cfg.bos_token_id == 5 and cfg.eos_token_ids == (6, 7)
    assert not cfg.tie_word_embeddings and cfg.attention_bias
    tied = config_from_gguf(meta, ["token_embd.weight"])
    assert tied.tie_word_embeddings and not tied.attention_bias


def test_llama3_rope_freqs_become_rope_scaling(tmp_path):
    cfg = tiny_config(tie_word_embeddings=True, rope_theta=500000.0,
                      max_position_embeddings=131072)
    # Divisors as llama.cpp's converter computes them for Llama 3.1 (factor 8, low 1, high 4,
    # original context 8192).
    inv = 1.0 / 500000.0 ** (np.arange(0, cfg.head_dim, 2) / cfg.head_dim)
    wl = 2 * np.pi / inv
    smooth = (8192 / wl - 1) / 3
    divs = np.where(wl < 8192 / 4, 1.0, np.where(wl > 8192, 8.0, 1 / ((1 - smooth) / 8 + smooth)))
    meta = {"general.architecture": "llama", "llama.block_count": 2,
            "llama.embedding_length": 64, "llama.feed_forward_length": 96,
            "llama.attention.head_count": 4, "llama.rope.freq_base": 500000.0,
            "llama.vocab_size": 96}
    got = config_from_gguf(meta, [], rope_freqs=divs.astype(np.float32))
    rs = got.rope_scaling
    assert (rs.rope_type, rs.factor, rs.low_freq_factor, rs.high_freq_factor,
            rs.original_max_position_embeddings) == ("llama3", 8.0, 1.0, 4.0, 8192)
    with pytest.raises(ConfigError, match="rope_freqs"):
        config_from_gguf(meta, [], rope_freqs=np.ones_like(divs, np.float32) * 2)


def test_unsupported_arch():
    with pytest.raises(ConfigError, match="gemma"):
        config_from_gguf({"general.architecture": "gemma"})


@pytest.mark.parametrize("qtype", ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q6_K"])
def test_dequantize_tensor_types(tmp_path, qtype):
    qt = Q[qtype]
    rng = np.random.default_rng(0)
    rows, cols = 3, 512  # 512: two K-quant super-blocks per row
    x = rng.standard_normal((rows, cols)).astype(np.float32)
    if qtype in ("Q4_K", "Q6_K"):
        # gguf-py cannot quantise K-quants; random bytes with sane f16 scales are valid blocks.
        block, size = gguf.GGML_QUANT_SIZES[qt]
        raw = rng.integers(0, 256, (rows * cols // block, size), dtype=np.uint8)
        scale = np.frombuffer(np.float16(0.01).tobytes(), np.uint8)
        if qtype == "Q4_K":  # d, dmin lead the block
            raw[:, 0:2] = scale
            raw[:, 2:4] = scale
        else:  # d ends the block
            raw[:, -2:] = scale
        data = raw.reshape(rows, -1)
    else:
        data = gguf.quants.quantize(x, qt)
    w = gguf.GGUFWriter(str(tmp_path / "t.gguf"), "llama")
    w.add_tensor("t", data, raw_dtype=None if qt == Q.F32 else qt)
    w.add_tensor("odd", np.ones((2, 3, 32), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    tensors = open_reader(tmp_path / "t.gguf").tensors
    got = dequantize_tensor(tensors["t"])
    assert got.shape == (rows, cols) and got.dtype == np.float32
    np.testing.assert_array_equal(got, gguf.quants.dequantize(data, qt).reshape(rows, cols))
    assert np.isfinite(got).all()
    if qtype in ("F32", "F16", "BF16", "Q8_0"):
        np.testing.assert_allclose(got, x, atol=0.05, rtol=0.01)
    # ggml lists dims fastest-first; numpy order is the reverse.
    assert dequantize_tensor(tensors["odd"]).shape == (2, 3, 32)


def test_unsupported_tensor_type(tmp_path):
    w = gguf.GGUFWriter(str(tmp_path / "i.gguf"), "llama")
    w.add_tensor("blk.0.weird.weight", np.ones((4, 32), np.int32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    (t,) = open_reader(tmp_path / "i.gguf").tensors.values()
    with pytest.raises(CheckpointError, match=r"i\.gguf.*blk\.0\.weird\.weight.*I32"):
        dequantize_tensor(t, str(tmp_path / "i.gguf"))


def test_truncated_file(llama_gguf, tmp_path):
    path = llama_gguf[0]
    cut = tmp_path / "cut.gguf"
    data = path.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cut.gguf"):
        load_gguf(cut)


def test_cut_inside_last_tensor(llama_gguf, tmp_path):
    path = llama_gguf[0]
    cut = tmp_path / "tail.gguf"
    cut.write_bytes(path.read_bytes()[:-100])
    last = gguf.GGUFReader(path).tensors[-1].name
    with pytest.raises(CheckpointError, match=rf"tail\.gguf.*tensor {last}"):
        load_gguf(cut)


def test_garbage_and_missing_file(tmp_path):
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(CheckpointError, match="junk.gguf"):
        load_gguf(junk)
    with pytest.raises(CheckpointError, match="nope.gguf"):
        load_gguf(tmp_path / "nope.gguf")


def test_missing_tensor(tmp_path):
    cfg = tiny_config(tie_word_embeddings=True)
    sd = to_hf(cfg, random_params(cfg))
    path = tmp_path / "missing.gguf"
    write_gguf(path, cfg, sd, drop=("blk.1.ffn_up.weight",))
    with pytest.raises(CheckpointError, match=r"missing\.gguf.*blk\.1\.ffn_up\.weight"):
        load_gguf(path)


def test_shape_mismatch(tmp_path):
    cfg = tiny_config(tie_word_embeddings=True)
    sd = to_hf(cfg, random_params(cfg))
    sd["model.layers.0.self_attn.k_proj.weight"] = sd["model.layers.0.self_attn.q_proj.weight"]
    path = tmp_path / "shape.gguf"
    write_gguf(path, cfg, sd)
    with pytest.raises(CheckpointError, match=r"shape\.gguf.*blk\.0\.attn_k\.weight.*\(64, 64\)"):
        load_gguf(path)


def test_gguf_config_matches_load(llama_gguf):
    path, cfg, _, _ = llama_gguf
    assert gguf_config(path) == cfg
    specs = param_specs(cfg)
    assert "lm_head" not in specs


def test_every_truncation_is_a_checkpoint_error(llama_gguf, tmp_path):
    data = llama_gguf[0].read_bytes()
    data_start = gguf.GGUFReader(llama_gguf[0]).data_offset
    cut = tmp_path / "cut.gguf"
    for n in sorted({0, 3, 4, 8, 23, 24, 100, 1000, 5000, len(data) - 1,
                     *range(0, len(data), len(data) // 40)}):
        cut.write_bytes(data[:n])
        # A cut in the tensor data names the tensor it cuts through.
        where = r".*tensor [\w.]+" if n > data_start else ""
        with pytest.raises(CheckpointError, match=rf"cut\.gguf{where}"):
            load_gguf(cut)
