"""Tiny models and writers for the loading tests. Written independently of the readers: HF
tensors are built from the param tree by hand, and llama.cpp's Q/K permutation is reimplemented
from its converter's description, so a reader bug cannot cancel itself out."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np

from jaxserve.config import ModelConfig
from jaxserve.model.params import ArrayInfo, param_specs

# Every ggml row (the numpy last axis: D, F or Hq*Dh) is a multiple of 32, the block size of
# Q8_0/Q4_0/Q4_1; F != D and Hq != Hkv so any swapped axis shows up as a shape error.
TINY = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
            num_kv_heads=2, head_dim=16, rms_norm_eps=1e-6, rope_theta=10000.0,
            max_position_embeddings=256, bos_token_id=1, eos_token_ids=(2,))


def tiny_config(**kw) -> ModelConfig:
    return ModelConfig(**{**TINY, **kw})


def random_params(cfg: ModelConfig, seed: int = 0, dtype=np.float32) -> dict:
    rng = np.random.default_rng(seed)

    def make(spec):
        if isinstance(spec, ArrayInfo):
            return rng.standard_normal(spec.shape, dtype=np.float32).astype(dtype)
        return {k: make(v) for k, v in spec.items()}

    return make(param_specs(cfg))


def to_hf(cfg: ModelConfig, params: dict) -> dict[str, np.ndarray]:
    """param_specs tree -> Hugging Face state dict (Linear weights [out, in])."""
    D = cfg.hidden_size
    sd = {"model.embed_tokens.weight": params["embed"], "model.norm.weight": params["final_norm"]}
    if "lm_head" in params:
        sd["lm_head.weight"] = params["lm_head"].T
    lay = params["layers"]
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        sd[p + "input_layernorm.weight"] = lay["attn_norm"][i]
        sd[p + "post_attention_layernorm.weight"] = lay["mlp_norm"][i]
        for n, hf in (("wq", "q_proj"), ("wk", "k_proj"), ("wv", "v_proj")):
            sd[p + f"self_attn.{hf}.weight"] = lay[n][i].reshape(D, -1).T
        sd[p + "self_attn.o_proj.weight"] = lay["wo"][i].reshape(-1, D).T
        sd[p + "mlp.gate_proj.weight"] = lay["w_gate"][i].T
        sd[p + "mlp.up_proj.weight"] = lay["w_up"][i].T
        sd[p + "mlp.down_proj.weight"] = lay["w_down"][i].T
        if cfg.attention_bias:
            for n, hf in (("bq", "q_proj"), ("bk", "k_proj"), ("bv", "v_proj")):
                sd[p + f"self_attn.{hf}.bias"] = lay[n][i].reshape(-1)
    return {k: np.ascontiguousarray(v) for k, v in sd.items()}


def hf_config_json(cfg: ModelConfig) -> dict:
    return {
        "model_type": cfg.model_type, "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim,
        "rms_norm_eps": cfg.rms_norm_eps, "rope_theta": cfg.rope_theta,
        "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": cfg.tie_word_embeddings, "attention_bias": cfg.attention_bias,
        "bos_token_id": cfg.bos_token_id, "eos_token_id": list(cfg.eos_token_ids),
    }


def write_hf_dir(d: Path, cfg: ModelConfig, sd: dict[str, np.ndarray], shards: int = 1) -> Path:
    from safetensors.numpy import save_file

    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(hf_config_json(cfg)))
    names = sorted(sd)
    if shards == 1:
        save_file(sd, str(d / "model.safetensors"))
        return d
    weight_map = {}
    for s in range(shards):
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = names[s::shards]
        save_file({n: sd[n] for n in part}, str(d / fname))
        weight_map.update(dict.fromkeys(part, fname))
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {},
                                                               "weight_map": weight_map}))
    return d


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf's reordering of q/k rows: per head, rows [first half | second half]
    become interleaved pairs (h0, h1, h0, h1, ...)."""
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


_GGUF_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
_GGUF_LAYER = {
    "input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight":
    "ffn_norm.weight", "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight":
    "attn_k.weight", "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight":
    "attn_output.weight", "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight":
    "ffn_up.weight", "mlp.down_proj.weight": "ffn_down.weight", "self_attn.q_proj.bias":
    "attn_q.bias", "self_attn.k_proj.bias": "attn_k.bias", "self_attn.v_proj.bias": "attn_v.bias",
}


def gguf_name(hf_name: str) -> str:
    if hf_name in _GGUF_NAMES:
        return _GGUF_NAMES[hf_name]
    _, _, i, rest = hf_name.split(".", 3)
    return f"blk.{i}.{_GGUF_LAYER[rest]}"


def write_gguf(path: Path, cfg: ModelConfig, sd: dict[str, np.ndarray],
               qtypes: dict[str, gguf.GGMLQuantizationType] | None = None,
               extra_kv: dict | None = None, drop: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
    """Write an HF state dict as a llama.cpp-style GGUF. `qtypes` maps GGUF tensor names to
    their storage type (default F32). Returns, per GGUF name, the HF-layout values a perfect
    reader recovers: dequantize(quantize(w)), before permutation."""
    arch = cfg.model_type
    qtypes = qtypes or {}
    w = gguf.GGUFWriter(str(path), arch)
    kv = {
        f"{arch}.block_count": cfg.num_layers, f"{arch}.context_length":
        cfg.max_position_embeddings, f"{arch}.embedding_length": cfg.hidden_size,
        f"{arch}.feed_forward_length": cfg.intermediate_size, f"{arch}.attention.head_count":
        cfg.num_heads, f"{arch}.attention.head_count_kv": cfg.num_kv_heads,
        f"{arch}.vocab_size": cfg.vocab_size, f"{arch}.rope.dimension_count": cfg.head_dim,
        "tokenizer.ggml.bos_token_id": cfg.bos_token_id,
        "tokenizer.ggml.eos_token_id": cfg.eos_token_ids[0],
    }
    for k, v in kv.items():
        w.add_uint32(k, v)
    w.add_float32(f"{arch}.rope.freq_base", cfg.rope_theta)
    w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", cfg.rms_norm_eps)
    for k, v in (extra_kv or {}).items():
        if isinstance(v, str):
            w.add_string(k, v)
        elif isinstance(v, float):
            w.add_float32(k, v)
        else:
            w.add_uint32(k, v)
    expected = {}
    for hf_name, arr in sd.items():
        name = gguf_name(hf_name)
        if name in drop:
            continue
        arr = np.asarray(arr, np.float32)
        qt = qtypes.get(name, gguf.GGMLQuantizationType.F32)
        data = gguf.quants.quantize(arr, qt)
        expected[name] = gguf.quants.dequantize(data, qt).reshape(arr.shape)
        if arch == "llama" and ".attn_q." in name:
            data = llama_cpp_permute(data, cfg.num_heads)
        elif arch == "llama" and ".attn_k." in name:
            data = llama_cpp_permute(data, cfg.num_kv_heads)
        w.add_tensor(name, data, raw_dtype=qt if qt != gguf.GGMLQuantizationType.F32 else None)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return expected
