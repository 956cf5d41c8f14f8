"""Training Medusa / EAGLE draft heads by self-distillation (`jaxserve train-draft`).

Recipe:
  1. Data: the engine itself continues a committed prompt set (configs/draft/prompts.json:
     input-grounded, chat and free-continuation prompts), greedily and once sampled (T = 0.8,
     for variety), from the target model. The sequences are cached (checkpoints/draft-data/),
     so training the other method reuses them.
  2. Features: the target's final-norm hidden states over prompt + continuation (dense
     teacher-forced forward), and its greedy next token at every position (`labels`): those
     are what verification compares drafts with.
  3. Loss, over positions whose context is the target's own continuation (from the last
     prompt token on). Medusa: head k on the feature of position p, cross-entropy against
     labels[p + k] (the target's token at p + k + 1). EAGLE: the draft decoder run teacher-
     forced over whole sequences (input features jittered with uniform noise, as in EAGLE),
     smooth-L1 regression of f^_q on f_q (in units of the features' RMS) + 0.1 x
     cross-entropy of lm_head(f^_q) against labels[q].
  4. optax AdamW, linear warm-up then cosine decay, gradient clipping at 1.
  5. Measured: the loss curve, offline top-1 agreement with the labels on held-out prompts,
     and the engine's acceptance (mean accepted drafts per verifying step, acceptance per
     position) generating the held-out prompts with the trained heads, checked token for
     token against plain greedy decoding.

The target's LM head is [D, V] (V = 49152 for the default model), so each token a head scores
costs a D x V matmul forward and backward (no weight gradient: the head is frozen); steps
sample a fixed number of positions to keep that bounded.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxserve.config import CONFIGS_DIR, ModelConfig
from jaxserve.engine.sampling import fast_argmax
from jaxserve.model.llama import hidden_dense, lm_head
from jaxserve.speculative.checkpoint import head_proposer, save_heads, target_identity
from jaxserve.speculative.eagle import eagle_dense
from jaxserve.speculative.features import target_view
from jaxserve.speculative.medusa import medusa_features

PROMPTS_FILE = CONFIGS_DIR / "draft" / "prompts.json"
KINDS = ("grounded", "chat", "continue")
EAGLE_CLS_WEIGHT = 0.1  # EAGLE's weight of the token loss beside the feature regression
EAGLE_NOISE = 0.1  # half-width of the uniform input-feature noise, in units of feature RMS


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    method: str  # "medusa" | "eagle"
    steps: int = 300
    lr: float = 1e-3
    warmup: int = 20
    weight_decay: float = 0.0
    batch_positions: int = 256  # positions scored per step (the LM head's share of the cost)
    batch_seqs: int = 4  # EAGLE: whole sequences per step (the regression covers all of them)
    num_heads: int = 4  # Medusa
    seed: int = 0

    def __post_init__(self):
        if self.method not in ("medusa", "eagle"):
            raise ValueError(f"method must be medusa or eagle, got {self.method!r}")


# -- prompts and data -------------------------------------------------------------------------


def load_prompts(split: str, path: Path = PROMPTS_FILE) -> list[tuple[str, str]]:
    """[(kind, text)] of a split ("train" | "heldout"), round-robin over the kinds so that any
    prefix mixes them. Grounded prompts are every passage under every task."""
    data = json.loads(Path(path).read_text())[split]
    g = data["grounded"]
    by_kind = {"grounded": [f"{t}\n\n{p}" for p in g["passages"] for t in g["tasks"]],
               "chat": list(data["chat"]), "continue": list(data["continue"])}
    out = []
    for i in range(max(len(v) for v in by_kind.values())):
        out += [(k, by_kind[k][i]) for k in KINDS if i < len(by_kind[k])]
    return out


def encode_prompts(tokenizer, prompts: list[tuple[str, str]]) -> list[list[int]]:
    """Grounded and chat prompts as a user turn in the chat template; continuations raw."""
    return [tokenizer.encode(text) if kind == "continue" else
            tokenizer.encode_chat([{"role": "user", "content": text}]) for kind, text in prompts]


@dataclasses.dataclass
class Dataset:
    """Padded sequences and what the target computes over them."""

    tokens: np.ndarray  # [M, T] int32, 0-padded
    lengths: np.ndarray  # [M] int32
    starts: np.ndarray  # [M] int32: first trained position (the last prompt token)
    features: np.ndarray  # [M, T, D] f32: the target's final-norm hidden states
    labels: np.ndarray  # [M, T] int32: the target's greedy next token after each position

    @property
    def num_tokens(self) -> int:
        return int(self.lengths.sum())


def continuations(generate: Callable, prompt_ids: list[list[int]], max_tokens: int,
                  sampled: bool, seed: int = 0) -> list[tuple[list[int], int]]:
    """[(prompt + continuation ids, prompt length)]: greedy continuations, and with `sampled`
    one more per prompt at temperature 0.8. generate(prompts, params) -> outputs (LLM.generate)."""
    from jaxserve.engine.sampling import SamplingParams

    params = [SamplingParams(temperature=0.0, max_tokens=max_tokens)] * len(prompt_ids)
    if sampled:
        prompt_ids = prompt_ids + prompt_ids
        params = params + [SamplingParams(temperature=0.8, top_p=0.95, seed=seed + i,
                                          max_tokens=max_tokens) for i in range(len(params))]
    outs = generate(prompt_ids, params)
    return [(list(p) + list(o.token_ids), len(p)) for p, o in zip(prompt_ids, outs, strict=True)]


def corpus_sequences(tokenizer, num_tokens: int, length: int = 256,
                     ) -> list[tuple[list[int], int]]:
    """More self-distillation data than the prompt set gives: the first num_tokens tokens of
    the evaluation corpus (Brown, press + fiction; fetched and hash-checked like the model) in
    sequences of `length`, as (ids, 1): trained from the first position. Their labels are the
    target's own greedy tokens, as for its continuations, not the corpus's next words."""
    from jaxserve.loading.corpus import load_corpus_text

    text = load_corpus_text()[: num_tokens * 8]  # ~4-5 characters a token: enough text
    ids = tokenizer.encode(text)[:num_tokens]
    return [(ids[i : i + length], 1) for i in range(0, len(ids) - length + 1, length)]


def stacked(params: dict[str, Any]) -> dict[str, Any]:
    """params with `layers` stacked (the dense forward scans them)."""
    layers = params["layers"]
    if isinstance(layers, (list, tuple)):
        layers = jax.tree.map(lambda *a: jnp.stack(a), *layers)
    return {**params, "layers": layers}


def build_dataset(cfg: ModelConfig, params: dict[str, Any], seqs: list[tuple[list[int], int]],
                  batch: int = 4) -> Dataset:
    """The target's features and greedy labels over seqs (teacher-forced, no cache). Batches
    of similar length (sorted), each padded to a multiple of 64 tokens: a few programs, little
    padding computed."""
    params = stacked(params)
    M = len(seqs)
    lengths = np.array([len(s) for s, _ in seqs], np.int32)
    T = -(-int(lengths.max()) // 64) * 64
    tokens = np.zeros((M, T), np.int32)
    for i, (s, _) in enumerate(seqs):
        tokens[i, : len(s)] = s

    @jax.jit
    def run(params, tokens):
        h = hidden_dense(params, cfg, tokens)  # [B, t, D]
        B, t = tokens.shape
        logits = lm_head(cfg, params, h).reshape(B * t, -1)
        return h.astype(jnp.float32), fast_argmax(logits).reshape(B, t)

    features = np.zeros((M, T, cfg.hidden_size), np.float32)
    labels = np.zeros((M, T), np.int32)
    order = np.argsort(lengths, kind="stable")
    for i in range(0, M, batch):
        idx = order[i : i + batch]
        t = -(-int(lengths[idx].max()) // 64) * 64
        chunk = tokens[idx, :t]
        if len(idx) < batch:  # the same program for the last batch
            chunk = np.concatenate([chunk, np.zeros((batch - len(idx), t), np.int32)])
        h, y = run(params, chunk)
        features[idx, :t] = np.asarray(h)[: len(idx)]
        labels[idx, :t] = np.asarray(y)[: len(idx)]
    return Dataset(tokens=tokens, lengths=lengths,
                   starts=np.array([p - 1 for _, p in seqs], np.int32),
                   features=features, labels=labels)


# -- losses -----------------------------------------------------------------------------------


def _ce(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """logits [..., V] f32, labels [...] -> per-item cross-entropy [...]."""
    lse = jax.nn.logsumexp(logits, axis=-1)
    return lse - jnp.take_along_axis(logits, labels[..., None], axis=-1)[..., 0]


def medusa_loss(heads, cfg: ModelConfig, view, h: jax.Array, labels: jax.Array,
                weight: jax.Array) -> tuple[jax.Array, jax.Array]:
    """h [P, D] features, labels / weight [P, K] (labels[p, k-1] = the target's token k+1
    after p) -> (mean weighted CE, per-head top-1 agreement [K])."""
    logits = lm_head(cfg, view, medusa_features(heads, h))  # [P, K, V]
    ce = _ce(logits, labels)
    hit = (jnp.argmax(logits, -1) == labels) * weight
    w = jnp.maximum(weight.sum(0), 1.0)
    return (ce * weight).sum() / w.sum(), hit.sum(0) / w


def eagle_loss(draft, cfg: ModelConfig, view, feats: jax.Array, tokens: jax.Array,
               labels: jax.Array, mask: jax.Array, ce_index: jax.Array, ce_weight: jax.Array,
               rms: float, noise: jax.Array) -> tuple[jax.Array, jax.Array]:
    """feats [B, T, D], tokens / labels / mask [B, T] (mask: positions trained), ce_index
    [P, 2] (b, t) and ce_weight [P]: the positions whose token loss is computed, noise
    [B, T, D] added to the input features. -> (loss, top-1 agreement of the token
    prediction)."""
    pred = eagle_dense(draft, cfg, view, feats + noise, tokens)  # [B, T, D]
    err = jnp.abs(pred - feats) / rms
    reg = jnp.where(err < 1.0, 0.5 * err * err, err - 0.5).mean(-1)  # smooth L1 per position
    reg = (reg * mask).sum() / jnp.maximum(mask.sum(), 1.0)
    b, t = ce_index[:, 0], ce_index[:, 1]
    logits = lm_head(cfg, view, pred[b, t][:, None])[:, 0]  # [P, V]
    labels = labels[b, t]
    ce = (_ce(logits, labels) * ce_weight).sum() / jnp.maximum(ce_weight.sum(), 1.0)
    acc = ((jnp.argmax(logits, -1) == labels) * ce_weight).sum() / jnp.maximum(
        ce_weight.sum(), 1.0)
    return reg + EAGLE_CLS_WEIGHT * ce, acc


# -- batches ----------------------------------------------------------------------------------


def medusa_positions(ds: Dataset, num_heads: int) -> tuple[np.ndarray, np.ndarray]:
    """Every trained (sequence, position) pair [n, 2] and its per-head weight [n, K] (1 where
    the label p + k lies inside the sequence)."""
    pairs, weights = [], []
    for i, (start, n) in enumerate(zip(ds.starts, ds.lengths, strict=True)):
        p = np.arange(start, n - 1)
        pairs.append(np.stack([np.full_like(p, i), p], 1))
        weights.append((p[:, None] + np.arange(1, num_heads + 1)[None] <= n - 1).astype(
            np.float32))
    return np.concatenate(pairs), np.concatenate(weights)


def medusa_batch(ds: Dataset, pairs, weights, idx, num_heads: int):
    s, p = pairs[idx, 0], pairs[idx, 1]
    k = np.arange(1, num_heads + 1)
    # labels[q] is the target's token at q + 1, so head k's (at p + k + 1) is labels[p + k].
    lab = ds.labels[s[:, None], np.minimum(p[:, None] + k[None], ds.tokens.shape[1] - 1)]
    return ds.features[s, p], lab.astype(np.int32), weights[idx]


def eagle_batch(ds: Dataset, seq_idx, num_positions: int, rng: np.random.Generator):
    tokens = ds.tokens[seq_idx]
    T = tokens.shape[1]
    t = np.arange(T)[None]
    mask = ((t >= ds.starts[seq_idx, None]) & (t < ds.lengths[seq_idx, None])).astype(np.float32)
    cand = np.argwhere(mask > 0)
    take = rng.choice(len(cand), size=num_positions, replace=len(cand) < num_positions)
    ce_index = cand[take].astype(np.int32)
    ce_weight = np.ones((num_positions,), np.float32)
    if len(cand) < num_positions:  # repeats count once
        _, first = np.unique(take, return_index=True)
        ce_weight[:] = 0
        ce_weight[first] = 1
    return ds.features[seq_idx], tokens, ds.labels[seq_idx], mask, ce_index, ce_weight


# -- training ---------------------------------------------------------------------------------


def train_heads(tcfg: TrainConfig, cfg: ModelConfig, target_params: dict[str, Any],
                ds: Dataset, log: Callable[[str], None] = print, log_every: int = 10,
                ) -> tuple[dict[str, np.ndarray], list[dict[str, float]]]:
    """Train `tcfg.method` heads on ds for the target (cfg, its device params). Returns host
    f32 params and the loss curve: one point per log_every steps, means over those steps."""
    settings = {"num_heads": tcfg.num_heads} if tcfg.method == "medusa" else {}
    _, init = head_proposer(tcfg.method, settings, cfg)
    params = jax.tree.map(jnp.asarray, init)
    view = target_view(cfg, target_params)  # an argument of the step, not a baked constant
    warmup = min(tcfg.warmup, tcfg.steps // 5)  # short runs (tests) warm up for a fifth
    sched = optax.warmup_cosine_decay_schedule(0.0, tcfg.lr, warmup, max(tcfg.steps, warmup + 1),
                                               end_value=tcfg.lr * 0.05)
    opt = optax.chain(optax.clip_by_global_norm(1.0),
                      optax.adamw(sched, weight_decay=tcfg.weight_decay))
    opt_state = opt.init(params)
    rng = np.random.default_rng(tcfg.seed)
    key = jax.random.key(tcfg.seed)

    if tcfg.method == "medusa":
        pairs, weights = medusa_positions(ds, tcfg.num_heads)

        def loss_fn(p, view, batch, _key):
            return medusa_loss(p, cfg, view, *batch)

        def next_batch():
            idx = rng.integers(0, len(pairs), tcfg.batch_positions)
            return medusa_batch(ds, pairs, weights, idx, tcfg.num_heads)
    else:
        valid = np.arange(ds.tokens.shape[1])[None] < ds.lengths[:, None]
        rms = float(np.sqrt(np.mean(ds.features[valid] ** 2)))

        def loss_fn(p, view, batch, k):
            feats = batch[0]
            noise = jax.random.uniform(k, feats.shape, feats.dtype, -EAGLE_NOISE * rms,
                                       EAGLE_NOISE * rms)
            return eagle_loss(p, cfg, view, *batch, rms, noise)

        def next_batch():
            idx = rng.integers(0, len(ds.tokens), tcfg.batch_seqs)
            return eagle_batch(ds, idx, tcfg.batch_positions, rng)

    @jax.jit
    def step(params, opt_state, view, batch, k):
        (loss, acc), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, view, batch, k)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, acc

    curve, window, t0 = [], [], time.perf_counter()
    for i in range(tcfg.steps):
        key, k = jax.random.split(key)
        params, opt_state, loss, acc = step(params, opt_state, view, next_batch(), k)
        window.append((float(loss), np.asarray(acc, np.float64)))
        if (i + 1) % log_every == 0 or i + 1 == tcfg.steps:
            point = {"step": i + 1, "loss": float(np.mean([w[0] for w in window])),
                     "top1": np.mean([w[1] for w in window], axis=0).round(4).tolist(),
                     "elapsed_s": round(time.perf_counter() - t0, 1)}
            curve.append(point)
            log(f"step {point['step']}: loss {point['loss']:.4f} top-1 {point['top1']} "
                f"({point['elapsed_s']} s)")
            window = []
    return jax.tree.map(lambda a: np.asarray(a, np.float32), params), curve


def evaluate_heads(tcfg: TrainConfig, cfg: ModelConfig, target_params, params,
                   ds: Dataset) -> dict[str, Any]:
    """Offline on ds (held-out): the loss and top-1 agreement with the target's greedy tokens
    (per head for Medusa, the first draft for EAGLE), every trained position once."""
    view = target_view(cfg, target_params)
    params = jax.tree.map(jnp.asarray, params)
    if tcfg.method == "medusa":
        pairs, weights = medusa_positions(ds, tcfg.num_heads)
        fn = jax.jit(lambda p, v, b: medusa_loss(p, cfg, v, *b))
        losses, hits, n = [], [], []
        for i in range(0, len(pairs), tcfg.batch_positions):
            idx = np.arange(i, min(i + tcfg.batch_positions, len(pairs)))
            idx = np.pad(idx, (0, tcfg.batch_positions - len(idx)), mode="edge")
            h, lab, w = medusa_batch(ds, pairs, weights, idx, tcfg.num_heads)
            w = w * (np.arange(len(idx)) < min(tcfg.batch_positions, len(pairs) - i))[:, None]
            loss, acc = fn(params, view, (h, lab, w))
            losses.append(float(loss) * w.sum())
            hits.append(np.asarray(acc) * w.sum(0))
            n.append(w.sum(0))
        n = np.sum(n, 0)
        return {"loss": float(np.sum(losses) / n.sum()),
                "top1_per_head": (np.sum(hits, 0) / np.maximum(n, 1)).round(4).tolist()}
    valid = np.arange(ds.tokens.shape[1])[None] < ds.lengths[:, None]
    rms = float(np.sqrt(np.mean(ds.features[valid] ** 2)))
    fn = jax.jit(lambda p, v, b: eagle_loss(p, cfg, v, *b, rms, jnp.zeros_like(b[0])))
    losses, accs, ws = [], [], []
    for i in range(len(ds.tokens)):
        feats, tokens, labels, mask, _, _ = eagle_batch(ds, np.array([i]), 1,
                                                        np.random.default_rng(0))
        cand = np.argwhere(mask > 0).astype(np.int32)
        T = tokens.shape[1]  # pad the positions to T: one program for every sequence
        w = (np.arange(T) < len(cand)).astype(np.float32)
        cand = np.pad(cand, ((0, T - len(cand)), (0, 0)))
        loss, acc = fn(params, view, (feats, tokens, labels, mask, cand, w))
        cand = cand[: int(w.sum())]
        losses.append(float(loss) * len(cand))
        accs.append(float(acc) * len(cand))
        ws.append(len(cand))
    return {"loss": float(np.sum(losses) / np.sum(ws)),
            "top1_first_draft": round(float(np.sum(accs) / np.sum(ws)), 4)}


# -- the command ------------------------------------------------------------------------------


def _data_cache(model_path: Path, prompts: list[list[int]], max_tokens: int,
                sampled: bool) -> Path:
    from jaxserve.loading.fetch import default_cache_dir

    key = hashlib.sha256(json.dumps([model_path.name, prompts, max_tokens, sampled]).encode())
    return default_cache_dir() / "draft-data" / f"{key.hexdigest()[:16]}.json"


def cached_continuations(llm, prompts: list[list[int]], max_tokens: int, sampled: bool,
                         log: Callable[[str], None]) -> list[tuple[list[int], int]]:
    path = _data_cache(llm.model_path, prompts, max_tokens, sampled)
    if path.is_file():
        log(f"self-distillation data: {path} (cached)")
        return [tuple(x) for x in json.loads(path.read_text())]
    t0 = time.perf_counter()
    seqs = continuations(llm.generate, prompts, max_tokens, sampled)
    log(f"generated {sum(len(s) - p for s, p in seqs)} tokens in "
        f"{time.perf_counter() - t0:.0f} s")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(seqs))
    tmp.replace(path)
    return seqs


def measure_acceptance(model, method: str, heads_dir: Path, prompts: list[list[int]],
                       max_tokens: int, num_speculative_tokens: int,
                       want: list[list[int]]) -> dict[str, Any]:
    """The engine's acceptance generating `prompts` greedily with the heads (K fixed), and
    whether every output equals plain greedy decoding (`want`)."""
    from jaxserve.engine.sampling import SamplingParams
    from jaxserve.llm import LLM

    llm = LLM(model, speculative_method=method, speculative_model=str(heads_dir),
              num_speculative_tokens=num_speculative_tokens, speculative_adaptive=False)
    t0 = time.perf_counter()
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=max_tokens))
    wall = time.perf_counter() - t0
    st = llm.engine.stats()
    K = num_speculative_tokens
    return {
        "num_speculative_tokens": K,
        "spec_steps": st["spec_steps"], "spec_proposed": st["spec_proposed"],
        "spec_accepted": st["spec_accepted"],
        "mean_accepted_drafts": round(st["spec_mean_accepted"], 4),
        "mean_tokens_per_step": round(1 + st["spec_mean_accepted"], 4),
        "accepted_at": [st[f"spec_accepted_at_{j + 1}"] for j in range(K)],
        "acceptance_rate": round(st["spec_accepted"] / max(st["spec_proposed"], 1), 4),
        "generate_s": round(wall, 1),
        "tokens": sum(len(o.token_ids) for o in outs),
        "equals_plain": [o.token_ids for o in outs] == want,
    }


def train_draft(method: str, out: str | Path, *, model: str | None = None, steps: int = 300,
                lr: float | None = None, num_prompts: int | None = None,
                max_tokens: int = 96, num_heads: int = 4, sampled: bool = True,
                num_speculative_tokens: int = 4, seed: int = 0, corpus_tokens: int = 0,
                log: Callable[[str], None] = print) -> dict[str, Any]:
    """The whole recipe (module docstring) on `model` (None: the default model, fetched);
    writes the checkpoint to `out` and returns the results record."""
    from jaxserve.engine.sampling import SamplingParams
    from jaxserve.llm import LLM

    t_start = time.perf_counter()
    lr = lr if lr is not None else (1e-3 if method == "medusa" else 5e-4)
    tcfg = TrainConfig(method=method, steps=steps, lr=lr, num_heads=num_heads, seed=seed)
    llm = LLM(model, dtype="float32")
    cfg, target = llm.model_config, llm.runner.params
    train_prompts = load_prompts("train")[:num_prompts]
    heldout_prompts = load_prompts("heldout")
    tok = llm.tokenizer
    train_ids = encode_prompts(tok, train_prompts)
    heldout_ids = encode_prompts(tok, heldout_prompts)

    t0 = time.perf_counter()
    seqs = cached_continuations(llm, train_ids, max_tokens, sampled, log)
    if corpus_tokens:
        seqs += corpus_sequences(tok, corpus_tokens)
    want = [o.token_ids for o in llm.generate(
        heldout_ids, SamplingParams(temperature=0.0, max_tokens=max_tokens))]
    data_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    ds = build_dataset(cfg, target, seqs)
    held = build_dataset(cfg, target, [(p + w, len(p)) for p, w in zip(heldout_ids, want,
                                                                         strict=True)])
    features_s = time.perf_counter() - t0
    log(f"dataset: {len(seqs)} sequences, {ds.num_tokens} tokens "
        f"({int((ds.lengths - ds.starts).sum())} trained positions); features in "
        f"{features_s:.0f} s")

    t0 = time.perf_counter()
    params, curve = train_heads(tcfg, cfg, target, ds, log)
    train_s = time.perf_counter() - t0
    evaluation = evaluate_heads(tcfg, cfg, target, params, held)
    log(f"held-out: {evaluation}")
    settings = {"num_heads": num_heads} if method == "medusa" else {}
    identity = target_identity(cfg, target, llm.model_path.name)
    training = {"steps": steps, "lr": lr, "train_prompts": len(train_prompts),
                "sequences": len(seqs), "tokens": ds.num_tokens, "max_tokens": max_tokens,
                "sampled": sampled, "final_loss": curve[-1]["loss"]}
    save_heads(out, method, settings, params, identity, training)
    log(f"wrote {method} heads to {out}")
    del llm

    t0 = time.perf_counter()
    acceptance = measure_acceptance(model, method, Path(out), heldout_ids, max_tokens,
                                    min(num_speculative_tokens, num_heads)
                                    if method == "medusa" else num_speculative_tokens, want)
    log(f"acceptance on {len(heldout_ids)} held-out prompts: {acceptance}")
    return {
        "method": method, "target": identity, "config": dataclasses.asdict(tcfg),
        "settings": settings,
        "data": {"prompts_file": "configs/draft/prompts.json", "train_prompts": len(train_prompts),
                 "heldout_prompts": len(heldout_ids), "sequences": len(seqs),
                 "max_tokens": max_tokens, "sampled": sampled, "corpus_tokens": corpus_tokens,
                 "tokens": ds.num_tokens,
                 "trained_positions": int((ds.lengths - ds.starts).sum())},
        "loss_curve": curve, "heldout": evaluation, "acceptance": acceptance,
        "time_s": {"data": round(data_s, 1), "features": round(features_s, 1),
                   "train": round(train_s, 1),
                   "acceptance": round(time.perf_counter() - t0, 1),
                   "total": round(time.perf_counter() - t_start, 1)},
    }
