"""The offline Python API, modelled on vLLM's `LLM`."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence as Seq
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxserve.config import (
    CONFIGS_DIR,
    DEFAULT_MODEL,
    HEAD_METHODS,
    EngineConfig,
    load_model_source,
    load_serve_preset,
)
from jaxserve.engine.engine import LLMEngine, RequestOutput
from jaxserve.engine.runner import ModelRunner
from jaxserve.engine.sampling import SamplingParams
from jaxserve.engine.sequence import Sequence
from jaxserve.errors import CheckpointError, ConfigError, InvalidRequestError
from jaxserve.loading import load_checkpoint
from jaxserve.loading.corpus import calibration_text
from jaxserve.loading.fetch import fetch_model
from jaxserve.model.awq import calibration_tokens
from jaxserve.model.params import cast_params, validate_params
from jaxserve.speculative.checkpoint import load_head_proposer
from jaxserve.speculative.draft_model import DraftModelProposer
from jaxserve.speculative.ngram import NgramProposer
from jaxserve.speculative.proposer import PROPOSERS
from jaxserve.tokenizer import Tokenizer, load_tokenizer
from pallas_kernels.dispatch import kernel_mode

Prompt = str | list[int]


def _machine_key() -> str:
    """jax/jaxlib version and, on CPU, the processor model and its feature flags. XLA:CPU
    executables are compiled for the host's instruction set; jax's cache key does not name it,
    and loading an entry built elsewhere (or by another jaxlib) can crash the process instead of
    missing, so each machine kind gets its own directory."""
    import hashlib
    import platform

    parts = [jax.__version__, jax.lib.__version__, platform.machine()]
    try:
        with open("/proc/cpuinfo") as f:
            parts += sorted({line for line in f if line.startswith(("model name", "flags"))})
    except OSError:
        parts.append(platform.processor())
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def enable_compilation_cache(directory: str | None) -> None:
    """Turn on JAX's persistent compilation cache so a restart reuses compiled steps, in a
    subdirectory per machine kind and jax version (see _machine_key). None: the default
    location, or $JAXSERVE_COMPILATION_CACHE ("" or "off" there leaves it off); "": off."""
    if directory is None:
        directory = os.environ.get("JAXSERVE_COMPILATION_CACHE",
                                   str(Path.home() / ".cache" / "jaxserve" / "jax"))
        if directory.lower() == "off":
            directory = ""
    if directory == "":
        return
    path = Path(directory) / _machine_key()
    path.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    # Our steps compile in ~1-20 s; cache every one of them, however quick.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def _resolve_model(model) -> tuple[Path, EngineConfig]:
    """A model name under configs/models/ (fetched when absent) or a checkpoint path."""
    if model is None:
        model = DEFAULT_MODEL
    path = Path(model)
    if not path.exists() and (CONFIGS_DIR / "models" / f"{model}.json").is_file():
        return fetch_model(str(model)), load_model_source(str(model)).engine_config()
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory (expected a model name under "
                              f"{CONFIGS_DIR / 'models'}, a .gguf file, an HF directory or an "
                              "Orbax checkpoint)")
    return path, EngineConfig()


class LLM:
    """Load a model and generate / score with it.

    model: None for the default model (fetched on first use), a name under configs/models/, a
    .gguf file, a Hugging Face directory (config.json + safetensors) or an Orbax checkpoint
    written by `jaxserve convert`. The engine config is the model's settings (configs/models/),
    then the serving preset's fields (`preset`: a name under configs/serve/), then the keyword
    overrides (dtype, max_model_len, num_pages, ...: EngineConfig fields). `engine_config`
    replaces the first two."""

    def __init__(self, model: str | os.PathLike | None = None, dtype: str | None = None, *,
                 preset: str | None = None, engine_config: EngineConfig | None = None,
                 **overrides: Any):
        if preset is not None and engine_config is not None:
            raise ConfigError(f"give a preset ({preset!r}) or an engine_config, not both")
        preset_fields = load_serve_preset(preset) if preset is not None else {}  # before loading
        path, base = _resolve_model(model)
        ecfg = dataclasses.replace(engine_config or base, **preset_fields)
        fields = {f.name for f in dataclasses.fields(EngineConfig)}
        unknown = sorted(set(overrides) - fields)
        if unknown:
            raise TypeError(f"unknown LLM option(s) {unknown}; EngineConfig fields: "
                            f"{sorted(fields)}")
        if dtype is not None:
            overrides["dtype"] = dtype
        ecfg = dataclasses.replace(ecfg, **overrides)
        if ecfg.kernels is None:
            try:
                ecfg = dataclasses.replace(ecfg, kernels=kernel_mode())
            except ValueError as e:
                raise ConfigError(str(e)) from None
        enable_compilation_cache(ecfg.compilation_cache_dir)

        self._tokenizer = load_tokenizer(path)
        calibration = (calibration_tokens(self._tokenizer,
                                          calibration_text(ecfg.quant_calibration))
                       if ecfg.quant_method == "awq" else None)
        try:
            cfg, host_params = load_checkpoint(path, dtype=ecfg.dtype,
                                               quantization=ecfg.quantization,
                                               group_size=ecfg.quant_group_size,
                                               calibration_tokens=calibration)
        except ValueError as e:  # bad group size for this model's dims
            raise ConfigError(str(e)) from None
        validate_params(cfg, host_params, str(path))
        if ecfg.max_model_len > cfg.max_position_embeddings:
            ecfg = dataclasses.replace(ecfg, max_model_len=cfg.max_position_embeddings)
        self.model_path = Path(path)
        self.model_config = cfg
        self.engine_config = ecfg
        params = cast_params(host_params, ecfg.dtype)
        del host_params
        proposer, proposer_params = self._make_proposer(ecfg, path, cfg, params)
        self.runner = ModelRunner(cfg, params, ecfg, self._tokenizer.eos_token_ids,
                                  proposer=proposer, proposer_params=proposer_params)
        self.engine_config = ecfg = self.runner.ecfg  # with the backend's defaults
        self.engine = LLMEngine(self.runner, self._tokenizer, ecfg)

    @staticmethod
    def _make_proposer(ecfg: EngineConfig, path: Path, cfg, params=None):
        """The speculative proposer and its weights (a draft model's params, draft heads), if
        any. params: the target's (draft heads are checked against them)."""
        method = ecfg.speculative_method
        if method is None:
            return None, None
        if method == "ngram":
            return NgramProposer(ecfg.prompt_lookup_min, ecfg.prompt_lookup_max), None
        if method in HEAD_METHODS:
            proposer, heads = load_head_proposer(ecfg.speculative_model, method, cfg, params,
                                                 Path(path).name)
            n = getattr(proposer, "num_heads", None)
            if n is not None and ecfg.num_speculative_tokens > n:
                raise ConfigError(f"num_speculative_tokens {ecfg.num_speculative_tokens} "
                                  f"exceeds the {n} heads of {ecfg.speculative_model}")
            return proposer, cast_params(heads, ecfg.dtype)
        if method != "draft_model":
            if method not in PROPOSERS:
                raise ConfigError(f"speculative_method {method!r} is not a registered proposer "
                                  f"(known: {sorted(PROPOSERS)})")
            return PROPOSERS[method](), None
        draft_path = path
        if ecfg.speculative_model is not None:
            draft_path, _ = _resolve_model(ecfg.speculative_model)
        try:
            dcfg, dparams = load_checkpoint(draft_path, dtype=ecfg.dtype,
                                            quantization=ecfg.speculative_quantization,
                                            group_size=ecfg.quant_group_size)
        except ValueError as e:
            raise ConfigError(f"speculative_model: {e}") from None
        if dcfg.vocab_size != cfg.vocab_size:
            raise ConfigError(f"speculative_model {draft_path} has a vocabulary of "
                              f"{dcfg.vocab_size} tokens; the target's is {cfg.vocab_size}")
        n = ecfg.speculative_num_layers
        if n is not None:
            if n > dcfg.num_layers:
                raise ConfigError(f"speculative_num_layers {n} exceeds the draft model's "
                                  f"{dcfg.num_layers} layers")
            dparams = {**dparams, "layers": jax.tree.map(lambda a: a[:n], dparams["layers"])}
            dcfg = dataclasses.replace(dcfg, num_layers=n)
        validate_params(dcfg, dparams, str(draft_path))
        proposer = DraftModelProposer(cfg=dcfg, sample_drafts=ecfg.speculative_draft_sampling)
        return proposer, cast_params(dparams, ecfg.dtype)

    @property
    def tokenizer(self) -> Tokenizer:
        return self._tokenizer

    def encode_chat(self, messages: list[dict[str, str]],
                    add_generation_prompt: bool = True) -> list[int]:
        return self._tokenizer.encode_chat(messages, add_generation_prompt=add_generation_prompt)

    def _to_ids(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            if not prompt:
                raise InvalidRequestError("prompt is empty")
            return self._tokenizer.encode(prompt)
        if isinstance(prompt, (list, tuple, np.ndarray)):
            bad = [t for t in prompt
                   if not isinstance(t, (int, np.integer)) or isinstance(t, (bool, np.bool_))]
            if bad:
                raise InvalidRequestError(f"prompt token ids must be integers, got {bad[:3]}")
            return [int(t) for t in prompt]
        raise InvalidRequestError(f"a prompt must be a string or a list of token ids, got "
                                  f"{type(prompt).__name__}")

    def generate(self, prompts: Prompt | Seq[Prompt],
                 sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
                 ) -> list[RequestOutput]:
        """Generate for every prompt (a string or a list of token ids), all batched together.
        Results come back in prompt order. Every request is validated before any runs."""
        single = isinstance(prompts, str) or (
            isinstance(prompts, np.ndarray) and prompts.ndim == 1) or (
            isinstance(prompts, (list, tuple)) and len(prompts) > 0
            and all(isinstance(t, (int, np.integer)) for t in prompts))
        prompt_list = [prompts] if single else list(prompts)
        if not prompt_list:
            raise InvalidRequestError("no prompts given")
        if sampling_params is None:
            sampling_params = SamplingParams()
        if not isinstance(sampling_params, (list, tuple)):  # one for all; add_request checks type
            param_list = [sampling_params] * len(prompt_list)
        else:
            param_list = list(sampling_params)
            if len(param_list) != len(prompt_list):
                raise InvalidRequestError(f"{len(param_list)} sampling params for "
                                          f"{len(prompt_list)} prompts")
        ids = [self._to_ids(p) for p in prompt_list]
        if self.engine.has_unfinished():
            raise RuntimeError("the engine is busy with other requests")
        seqs: list[Sequence] = []
        try:
            for p, sp in zip(ids, param_list, strict=True):
                seqs.append(self.engine.add_request(p, sp))
        except Exception:
            self.engine.waiting.clear()  # drop the ones queued before the bad request
            raise
        while self.engine.has_unfinished():
            self.engine.step()
        return [self.engine.output(s) for s in seqs]

    def _score_ids(self, s: Seq[int], what: str = "score") -> list[int]:
        """A teacher-forcing input, validated: token ids, 2 <= length <= max_model_len."""
        ids = self._to_ids(list(s))
        if len(ids) < 2:
            raise InvalidRequestError(f"{what} needs sequences of at least 2 tokens")
        if len(ids) > self.engine_config.max_model_len:
            raise InvalidRequestError(f"sequence of {len(ids)} tokens is longer than the "
                                      f"context length {self.engine_config.max_model_len}")
        bad = [t for t in ids if not 0 <= t < self.model_config.vocab_size]
        if bad:
            raise InvalidRequestError(f"token id(s) {bad[:5]} outside the vocabulary")
        return ids

    def _teacher_forced(self, ids: list[int], fn):
        """fn(seq, chunk) over a scratch sequence holding ids[:-1] in freshly allocated KV pages
        (freed afterwards): the paged, chunked prefill path that serving uses."""
        bm = self.engine.block_manager
        seq = Sequence(seq_id=-1, prompt_ids=ids[:-1], params=None, seed=0, max_len=len(ids))
        if not bm.can_allocate([], len(ids) - 1):
            raise InvalidRequestError(f"sequence of {len(ids)} tokens does not fit in the "
                                      "KV cache")
        bm.allocate(seq.block_table, len(ids) - 1)
        try:
            return fn(seq, self.engine_config.max_num_batched_tokens)
        finally:
            bm.free(seq.block_table)

    def score(self, sequences: Seq[Seq[int]]) -> list[np.ndarray]:
        """For each token-id sequence [t0..tn], log p(t_i | t_<i) for i = 1..n, as [n] f32."""
        seqs = [self._score_ids(s) for s in sequences]
        if self.engine.has_unfinished():
            raise RuntimeError("the engine is busy with other requests")
        # Score all but the last token as input; targets are the tokens that follow.
        return [self._teacher_forced(ids, lambda seq, chunk, ids=ids:
                                     self.runner.score(seq, ids[1:], chunk))
                for ids in seqs]

    def next_token_logprobs(self, token_ids: Seq[int], start: int = 0) -> np.ndarray:
        """The full next-token distribution along a token-id sequence [t0..tn]: row i is
        log p(. | t_0..t_i) over the vocabulary, f32 [n, V] (so row i at t_{i+1} is `score`'s
        i-th value). Computed like `score`, through the paged KV cache in prefill chunks (so the
        KV cache dtype and quantised weights are exercised as in serving). Only rows
        start..n-1 are returned ([n - start, V]); earlier ones are still computed as context
        but never copied to the host."""
        ids = self._score_ids(token_ids, "next_token_logprobs")
        if not isinstance(start, (int, np.integer)) or not 0 <= start < len(ids) - 1:
            raise InvalidRequestError(f"start must be an int in [0, {len(ids) - 1}), got "
                                      f"{start!r}")
        if self.engine.has_unfinished():
            raise RuntimeError("the engine is busy with other requests")
        return self._teacher_forced(
            ids, lambda seq, chunk: self.runner.logprobs(seq, chunk, int(start)))
