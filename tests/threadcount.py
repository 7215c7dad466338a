"""Counting the threads a call starts (Linux: /proc/self/task)."""
from __future__ import annotations

import os
import threading
from collections.abc import Callable


def most_threads_during(call: Callable[[], object]) -> int:
    """The most threads this process held, beyond those it held before, while call() ran in a helper
    thread (which counts: 1 means the call started none). call runs three times."""
    before = len(os.listdir("/proc/self/task"))
    done = threading.Event()

    def run():
        try:
            for _ in range(3):
                call()
        finally:
            done.set()

    helper = threading.Thread(target=run)
    helper.start()
    most = 0
    while not done.is_set():
        most = max(most, len(os.listdir("/proc/self/task")))
    helper.join()
    return most - before
