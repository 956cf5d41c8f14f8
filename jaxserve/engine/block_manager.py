"""Logical KV pages: which page ids each sequence holds, and the prefix cache. Pure Python (no
jax), so it is tested in microseconds; the physical pages are the device arrays in
`model.attention.KVCache`.

Prefix caching (vLLM's automatic prefix caching, nano-vllm's block manager): once a page is full
of computed K/V, it is registered under the hash of (its parent page's hash, its token ids), so
the hash names the whole prefix up to the page's end. A new sequence looks its full pages up in
that order and shares the longest run found (reference counts), starting its prefill after them.
A page whose count drops to zero keeps its contents and stays findable; such cache-only pages
count as free and are evicted least recently released first when a fresh page is needed. A
sequence frees its pages last-to-first, so a shared root outlives the leaves that hang off it.

Hashes are SHA-256, not Python's `hash`: requests from different users share pages, and a
crafted collision must not hand one user another user's K/V.
"""

from __future__ import annotations

import collections
import hashlib
from array import array
from collections.abc import Sequence

from jaxserve.errors import JaxserveError


class OutOfPagesError(JaxserveError, RuntimeError):
    """The pool has fewer free pages than asked for (callers check `can_allocate` first)."""


def hash_page(parent: bytes | None, token_ids: Sequence[int]) -> bytes:
    """The cache key of a full page: it names every token from position 0 to the page's end."""
    h = hashlib.sha256(parent or b"")
    h.update(array("q", token_ids).tobytes())
    return h.digest()


