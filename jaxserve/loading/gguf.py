"""GGUF files: metadata, config, tokenizer fields and (dequantised) weights."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterable
from pathlib import Path
from types import TracebackType
from typing import Any

import gguf
import numpy as np
from gguf import GGMLQuantizationType
from gguf.quants import dequantize

from jaxserve.config import ModelConfig, RopeScaling
from jaxserve.errors import CheckpointError, ConfigError
from jaxserve.loading.common import check_shape, empty_params, put_hf, resolve_dtype


@dataclasses.dataclass(frozen=True)
class GGUFFile:
    """An open GGUF file: `gguf.GGUFReader` plus its metadata and tensors keyed by name.
    Tensor data stays in the reader's (lazily paged) memory map."""

    path: Path
    reader: gguf.GGUFReader
    metadata: dict[str, Any]
    tensors: dict[str, gguf.ReaderTensor]


def open_reader(path: str | Path) -> GGUFFile:
    """Read a GGUF file's header with `gguf.GGUFReader`; damage is a CheckpointError naming the
    file (and the tensor, where the damage is in one).

    Parsing a header is slow (seconds for a 49k-token vocabulary) and loading a model reads it
    twice (weights, tokenizer), so the last few files opened are kept, keyed by their identity
    on disk: a file changed in place is read afresh."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such GGUF file")
    st = path.stat()
    return _open_reader(path.resolve(), st.st_size, st.st_mtime_ns, st.st_ino)


@functools.lru_cache(maxsize=2)
def _open_reader(path: Path, size: int, mtime_ns: int, inode: int) -> GGUFFile:
    try:
        reader = gguf.GGUFReader(path)
        metadata = read_metadata(reader)
    except Exception as e:  # the reader raises bare ValueError/IndexError/KeyError on damage
        tensor = _tensor_being_built(e.__traceback__)
        where = f"tensor {tensor}: " if tensor else ""
        raise CheckpointError(f"{path}: not a readable GGUF file ({where}{type(e).__name__}: {e}; "
                              "truncated or corrupt?)") from e
    size = path.stat().st_size
    tensors = {}
    for t in reader.tensors:
        end = int(t.data_offset) + int(t.n_bytes)
        if end > size or t.data.nbytes != int(t.n_bytes):
            raise CheckpointError(f"{path}: tensor {t.name} ends at byte {end} but the file has "
                                  f"{size} (truncated?)")
        tensors[t.name] = t
    return GGUFFile(path, reader, metadata, tensors)


def _tensor_being_built(tb: TracebackType | None) -> str | None:
    # Best effort, for the error message only: GGUFReader fails while slicing a truncated
    # tensor's data in `_build_tensors`, whose loop variable names the tensor. If gguf renames
    # either, the message just loses the tensor name.
    name = None
    while tb is not None:
        if tb.tb_frame.f_code.co_name == "_build_tensors":
            name = tb.tb_frame.f_locals.get("tensor_name")
        tb = tb.tb_next
    return name if isinstance(name, str) else None


def read_metadata(reader: GGUFFile | gguf.GGUFReader) -> dict[str, Any]:
    """All key/value metadata as plain Python values (str, int, float, bool, lists of them)."""
    if isinstance(reader, GGUFFile):
        return dict(reader.metadata)
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}


# Types gguf.quants can dequantise that llama-family GGUFs actually use; anything else (IQ*,
# TQ*, integer tensors) is refused by name rather than half-supported.
_SUPPORTED = frozenset(getattr(GGMLQuantizationType, n) for n in (
    "F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0",
    "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"))

_ARCHS = ("llama", "qwen2")

_TOP = {"embed": "token_embd.weight", "final_norm": "output_norm.weight",
        "lm_head": "output.weight"}
_LAYER = {"attn_norm": "attn_norm.weight", "wq": "attn_q.weight", "wk": "attn_k.weight",
          "wv": "attn_v.weight", "wo": "attn_output.weight", "mlp_norm": "ffn_norm.weight",
          "w_gate": "ffn_gate.weight", "w_up": "ffn_up.weight", "w_down": "ffn_down.weight",
          "bq": "attn_q.bias", "bk": "attn_k.bias", "bv": "attn_v.bias"}


def _f32(v: Any) -> float:
    # GGUF stores these as float32; the shortest float32 repr recovers the intended decimal
    # (1e-05, not 9.999999747378752e-06).
    return float(str(np.float32(v)))


def config_from_gguf(metadata: dict[str, Any], tensor_names: Iterable[str] | None = None,
                     rope_freqs: np.ndarray | None = None) -> ModelConfig:
    """ModelConfig from GGUF metadata (as `read_metadata` returns it).

    Tied embeddings and q/k/v biases are not in the metadata but in which tensors exist, so pass
    `tensor_names`; without it they default to untied, and biases for qwen2 only. `rope_freqs`
    is the `rope_freqs.weight` tensor, which llama.cpp writes instead of llama3 scaling keys.
    Use `gguf_config(path)` to do all of this from a file.
    """
    arch = metadata.get("general.architecture")
    if arch not in _ARCHS:
        raise ConfigError(f"GGUF architecture {arch!r} is not supported ({', '.join(_ARCHS)})")

    def get(key: str, default: Any = None, required: bool = False) -> Any:
        v = metadata.get(f"{arch}.{key}", default)
        if required and v is None:
            raise ConfigError(f"GGUF metadata is missing required key {arch}.{key!r}")
        return v

    names = set(tensor_names) if tensor_names is not None else None
    hidden = int(get("embedding_length", required=True))
    num_heads = int(get("attention.head_count", required=True))
    head_dim = int(get("attention.key_length") or hidden // num_heads)
    rope_dim = get("rope.dimension_count")
    if rope_dim is not None and int(rope_dim) != head_dim:
        raise ConfigError(f"partial rotary embeddings (rope.dimension_count {rope_dim} != "
                          f"head_dim {head_dim}) are not supported")
    vocab = get("vocab_size")
    if vocab is None:
        tokens = metadata.get("tokenizer.ggml.tokens")
        if tokens is None:
            raise ConfigError(f"GGUF metadata has neither {arch}.vocab_size nor "
                              "tokenizer.ggml.tokens")
        vocab = len(tokens)

    eos = [metadata.get(k) for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id")]
    eos_ids = tuple(dict.fromkeys(int(e) for e in eos if e is not None))
    bos = metadata.get("tokenizer.ggml.bos_token_id")
    sliding = get("attention.sliding_window")
    if names is None:
        tied, bias = False, arch == "qwen2"
    else:
        tied, bias = "output.weight" not in names, "blk.0.attn_q.bias" in names
    return ModelConfig(
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(get("feed_forward_length", required=True)),
        num_layers=int(get("block_count", required=True)),
        num_heads=num_heads,
        num_kv_heads=int(get("attention.head_count_kv") or num_heads),
        head_dim=head_dim,
        rms_norm_eps=_f32(get("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=_f32(get("rope.freq_base", 10000.0)),
        rope_scaling=_rope_scaling(get, head_dim, rope_freqs),
        max_position_embeddings=int(get("context_length", 2048)),
        tie_word_embeddings=tied,
        attention_bias=bias,
        sliding_window=int(sliding) if sliding else None,
        bos_token_id=int(bos) if bos is not None else None,
        eos_token_ids=eos_ids,
        model_type=arch,
    )


def _rope_scaling(get, head_dim: int, rope_freqs: np.ndarray | None) -> RopeScaling | None:
    kind = get("rope.scaling.type")
    factor = get("rope.scaling.factor")
    if rope_freqs is not None:
        return _llama3_scaling(get, head_dim, np.asarray(rope_freqs, np.float32))
    if kind in (None, "none") or (kind == "linear" and factor in (None, 1.0)):
        return None
    if kind == "linear":
        return RopeScaling(rope_type="linear", factor=_f32(factor))
    raise ConfigError(f"GGUF rope scaling type {kind!r} is not supported (linear, llama3)")


def _llama3_scaling(get, head_dim: int, rope_freqs: np.ndarray) -> RopeScaling:
    # llama.cpp bakes llama3 scaling into per-frequency divisors and drops the parameters. The
    # largest divisor is the factor; the rest are the values every Llama 3.x release uses, and we
    # recompute the divisors from them and insist they match rather than guess silently.
    base = _f32(get("rope.freq_base", 10000.0))
    orig = int(get("rope.scaling.original_context_length") or 8192)
    rs = RopeScaling(rope_type="llama3", factor=float(rope_freqs.max()), low_freq_factor=1.0,
                     high_freq_factor=4.0, original_max_position_embeddings=orig)
    freqs = 1.0 / base ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * np.pi / freqs
    low_wl, high_wl = orig / rs.low_freq_factor, orig / rs.high_freq_factor
    smooth = (orig / wavelen - rs.low_freq_factor) / (rs.high_freq_factor - rs.low_freq_factor)
    want = np.where(wavelen < high_wl, 1.0,
                    np.where(wavelen > low_wl, rs.factor, 1 / ((1 - smooth) / rs.factor + smooth)))
    if rope_freqs.shape != want.shape or not np.allclose(rope_freqs, want, rtol=1e-4):
        raise ConfigError("rope_freqs.weight does not match llama3 scaling with low_freq_factor "
                          "1, high_freq_factor 4; these rope parameters are not supported")
    return rs


def dequantize_tensor(t: gguf.ReaderTensor, source: str = "GGUF") -> np.ndarray:
    """float32 array in numpy order (ggml lists dims fastest-first, so `t.shape` is reversed).
    F32 tensors come back as a read-only view of the file's memory map."""
    qtype = GGMLQuantizationType(t.tensor_type)
    if qtype not in _SUPPORTED:
        raise CheckpointError(f"{source}: tensor {t.name} has type {qtype.name}, which jaxserve "
                              f"cannot dequantise (supported: "
                              f"{sorted(q.name for q in _SUPPORTED)})")
    shape = tuple(int(s) for s in reversed(t.shape))
    if t.data.nbytes != int(t.n_bytes):
        raise CheckpointError(f"{source}: tensor {t.name} has {t.data.nbytes} bytes of data, "
                              f"expected {int(t.n_bytes)} (truncated file?)")
    if qtype == GGMLQuantizationType.F32:
        return t.data.reshape(shape)
    # One flat row makes gguf dequantise the whole tensor in a single vectorised call instead of
    # looping over groups of 16 rows.
    return dequantize(t.data.reshape(1, -1), qtype).reshape(shape)


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo convert_hf_to_gguf's `permute`: within each head llama.cpp stores q/k rows as
    interleaved (re, im) pairs for its rope; HF-style rotate-half rope wants the two halves."""
    return w.reshape(n_head, -1, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_config(path: str | Path) -> ModelConfig:
    """ModelConfig of a GGUF file without reading its weights."""
    return _config(open_reader(path))


def _config(f: GGUFFile) -> ModelConfig:
    try:
        rope_freqs = f.tensors.get("rope_freqs.weight")
        return config_from_gguf(
            f.metadata, f.tensors.keys(),
            dequantize_tensor(rope_freqs, str(f.path)) if rope_freqs is not None else None)
    except ConfigError as e:
        raise ConfigError(f"{f.path}: {e}") from None


def load_gguf(path: str | Path, dtype: Any = np.float32) -> tuple[ModelConfig, dict[str, Any]]:
    """(config, params): params is a nested dict of host numpy arrays of `dtype` in the
    param_specs layout, per-layer weights stacked on axis 0 ([L, ...])."""
    path = Path(path)
    out_dtype = resolve_dtype(dtype)
    f = open_reader(path)
    tensors = f.tensors
    cfg = _config(f)
    params = empty_params(cfg, out_dtype)
    arch = cfg.model_type
    heads = {"wq": cfg.num_heads, "bq": cfg.num_heads, "wk": cfg.num_kv_heads,
             "bk": cfg.num_kv_heads}

    def fetch(gguf_name: str, name: str) -> np.ndarray:
        t = tensors.get(gguf_name)
        if t is None:
            raise CheckpointError(f"{path}: missing tensor {gguf_name}")
        w = dequantize_tensor(t, str(path))
        check_shape(w.shape, name, cfg, str(path), gguf_name)
        if arch == "llama" and name in heads:
            w = _unpermute(w, heads[name])
        return w

    for name, gguf_name in _TOP.items():
        if name in params:
            put_hf(params[name], name, fetch(gguf_name, name))
    layers = params["layers"]
    for i in range(cfg.num_layers):
        for name, suffix in _LAYER.items():
            if name in layers:
                put_hf(layers[name][i], name, fetch(f"blk.{i}.{suffix}", name))
    return cfg, params
