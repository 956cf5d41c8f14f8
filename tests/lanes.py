"""Test lanes: which parametrized cases the fast lane (`pytest -m "not slow"`) runs.

Model and kernel equivalence tests compile their own programs per case (a few seconds each on
this CPU), so running every case would put the fast lane far past its 3-minute budget. Each such
test keeps its first case in the fast lane and marks the others slow; the full suite (CI, the
README's test command) runs them all. Order the cases so the first is the most telling one.
"""

from __future__ import annotations

import pytest

ParameterSet = type(pytest.param())  # what pytest.param returns (its class is private)


def fast_first(cases, keep: int = 1) -> list:
    """`cases` for `pytest.mark.parametrize`, all but the first `keep` marked slow. A case may
    be a plain value, a tuple of values (several argnames) or a `pytest.param`."""
    out = []
    for i, case in enumerate(cases):
        if isinstance(case, ParameterSet):
            values, marks, id_ = case.values, tuple(case.marks), case.id
        else:
            values, marks, id_ = (case if isinstance(case, tuple) else (case,)), (), None
        if i >= keep:
            marks += (pytest.mark.slow,)
        out.append(pytest.param(*values, marks=marks, id=id_))
    return out
