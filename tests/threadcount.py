"""Counting the threads a call starts (Linux: /proc/self/task)."""
from __future__ import annotations

import ctypes
import os
import threading
from collections.abc import Callable

PR_SET_NAME = 15  # prctl(2): name the calling thread (at most 15 bytes); threads it creates inherit the name


def _named(tid: str) -> str:
    try:
        with open(f"/proc/self/task/{tid}/comm") as f:
            return f.read().strip()
    except OSError:     # the thread ended meanwhile
        return ""


def most_threads_during(call: Callable[[], object]) -> int:
    """The most threads alive at once, among those the call started, while call() ran three times in a
    helper thread (which counts: 1 means the call started none).

    The helper names itself (prctl PR_SET_NAME) and Linux gives a new thread its creator's name, so the
    threads of the call (and of thread pools it creates) carry that name, while threads that other parts of
    the process start meanwhile (a server's, a cluster client's, a progress bar's monitor) do not and are left
    out, and so are threads alive before the call (a pool an earlier probe's call left running carries the name
    too). Threads are told apart by their ids, so threads that end meanwhile do not offset new ones."""
    tag = f"probe{os.getpid() % 10**9}"[:15]
    before = set(os.listdir("/proc/self/task"))
    done, watched = threading.Event(), threading.Event()
    failure: list[BaseException] = []

    def run():
        try:
            if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_NAME, tag.encode(), 0, 0, 0) != 0:
                raise OSError(ctypes.get_errno(), "prctl(PR_SET_NAME) failed")
            watched.wait()          # the poller has seen this thread: a fast call cannot end unseen
            for _ in range(3):
                call()
        except BaseException as e:  # re-raised in the caller
            failure.append(e)
        finally:
            done.set()

    helper = threading.Thread(target=run)
    helper.start()
    most = 0
    while not done.is_set():
        most = max(most, sum(_named(tid) == tag for tid in set(os.listdir("/proc/self/task")) - before))
        if most:
            watched.set()
    helper.join()
    if failure:
        raise failure[0]
    return most
