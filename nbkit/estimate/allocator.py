"""A model of PyTorch's CUDA caching allocator, to turn a list of allocations into reserved memory.

``nvidia-smi`` (and an out-of-memory error) sees what the caching allocator has reserved from the
driver, not the bytes of live tensors. The rules modelled here are those of
``c10/cuda/CUDACachingAllocator.cpp`` with the default configuration and one stream:

- requests are rounded up to 512 bytes;
- requests up to 1 MiB come from the small pool, carved from 2 MiB segments; larger ones from the
  large pool: a request under 10 MiB opens a 20 MiB segment, a bigger one a segment of its size
  rounded up to 2 MiB;
- a request takes the smallest cached free block of its pool that is large enough (best fit) and
  splits it when the rest is big enough (small pool: >= 512 bytes, large pool: > 1 MiB);
- a freed block merges with free neighbours of its segment and stays cached: segments are never
  returned to the driver (no ``empty_cache``), so reserved memory only grows.

The last rule makes the result an upper bound on what the run needs: near the memory limit the real
allocator frees its unused cached segments and retries before it reports out-of-memory.
"""

from __future__ import annotations

from bisect import bisect_left, insort

KB512 = 512
SMALL = 1 << 20  # 1 MiB: largest small request
SMALL_SEGMENT = 2 << 20
LARGE_SEGMENT = 20 << 20
MIN_LARGE_ALLOC = 10 << 20
ROUND_LARGE = 2 << 20


def round_size(nbytes: int) -> int:
    return max(KB512, -(-nbytes // KB512) * KB512)


def segment_size(size: int) -> int:
    if size <= SMALL:
        return SMALL_SEGMENT
    if size < MIN_LARGE_ALLOC:
        return LARGE_SEGMENT
    return -(-size // ROUND_LARGE) * ROUND_LARGE


class CachingAllocator:
    """Reserved and allocated bytes over a sequence of ``malloc``/``free`` calls, by category."""

    def __init__(self) -> None:
        self.free_blocks: dict[bool, list[tuple[int, int]]] = {True: [], False: []}  # small? -> [(size, addr)]
        self.blocks: dict[int, tuple[int, bool, bool]] = {}  # addr -> (size, small, allocated)
        self.ends: dict[int, int] = {}  # end address -> start address, for merging with the previous block
        self.next_address = 0
        self.reserved = self.allocated = 0
        self.peak_reserved = self.peak_allocated = 0
        self.by_category: dict[str, int] = {}
        self.at_peak: dict[str, int] = {}  # allocated bytes per category at the allocated peak
        self.categories: dict[int, str] = {}

    def malloc(self, nbytes: int, category: str) -> int | None:
        if nbytes <= 0:
            return None
        size = round_size(nbytes)
        small = size <= SMALL
        pool = self.free_blocks[small]
        i = bisect_left(pool, (size, -1))
        if i == len(pool):
            block_size = segment_size(size)
            addr = self.next_address
            self.next_address += block_size + KB512  # a gap: blocks of two segments never merge
            self.reserved += block_size
        else:
            block_size, addr = pool.pop(i)
            self._unlink(addr, block_size)
        rest = block_size - size
        if (rest >= KB512) if small else (rest > SMALL):
            self._add_free(addr + size, rest, small)
            block_size = size
        self._link(addr, block_size, small, True)
        self.allocated += block_size
        self.categories[addr] = category
        self.by_category[category] = self.by_category.get(category, 0) + block_size
        if self.allocated > self.peak_allocated:
            self.peak_allocated = self.allocated
            self.at_peak = dict(self.by_category)
        self.peak_reserved = max(self.peak_reserved, self.reserved)
        return addr

    def free(self, addr: int | None) -> None:
        if addr is None:
            return
        size, small, _ = self.blocks[addr]
        category = self.categories.pop(addr)
        self.by_category[category] -= size
        self.allocated -= size
        self._unlink(addr, size)
        after = self.blocks.get(addr + size)
        if after is not None and not after[2]:
            self._remove_free(addr + size, after[0], small)
            size += after[0]
        start = self.ends.get(addr)
        if start is not None and not self.blocks[start][2]:
            before = self.blocks[start][0]
            self._remove_free(start, before, small)
            addr, size = start, size + before
        self._add_free(addr, size, small)

    # -- block bookkeeping
    def _link(self, addr: int, size: int, small: bool, allocated: bool) -> None:
        self.blocks[addr] = (size, small, allocated)
        self.ends[addr + size] = addr

    def _unlink(self, addr: int, size: int) -> None:
        del self.blocks[addr]
        del self.ends[addr + size]

    def _add_free(self, addr: int, size: int, small: bool) -> None:
        self._link(addr, size, small, False)
        insort(self.free_blocks[small], (size, addr))

    def _remove_free(self, addr: int, size: int, small: bool) -> None:
        pool = self.free_blocks[small]
        del pool[bisect_left(pool, (size, addr))]
        self._unlink(addr, size)
