"""benchmarks/ablation.py on the real model, small: every row runs the same burst, rows with the
same weights give the same greedy tokens, and only the prefix-caching rows reuse the system
prompt's pages."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


@pytest.mark.slow
def test_small_run_rows_agree_and_prefix_cache_only_where_enabled(tmp_path, real_gguf_path):
    import ablation

    out = ablation.main(["--requests", "4", "--rounds", "1", "--max_num_seqs", "4",
                         "--model", str(real_gguf_path), "--out", str(tmp_path / "a.json")])
    data = json.loads(Path(out).read_text())
    assert data["greedy_equal"]["0"] == {"rows 1-3": True, "rows 4-5": True}
    rows = {r["row"]: r for r in data["summary"]}
    assert list(rows) == [name for name, _ in ablation.ROWS]
    tokens = {r["tokens"] for r in rows.values()}
    assert len(tokens) == 1  # ignore_eos: every row generated the same number of tokens
    names = list(rows)
    assert rows[names[0]]["cached_prompt_tokens"] == rows[names[1]]["cached_prompt_tokens"] == 0
    # The system prompt (~300 tokens) is cached after the warm-up; the user turns are new.
    for name in names[2:]:
        assert 0.5 < rows[name]["cached_prompt_tokens"] / rows[name]["prompt_tokens"] < 1
    assert all(r["requests_per_s"] > 0 and r["e2e_p99_s"] >= r["e2e_p50_s"] > 0
               for r in rows.values())
