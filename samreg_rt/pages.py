"""The page size of numpy's large arrays while mask generation runs.

numpy asks Linux for transparent huge pages (``madvise(MADV_HUGEPAGE)``) for the data of every array of
4 MB or more. Mask generation allocates tens of MB of fresh arrays per prompt batch (the kept masks'
logits at 256x256, their copies upscaled to the working grid, the binary masks), and where the kernel
defragments on such faults (``/sys/kernel/mm/transparent_hugepage/defrag`` = ``madvise``, a common
default) a fault can wait for memory to be compacted and a 2 MB page to be zeroed. Measured on the ViT-B
reference preset in fresh processes (benchmarks/huge_pages.py, medians of 3 on a 2-core Xeon): the first
image's mask generation 4.75 s with small pages against 5.42 s with huge ones, the second image's 4.41
against 4.29 s, the pair 17.93 against 18.30 s. ``small_pages`` turns numpy's request off for a block and restores it after,
unless the environment sets ``NUMPY_MADVISE_HUGEPAGE`` (numpy's own switch: the user's choice then holds).
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

from numpy._core import multiarray


@contextmanager
def small_pages() -> Iterator[None]:
    """Within the block numpy allocates without asking for huge pages (a process-wide setting); the
    previous setting is restored on exit. Does nothing where the environment sets
    ``NUMPY_MADVISE_HUGEPAGE`` or where numpy lacks the setting. Blocks running at once in several
    threads share the setting: the first to exit restores it for all, which changes speed only, never
    results."""
    setting = getattr(multiarray, "_set_madvise_hugepage", None)     # (numpy 1.20 to 2.4 at least)
    if setting is None or "NUMPY_MADVISE_HUGEPAGE" in os.environ:
        yield
        return
    previous = setting(False)
    try:
        yield
    finally:
        setting(previous)
