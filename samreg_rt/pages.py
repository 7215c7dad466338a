"""The page size of numpy's large arrays while mask generation runs.

numpy asks Linux for transparent huge pages (``madvise(MADV_HUGEPAGE)``) for the data of every array of
4 MB or more. Mask generation allocates tens of MB of fresh arrays per prompt batch (the kept masks'
logits at 256x256, their copies upscaled to the working grid, the binary masks), and where the kernel
defragments on such faults (``/sys/kernel/mm/transparent_hugepage/defrag`` = ``madvise``, a common
default) a fault can wait for memory to be compacted and a 2 MB page to be zeroed. Measured on the ViT-B
reference preset, in the process's first image and in each later one: benchmarks/results/pipeline.md
("numpy huge pages" row). ``small_pages`` turns numpy's request off for a block and restores it after,
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
    ``NUMPY_MADVISE_HUGEPAGE``. Blocks running at once in several threads share the setting: the first
    to exit restores it for all, which changes speed only, never results."""
    if "NUMPY_MADVISE_HUGEPAGE" in os.environ:
        yield
        return
    previous = multiarray._set_madvise_hugepage(False)
    try:
        yield
    finally:
        multiarray._set_madvise_hugepage(previous)
