"""GGUF files: metadata, config, tokenizer fields and (dequantised) weights."""

from __future__ import annotations

import dataclasses
import functools
import logging
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

log = logging.getLogger(__name__)


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


# GGUF block types kept as they are by quantization="gguf": each maps onto a quantised-weight
# layout of model/quant.py without passing through full precision.
NATIVE = {GGMLQuantizationType.Q8_0: "int8", GGMLQuantizationType.Q4_0: "int4",
          GGMLQuantizationType.Q4_1: "int4"}
_MATMULS = frozenset({"embed", "lm_head", "wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down"})


def native_blocks(t: gguf.ReaderTensor) -> dict[str, np.ndarray]:
    """A Q8_0 / Q4_0 / Q4_1 tensor (rows = outputs N, K inputs per row in blocks of 32) as the
    quantised dict of model/quant.py in [K, N] orientation, bit-for-bit the values gguf's own
    dequantiser gives:
      Q8_0  d * q                      -> {"int8": q, "scale": d}          (groups of 32)
      Q4_0  d * (nibble - 8)           -> {"int4", "scale": d, "min": -8 d}
      Q4_1  d * nibble + m             -> {"int4", "scale": d, "min": m}
    (d, m are f16, so d * nibble and 8 d are exact in f32: nibble * scale + min reproduces both.)
    Q4 blocks store element j in the low nibble of byte j and element j + 16 in its high nibble,
    which is exactly the int4 packing of pallas_kernels.quant_matmul at group size 32."""
    qtype = GGMLQuantizationType(t.tensor_type)
    N, K = (int(s) for s in reversed(t.shape))
    nb = K // 32
    raw = np.asarray(t.data).reshape(-1).view(np.uint8).reshape(N, nb, -1)
    d = raw[..., :2].copy().view(np.float16)[..., 0].astype(np.float32)  # [N, K/32]
    if qtype == GGMLQuantizationType.Q8_0:
        q = raw[..., 2:].copy().view(np.int8).reshape(N, K)
        return {"int8": q.T.copy(), "scale": d.T.copy()}
    if qtype == GGMLQuantizationType.Q4_0:
        m, qs = -8.0 * d, raw[..., 2:]
    elif qtype == GGMLQuantizationType.Q4_1:
        m, qs = raw[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32), raw[..., 4:]
    else:
        raise CheckpointError(f"tensor {t.name}: {qtype.name} blocks cannot be kept natively "
                              f"(only {sorted(q.name for q in NATIVE)})")
    packed = qs.reshape(N, K // 2).view(np.int8)
    return {"int4": packed.T.copy(), "scale": d.T.copy(), "min": m.T.copy()}


def _native_weights(f: GGUFFile, cfg: ModelConfig) -> dict[str, Any]:
    """quantization="gguf": {param name: quantised dict} for each matmul weight whose GGUF
    tensors (all layers) are one native kind. Any other type (Q4_K, Q6_K, F16, ...) is left to
    the float path with a logged notice naming it: falling back keeps the file's exact values,
    where re-quantising them would add a second rounding."""
    tensors = f.tensors
    heads = {"wq": cfg.num_heads, "wk": cfg.num_kv_heads}
    plan = [(name, [g]) for name, g in _TOP.items() if name in _MATMULS and g in tensors]
    plan += [(name, [f"blk.{i}.{suffix}" for i in range(cfg.num_layers)])
             for name, suffix in _LAYER.items() if name in _MATMULS]
    out: dict[str, Any] = {}
    for name, names in plan:
        ts = [tensors.get(n) for n in names]
        if any(t is None for t in ts):
            continue  # the float path reports the missing tensor
        kinds = {NATIVE.get(GGMLQuantizationType(t.tensor_type)) for t in ts}
        if len(kinds) != 1 or None in kinds:
            types = "/".join(sorted({GGMLQuantizationType(t.tensor_type).name for t in ts}))
            log.warning("%s: %s is %s, which cannot be kept as int8/int4 blocks; loading its "
                        "dequantised values as float", f.path, names[0].replace("blk.0.", "blk.*."),
                        types)
            continue
        blocks = []
        for t in ts:
            check_shape(tuple(int(x) for x in reversed(t.shape)), name, cfg, str(f.path), t.name)
            b = native_blocks(t)
            if cfg.model_type == "llama" and name in heads:  # outputs (rows) are axis 1 here
                b = {k: np.ascontiguousarray(_unpermute(v.T, heads[name]).T)
                     for k, v in b.items()}
            blocks.append(b)
        out[name] = blocks[0] if name in _TOP else {
            k: np.stack([x[k] for x in blocks]) for k in blocks[0]}
    return out


def load_gguf(path: str | Path, dtype: Any = np.float32, native_quant: bool = False,
              ) -> tuple[ModelConfig, dict[str, Any]]:
    """(config, params): params is a nested dict of host numpy arrays of `dtype` in the
    param_specs layout, per-layer weights stacked on axis 0 ([L, ...]). native_quant: keep
    Q8_0/Q4_0/Q4_1 matmul weights as their blocks (see `native_blocks`)."""
    path = Path(path)
    out_dtype = resolve_dtype(dtype)
    f = open_reader(path)
    tensors = f.tensors
    cfg = _config(f)
    params = empty_params(cfg, out_dtype)  # np.empty: untouched buffers cost no memory
    native = _native_weights(f, cfg) if native_quant else {}
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
        if name in params and name not in native:
            put_hf(params[name], name, fetch(gguf_name, name))
    layers = params["layers"]
    for i in range(cfg.num_layers):
        for name, suffix in _LAYER.items():
            if name in layers and name not in native:
                put_hf(layers[name][i], name, fetch(f"blk.{i}.{suffix}", name))
    for name, w in native.items():
        (params if name in _TOP else layers)[name] = w
    return cfg, params
