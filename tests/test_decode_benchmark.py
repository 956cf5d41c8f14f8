"""benchmarks/decode.py's multi-step summary on hand-computable rounds."""

from __future__ import annotations

import pytest

from benchmarks.decode import summarize_decode_steps


def test_summary_of_decode_steps_by_hand():
    # Weights 1000 B, 10 B of K/V per token, batch 2 at context 100: 3000 B per iteration.
    rows = [
        {"batch": 2, "num_decode_steps": 1, "wall_s": 1.0, "program_s": 0.8, "steps": 10,
         "tokens": 20, "mean_context": 100.0},
        {"batch": 2, "num_decode_steps": 4, "wall_s": 0.5, "program_s": 0.45, "steps": 3,
         "tokens": 24, "mean_context": 100.0},
    ]
    slower = [dict(r, wall_s=2 * r["wall_s"], program_s=2 * r["program_s"]) for r in rows]
    out = summarize_decode_steps([{"rows": rows}, {"rows": slower}, {"rows": rows}],
                                 wbytes=1000, kv_per_tok=10, bw=1e-4)
    one, four = out
    assert (one["batch"], one["num_decode_steps"], one["rounds"]) == (2, 1, 3)
    assert one["tok_s"] == pytest.approx(20.0)  # median of 20, 10, 20
    assert one["host_us_per_token"] == pytest.approx(0.2 / 20 * 1e6)
    assert one["host_pct"] == pytest.approx(20.0)
    assert one["pct_of_roofline"] == pytest.approx(100 * 10 * 3000 / 1.0 / 1e5)
    assert one["roofline_tok_s"] == pytest.approx(2 * 1e5 / 3000)
    assert four["tok_s"] == pytest.approx(48.0)
    # Per-round ratios are 2.4 in every round, the slow one included.
    assert four["speedup_vs_N1"] == pytest.approx(2.4)
    assert four["host_us_per_token"] == pytest.approx(0.05 / 24 * 1e6)
    assert four["program_ms_per_step"] == pytest.approx(150.0)
    assert four["pct_of_roofline"] == pytest.approx(100 * 12 * 3000 / 0.5 / 1e5)
    assert four["program_pct_of_roofline"] == pytest.approx(100 * 12 * 3000 / 0.45 / 1e5)
