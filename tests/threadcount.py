"""Counting the threads a call starts (Linux: /proc/self/task)."""
from __future__ import annotations

import os
import threading
from collections.abc import Callable


def most_threads_during(call: Callable[[], object]) -> int:
    """The most threads alive at once, among those started after the call began, while call() ran three times
    in a helper thread (which counts: 1 means the call started none). Threads are told apart by their ids, so
    threads that end meanwhile (a sanitizer's, an earlier call's being reaped) do not offset new ones."""
    before = set(os.listdir("/proc/self/task"))
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
        most = max(most, len(set(os.listdir("/proc/self/task")) - before))
    helper.join()
    return most
