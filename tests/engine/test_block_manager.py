"""The page allocator: pure host bookkeeping, no jax."""

import subprocess
import sys

import pytest

from jaxserve.engine.block_manager import BlockManager, OutOfPagesError
from jaxserve.errors import JaxserveError


def test_importing_the_block_manager_does_not_import_jax():
    code = "import sys, jaxserve.engine.block_manager; assert 'jax' not in sys.modules, 'jax'"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize(
    ("held", "num_tokens", "expected"),
    [
        (0, 0, 0),
        (0, 1, 1),
        (0, 15, 1),
        (0, 16, 1),
        (0, 17, 2),
        (0, 32, 2),
        (0, 33, 3),
        (1, 16, 0),
        (1, 17, 1),
        (2, 17, 0),
        (3, 17, 0),
        (2, 48, 1),
        (2, 49, 2),
    ],
)
def test_pages_needed_at_page_boundaries(held, num_tokens, expected):
    bm = BlockManager(num_pages=64, page_size=16)
    assert bm.pages_needed(list(range(1, held + 1)), num_tokens) == expected


def test_page_zero_is_reserved_and_never_handed_out():
    bm = BlockManager(num_pages=9, page_size=4)
    assert bm.num_usable_pages == 8 and bm.num_free_pages == 8
    table: list[int] = []
    bm.allocate(table, 8 * 4)
    assert sorted(table) == list(range(1, 9))
    assert bm.num_free_pages == 0
    assert not bm.can_allocate([], 1)
    assert bm.can_allocate(table, 8 * 4)  # already covered: needs nothing more


def test_growing_a_table_adds_only_the_missing_pages():
    bm = BlockManager(num_pages=16, page_size=4)
    table: list[int] = []
    bm.allocate(table, 5)
    first = list(table)
    assert len(first) == 2
    bm.allocate(table, 8)  # still fits in two pages
    assert table == first
    bm.allocate(table, 9)
    assert table[:2] == first and len(table) == 3
    assert bm.num_free_pages == 15 - 3


def test_tables_never_share_pages_and_free_returns_every_page():
    bm = BlockManager(num_pages=33, page_size=8)
    tables = [[] for _ in range(5)]
    for step in range(1, 7):  # interleaved growth, like decode steps of 5 sequences
        for i, t in enumerate(tables):
            bm.allocate(t, step * (i + 1))
    held = [p for t in tables for p in t]
    assert len(held) == len(set(held)), "a page is held by two sequences"
    assert 0 not in held
    assert bm.num_free_pages + len(held) == bm.num_usable_pages
    bm.free(tables[2])
    assert tables[2] == []
    again: list[int] = []
    bm.allocate(again, bm.num_free_pages * 8)
    held = [p for t in tables for p in t] + again
    assert len(held) == len(set(held)) == bm.num_usable_pages
    for t in tables + [again]:
        bm.free(t)
    assert bm.num_free_pages == bm.num_usable_pages
    assert all(t == [] for t in tables + [again])


def test_out_of_pages_is_typed_and_leaves_the_pool_unchanged():
    bm = BlockManager(num_pages=4, page_size=16)
    table = [99]  # pages the caller already holds are kept untouched on failure
    with pytest.raises(OutOfPagesError, match=r"need 4 pages, 3 free") as info:
        bm.allocate(table, 5 * 16)
    assert isinstance(info.value, JaxserveError) and isinstance(info.value, RuntimeError)
    assert table == [99]
    assert bm.num_free_pages == 3
    assert not bm.can_allocate([], 4 * 16) and bm.can_allocate([], 3 * 16)


def test_pool_needs_a_page_besides_the_reserved_one():
    with pytest.raises(ValueError, match="num_pages"):
        BlockManager(num_pages=1, page_size=16)
