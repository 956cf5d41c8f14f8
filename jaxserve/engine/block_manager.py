"""Logical KV pages: which page ids each sequence holds. Pure Python (no jax), so it is tested in
microseconds; the physical pages are the device arrays in `model.attention.KVCache`."""

from __future__ import annotations

from collections import deque

from jaxserve.errors import JaxserveError


class OutOfPagesError(JaxserveError, RuntimeError):
    """The pool has fewer free pages than asked for (callers check `can_allocate` first)."""


class BlockManager:
    """Page allocator. Page 0 is reserved as the write target of padding tokens and never handed
    out, so a sequence can never read what padding wrote."""

    def __init__(self, num_pages: int, page_size: int):
        if num_pages < 2:
            raise ValueError(f"num_pages must be >= 2 (page 0 is reserved), got {num_pages}")
        self.num_pages = num_pages
        self.page_size = page_size
        self._free: deque[int] = deque(range(1, num_pages))

    @property
    def num_free_pages(self) -> int:
        return len(self._free)

    @property
    def num_usable_pages(self) -> int:
        return self.num_pages - 1

    def pages_needed(self, block_table: list[int], num_tokens: int) -> int:
        """Extra pages a sequence holding `block_table` needs to store `num_tokens` tokens."""
        return max(0, -(-num_tokens // self.page_size) - len(block_table))

    def can_allocate(self, block_table: list[int], num_tokens: int) -> bool:
        return self.pages_needed(block_table, num_tokens) <= len(self._free)

    def allocate(self, block_table: list[int], num_tokens: int) -> None:
        """Grow block_table in place so it covers num_tokens tokens."""
        n = self.pages_needed(block_table, num_tokens)
        if n > len(self._free):
            raise OutOfPagesError(f"need {n} pages, {len(self._free)} free")
        block_table.extend(self._free.popleft() for _ in range(n))

    def free(self, block_table: list[int]) -> None:
        """Return every page of block_table to the pool and empty it."""
        self._free.extend(block_table)
        block_table.clear()