class BlockManager:
    """Page allocator with a prefix cache. Page 0 is reserved as the write target of padding
    tokens and never handed out, so a sequence can never read what padding wrote.

    A page is in exactly one of three states: free (`_free`, contents meaningless), cached only
    (`_evictable`: count 0, registered, contents valid), or held (count >= 1)."""

    def __init__(self, num_pages: int, page_size: int, enable_prefix_caching: bool = True):
        if num_pages < 2:
            raise ValueError(f"num_pages must be >= 2 (page 0 is reserved), got {num_pages}")
        self.num_pages = num_pages
        self.page_size = page_size
        self.enable_prefix_caching = enable_prefix_caching
        self._free: collections.deque[int] = collections.deque(range(1, num_pages))
        # Cache-only pages, least recently released first.
        self._evictable: collections.OrderedDict[int, None] = collections.OrderedDict()
        self._ref_count = [0] * num_pages
        self._page_hash: dict[int, bytes] = {}  # registered page -> its hash
        self._cached: dict[bytes, int] = {}  # hash -> registered page
        self.num_queried_tokens = 0  # prompt tokens looked up in the cache
        self.num_hit_tokens = 0  # of those, tokens found (their prefill was skipped)

    # -- capacity ---------------------------------------------------------------------------

    @property
    def num_free_pages(self) -> int:
        """Pages a sequence could be given now: free ones and cache-only ones (evictable)."""
        return len(self._free) + len(self._evictable)

    @property
    def num_usable_pages(self) -> int:
        return self.num_pages - 1

    @property
    def num_held_pages(self) -> int:
        """Pages with a reference count above zero (0 when no sequence is alive)."""
        return sum(1 for c in self._ref_count if c > 0)

    @property
    def num_cached_pages(self) -> int:
        """Registered pages, held or cache-only."""
        return len(self._cached)

    def cached_page_ids(self) -> list[int]:
        return sorted(self._page_hash)

    def pages_needed(self, block_table: list[int], num_tokens: int) -> int:
        """Extra pages a sequence holding `block_table` needs to store `num_tokens` tokens."""
        return max(0, -(-num_tokens // self.page_size) - len(block_table))

    def can_allocate(self, block_table: list[int], num_tokens: int,
                     reuse: Sequence[int] = ()) -> bool:
        """Whether `allocate(block_table, num_tokens, reuse)` would succeed."""
        needed = self.pages_needed(list(block_table) + list(reuse), num_tokens)
        # A reused cache-only page leaves the free count; a reused held page does not.
        needed += sum(1 for p in reuse if self._ref_count[p] == 0)
        return needed <= self.num_free_pages

    # -- allocation -------------------------------------------------------------------------

    def allocate(self, block_table: list[int], num_tokens: int, reuse: Sequence[int] = ()) -> None:
        """Grow block_table in place so it covers num_tokens tokens: first the cached pages
        `reuse` (from `match_prefix`, shared), then fresh pages."""
        if not self.can_allocate(block_table, num_tokens, reuse):
            n = self.pages_needed(list(block_table) + list(reuse), num_tokens)
            raise OutOfPagesError(f"need {n} pages, {self.num_free_pages} free")
        for p in reuse:
            if self._ref_count[p] == 0:
                del self._evictable[p]
            self._ref_count[p] += 1
            block_table.append(p)
        for _ in range(self.pages_needed(block_table, num_tokens)):
            p = self._take_page()
            self._ref_count[p] = 1
            block_table.append(p)

    def _take_page(self) -> int:
        if self._free:
            return self._free.popleft()
        p, _ = self._evictable.popitem(last=False)  # least recently released
        del self._cached[self._page_hash.pop(p)]
        return p

    def free(self, block_table: list[int]) -> None:
        """Drop this table's reference to each of its pages and empty it. Last page first, so
        the prefix's root pages are the last to be evicted."""
        for p in reversed(block_table):
            self._ref_count[p] -= 1
            assert self._ref_count[p] >= 0, f"page {p} freed twice"
            if self._ref_count[p] == 0:
                if p in self._page_hash:
                    self._evictable[p] = None
                else:
                    self._free.append(p)
        block_table.clear()

    def truncate(self, block_table: list[int], num_tokens: int) -> None:
        """Give back the pages of block_table past those `num_tokens` tokens need (lookahead
        reserved for tokens a step did not commit). Such pages were never registered: only
        pages full of committed tokens are."""
        keep = -(-num_tokens // self.page_size)
        if len(block_table) > keep:
            tail = block_table[keep:]
            del block_table[keep:]
            self.free(tail)

    # -- prefix cache -----------------------------------------------------------------------

    def match_prefix(self, block_hashes: Sequence[bytes]) -> list[int]:
        """Pages holding the longest cached run of `block_hashes` (a sequence's full pages, in
        order). Changes nothing; pass the result to `allocate` as `reuse`."""
        pages = []
        if self.enable_prefix_caching:
            for h in block_hashes:
                p = self._cached.get(h)
                if p is None:
                    break
                pages.append(p)
        return pages

    def record_query(self, num_tokens: int, num_hit_tokens: int) -> None:
        self.num_queried_tokens += num_tokens
        self.num_hit_tokens += num_hit_tokens

    def register(self, page: int, block_hash: bytes) -> None:
        """Offer a held page whose tokens are all computed to the cache under `block_hash`. If
        another page already holds the same prefix, this one stays private (freed normally)."""
        if not self.enable_prefix_caching or page in self._page_hash:
            return
        if block_hash not in self._cached:
            self._cached[block_hash] = page
            self._page_hash[page] = block_hash

    def reset_prefix_cache(self) -> None:
        """Forget every registered page (their contents may no longer match, e.g. after the KV
        arrays were overwritten). Held pages stay held; cache-only pages become free."""
        self._free.extend(self._evictable)
        self._evictable.clear()
        self._cached.clear()
        self._page_hash.clear()

    def stats(self) -> dict[str, float]:
        q, h = self.num_queried_tokens, self.num_hit_tokens
        return {
            # In tokens, as vLLM counts them: prompt tokens looked up / found.
            "prefix_cache_queries": q,
            "prefix_cache_hits": h,
            "prefix_cache_hit_rate": h / q if q else 0.0,
            "prefix_cache_pages": len(self._cached),
            "free_pages": self.num_free_pages,
            "total_pages": self.num_usable_pages,
        }
