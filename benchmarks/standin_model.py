"""A stand-in for a model whose weights cannot travel: its config and tokenizer, random weights.

    python benchmarks/standin_model.py skeleton [SRC] DIR     # here: config + tokenizer (~2 MB)
    python benchmarks/standin_model.py build DIR OUT [--dtype bfloat16] [--tiny]

Why: a device machine is reached with at most 64 MiB of files and nothing else, and the default
model's GGUF is 98 MB. Speed does not depend on the weights' values, only on their shapes and
dtype: `build` writes an Orbax checkpoint (jaxserve's own format, loaded by `LLM(OUT)`) with
the source model's exact ModelConfig and tokenizer and random weights from
`jaxserve.model.params.init_params`, so a bf16 decode or serving benchmark moves the same bytes
and does the same FLOPs as with the real weights (the default model in bf16 is its Q4_1 blocks
dequantised to plain bf16 arrays). Generated text is meaningless; the benchmarks use random
prompts and ignore_eos. `--tiny` keeps the vocabulary and shrinks everything else (2 layers,
width 64) for a CPU dry run of the same code paths.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's jaxserve

STANDIN_FILE = "standin.json"


def skeleton(src: str | None, directory: Path) -> Path:
    """Write the model's config (model_config.json) and tokenizer files to `directory`."""
    from jaxserve.llm import _resolve_model
    from jaxserve.loading import peek_config
    from jaxserve.loading.common import config_to_dict
    from jaxserve.loading.orbax_ckpt import CONFIG_FILE
    from jaxserve.tokenizer import load_tokenizer

    path, _ = _resolve_model(src)
    cfg = peek_config(path)
    directory.mkdir(parents=True, exist_ok=True)
    load_tokenizer(path).save(directory)
    (directory / CONFIG_FILE).write_text(json.dumps(config_to_dict(cfg), indent=2) + "\n")
    (directory / STANDIN_FILE).write_text(json.dumps(
        {"source": str(src or "default"), "source_file": path.name}, indent=2) + "\n")
    return directory


def build(directory: Path, out: Path, dtype: str, tiny: bool, seed: int = 0) -> Path:
    """An Orbax checkpoint at `out`: the skeleton's config (shrunk with tiny) and tokenizer,
    random weights in `dtype`."""
    import jax
    import numpy as np

    from jaxserve.loading.common import config_from_dict, resolve_dtype
    from jaxserve.loading.orbax_ckpt import CONFIG_FILE, save_orbax
    from jaxserve.model.params import init_params
    from jaxserve.tokenizer import Tokenizer

    cfg = config_from_dict(json.loads((directory / CONFIG_FILE).read_text()))
    if tiny:
        cfg = dataclasses.replace(cfg, hidden_size=64, intermediate_size=128, num_layers=2,
                                  num_heads=4, num_kv_heads=2, head_dim=16)
    params = jax.tree.map(np.asarray,
                          init_params(cfg, jax.random.key(seed), resolve_dtype(dtype)))
    save_orbax(out, cfg, params, Tokenizer.from_dir(directory))
    meta = json.loads((directory / STANDIN_FILE).read_text())
    meta |= {"weights": f"random ({dtype}, jaxserve.model.params.init_params seed {seed})",
             "tiny": tiny, "num_params": cfg.num_params()}
    (out / STANDIN_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    sk = sub.add_parser("skeleton", help="config + tokenizer of a model (default: the default)")
    sk.add_argument("args", nargs="+", metavar="[SRC] DIR")
    b = sub.add_parser("build", help="random-weight Orbax checkpoint from a skeleton")
    b.add_argument("dir")
    b.add_argument("out")
    b.add_argument("--dtype", default="bfloat16")
    b.add_argument("--tiny", action="store_true", help="2 layers, width 64 (CPU dry runs)")
    a = ap.parse_args(argv)
    if a.cmd == "skeleton":
        if len(a.args) > 2:
            ap.error("skeleton takes [SRC] DIR")
        src = a.args[0] if len(a.args) == 2 else None
        print(f"wrote {skeleton(src, Path(a.args[-1]))}")
    else:
        print(f"wrote {build(Path(a.dir), Path(a.out), a.dtype, a.tiny)}")


if __name__ == "__main__":
    main()
