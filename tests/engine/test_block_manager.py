"""The page allocator: pure host bookkeeping, no jax."""

import subprocess
import sys

import pytest

from jaxserve.engine.block_manager import BlockManager, OutOfPagesError, hash_page
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


# -- prefix cache -----------------------------------------------------------------------------


def page_hashes(tokens: list[int], page_size: int) -> list[bytes]:
    hashes: list[bytes] = []
    for i in range(len(tokens) // page_size):
        hashes.append(hash_page(hashes[-1] if hashes else None,
                                tokens[i * page_size : (i + 1) * page_size]))
    return hashes


def hold(bm: BlockManager, tokens: list[int]) -> list[int]:
    """Allocate a table for tokens (reusing the cache) and register its full pages, as the
    engine does once they are computed."""
    hashes = page_hashes(tokens, bm.page_size)
    table: list[int] = []
    bm.allocate(table, len(tokens), bm.match_prefix(hashes))
    for page, h in zip(table, hashes, strict=False):
        bm.register(page, h)
    return table


def assert_all_free(bm: BlockManager) -> None:
    assert bm.num_free_pages == bm.num_usable_pages and bm.num_held_pages == 0


def test_hash_names_the_whole_prefix_not_just_the_page():
    a = page_hashes([1, 2, 3, 4, 5, 6, 7, 8], 4)
    b = page_hashes([9, 2, 3, 4, 5, 6, 7, 8], 4)
    assert a[0] != b[0] and a[1] != b[1]  # same second page, other first page: other key
    assert page_hashes([1, 2, 3, 4, 5, 6, 7, 8], 4) == a
    assert hash_page(None, [1, 2]) != hash_page(None, [2, 1])


def test_shared_prefix_is_shared_and_counted():
    bm = BlockManager(num_pages=32, page_size=4)
    first = hold(bm, list(range(10)))  # pages: [0..3] [4..7] [8, 9]
    second = hold(bm, list(range(8)) + [50, 51, 52])
    assert second[:2] == first[:2] and second[2] != first[2]
    assert bm.num_held_pages == 4
    bm.free(first)
    assert bm.num_held_pages == 3  # the shared two are still held by `second`
    bm.free(second)
    assert_all_free(bm)
    assert bm.num_cached_pages == 2  # only full pages were registered


def test_a_different_page_in_the_middle_ends_the_match():
    bm = BlockManager(num_pages=32, page_size=4)
    bm.free(hold(bm, list(range(12))))
    assert len(bm.match_prefix(page_hashes(list(range(12)), 4))) == 3
    other = list(range(12))
    other[5] = 99
    assert len(bm.match_prefix(page_hashes(other, 4))) == 1


def test_cache_only_pages_count_as_free_and_are_evicted_oldest_first():
    bm = BlockManager(num_pages=7, page_size=4)  # 6 usable pages
    a, b = hold(bm, [1] * 8), hold(bm, [2] * 8)
    a_pages = list(a)
    bm.free(a)
    bm.free(b)
    assert_all_free(bm)
    assert bm.num_cached_pages == 4
    c = hold(bm, [3] * 12)  # the 2 free pages, then evicts a's leaf (a was released first)
    assert bm.match_prefix(page_hashes([1] * 8, 4)) == a_pages[:1]
    assert len(bm.match_prefix(page_hashes([2] * 8, 4))) == 2
    assert a_pages[1] in c
    bm.free(c)
    assert_all_free(bm)


def test_leaves_are_evicted_before_their_root():
    bm = BlockManager(num_pages=5, page_size=4)  # 4 usable
    t = hold(bm, list(range(12)))  # 3 full pages, all registered
    bm.free(t)
    table: list[int] = []
    bm.allocate(table, 4 + 4)  # 1 free page + evict one cached page: the last one of t
    assert len(bm.match_prefix(page_hashes(list(range(12)), 4))) == 2
    bm.free(table)


def test_reusing_a_cache_only_page_uses_up_free_capacity():
    bm = BlockManager(num_pages=5, page_size=4)  # 4 usable
    bm.free(hold(bm, list(range(8))))
    reuse = bm.match_prefix(page_hashes(list(range(8)), 4))
    assert len(reuse) == 2 and bm.num_free_pages == 4
    # Reusing the 2 cached pages and taking 2 fresh ones fills the pool; 3 fresh would not fit.
    assert bm.can_allocate([], 16, reuse) and not bm.can_allocate([], 20, reuse)
    table: list[int] = []
    bm.allocate(table, 16, reuse)
    assert table[:2] == reuse and bm.num_free_pages == 0
    bm.free(table)
    assert_all_free(bm)


def test_duplicate_prefix_stays_private():
    bm = BlockManager(num_pages=16, page_size=4)
    hashes = page_hashes(list(range(4)), 4)
    a: list[int] = []
    b: list[int] = []
    bm.allocate(a, 4)
    bm.allocate(b, 4)  # computed side by side before either was registered
    bm.register(a[0], hashes[0])
    bm.register(b[0], hashes[0])
    assert bm.match_prefix(hashes) == a[:1]
    bm.free(b)
    bm.free(a)
    assert bm.num_cached_pages == 1
    assert_all_free(bm)


def test_disabled_cache_never_matches_and_reset_forgets():
    off = BlockManager(num_pages=16, page_size=4, enable_prefix_caching=False)
    off.free(hold(off, list(range(8))))
    assert off.match_prefix(page_hashes(list(range(8)), 4)) == [] and off.num_cached_pages == 0
    on = BlockManager(num_pages=16, page_size=4)
    on.free(hold(on, list(range(8))))
    on.reset_prefix_cache()
    assert on.match_prefix(page_hashes(list(range(8)), 4)) == []
    assert_all_free(on)
