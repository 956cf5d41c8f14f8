"""benchmarks/speculative.py --quick on the real model: it runs, writes its JSON, and its greedy
cells report speculative output equal to plain decoding's."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


@pytest.mark.slow
def test_quick_run_writes_results_and_greedy_outputs_match(tmp_path, real_gguf_path):
    import speculative

    out = speculative.main(["--quick", "--model", str(real_gguf_path),
                            "--out", str(tmp_path / "spec.json")])
    data = json.loads(Path(out).read_text())
    assert data["machine"]["backend"] == "cpu"
    rows = {(r["task"], r["method"]): r for r in data["summary"]}
    assert set(rows) == {(t, m) for t in ("grounded", "chat") for m in ("off", "ngram")}
    for (task, method), r in rows.items():
        assert r["greedy_equal"] == 2, (task, method)  # both requests, token for token
        assert r["programs_per_step"] == 1.0
        if method == "ngram":
            assert "speedup" in r and r["tok_s"] > 0
