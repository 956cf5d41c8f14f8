"""Draft-head checkpoints (Medusa, EAGLE): the head weights as an Orbax checkpoint beside a
JSON file naming the method, its settings and the target model the heads were trained for.

    <dir>/draft_config.json   {"method", "settings", "target": identity, "training": {...}}
    <dir>/params/             Orbax StandardCheckpointer output (f32 host arrays)

Heads read the target's features and its LM head, so they are only meaningful on the model
they were trained on. The target's identity is a fingerprint of its ModelConfig and one of its
weights (the norm vectors, which no quantisation mode touches, rounded to bfloat16 so float32,
bfloat16 and float16 serving of one checkpoint agree); loading against anything else is a
ConfigError saying which model the heads belong to.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import jax
import ml_dtypes
import numpy as np

from jaxserve.config import ModelConfig
from jaxserve.errors import CheckpointError, ConfigError
from jaxserve.loading.common import config_to_dict
from jaxserve.speculative.eagle import EagleProposer, init_eagle
from jaxserve.speculative.medusa import MedusaProposer, init_medusa

CONFIG_FILE = "draft_config.json"
PARAMS_DIR = "params"


def target_identity(cfg: ModelConfig, params: dict[str, Any], name: str = "") -> dict[str, str]:
    """{"name", "config_sha256", "weights_sha256"} of a target model (params: host or device,
    layers stacked or unstacked)."""
    config = json.dumps(config_to_dict(cfg), sort_keys=True).encode()
    norms = [params["final_norm"]]
    layers = params["layers"]
    for lp in (layers if isinstance(layers, (list, tuple)) else [layers]):
        norms += [lp["attn_norm"], lp["mlp_norm"]]
    h = hashlib.sha256()
    for w in norms:
        h.update(np.asarray(np.asarray(w, np.float32), ml_dtypes.bfloat16).tobytes())
    return {"name": name, "config_sha256": hashlib.sha256(config).hexdigest(),
            "weights_sha256": h.hexdigest()}


def save_heads(directory: str | Path, method: str, settings: dict[str, Any],
               params: dict[str, Any], target: dict[str, str],
               training: dict[str, Any] | None = None) -> Path:
    """Write head params (host arrays) and their description; an existing checkpoint there is
    replaced. The JSON goes last and atomically, so an interrupted save never looks complete."""
    import orbax.checkpoint as ocp

    d = Path(directory).resolve()
    d.mkdir(parents=True, exist_ok=True)
    (d / CONFIG_FILE).unlink(missing_ok=True)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(d / PARAMS_DIR, jax.tree.map(np.asarray, params), force=True)
        ckptr.wait_until_finished()
    tmp = d / f".{CONFIG_FILE}.tmp"
    tmp.write_text(json.dumps({"method": method, "settings": settings, "target": target,
                               "training": training or {}}, indent=2) + "\n")
    os.replace(tmp, d / CONFIG_FILE)
    return d


def read_heads_config(directory: str | Path) -> dict[str, Any]:
    d = Path(directory)
    path = d / CONFIG_FILE
    if not path.is_file() or not (d / PARAMS_DIR).is_dir():
        raise ConfigError(f"speculative_model {d}: not a draft-head checkpoint (needs "
                          f"{CONFIG_FILE} and {PARAMS_DIR}/; write one with `jaxserve "
                          "train-draft --method medusa|eagle --out DIR`)")
    try:
        out = json.loads(path.read_text())
        _ = out["method"], out["settings"], out["target"]["config_sha256"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: invalid draft-head config ({e})") from None
    return out


def load_heads(directory: str | Path, method: str, target: dict[str, str]
               ) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(settings, host f32 params) of the `method` heads in `directory`, checked against the
    identity of the model they are to run on (ConfigError if they were trained for another)."""
    import orbax.checkpoint as ocp

    d = Path(directory).resolve()
    info = read_heads_config(d)
    if info["method"] != method:
        raise ConfigError(f"speculative_model {d} holds {info['method']} heads, not {method}")
    want = info["target"]
    for key, what in (("config_sha256", "architecture"), ("weights_sha256", "weights")):
        if want.get(key) != target[key]:
            raise ConfigError(
                f"speculative_model {d}: these {method} heads were trained for "
                f"{want.get('name') or 'another model'} ({key[:-7]} {want.get(key, '?')[:12]}), "
                f"but the target {target.get('name') or 'model'} differs in its {what} "
                f"({target[key][:12]}); train heads for it with `jaxserve train-draft`")
    try:
        with ocp.StandardCheckpointer() as ckptr:
            params = ckptr.restore(d / PARAMS_DIR)
    except Exception as e:  # orbax/tensorstore raise many unrelated types on damage
        raise CheckpointError(f"{d / PARAMS_DIR}: cannot restore Orbax checkpoint "
                              f"({type(e).__name__}: {e})") from e
    return info["settings"], jax.tree.map(np.asarray, params)


def head_proposer(method: str, settings: dict[str, Any], target: ModelConfig):
    """The proposer for `method` heads with `settings` on `target`, and fresh host f32 params
    of the shapes its checkpoint must hold (the init of training)."""
    if method == "medusa":
        n = int(settings.get("num_heads", 4))
        return MedusaProposer(target=target, num_heads=n), init_medusa(target, n)
    if method == "eagle":
        return EagleProposer(target=target), init_eagle(target, jax.random.key(0))
    raise ConfigError(f"{method!r} is not a draft-head method (medusa, eagle)")


def load_head_proposer(directory: str | Path, method: str, cfg: ModelConfig,
                       params: dict[str, Any], name: str = ""):
    """(proposer, host f32 head params) from a checkpoint, checked against the target (cfg,
    params: its weights) and against the shapes the method needs."""
    settings, got = load_heads(directory, method, target_identity(cfg, params, name))
    proposer, fresh = head_proposer(method, settings, cfg)
    want = jax.tree.map(np.shape, fresh)
    if jax.tree.structure(got) != jax.tree.structure(fresh) or \
            jax.tree.map(np.shape, got) != want:
        raise CheckpointError(f"{directory}: {method} head params do not have the shapes "
                              f"{want} its settings {settings} need")
    return proposer, got
