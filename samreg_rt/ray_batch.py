"""Batch registration on Ray: the pairs of a list spread over actors that each hold one engine.

Same output layout and resume guarantee as ``batch.register_many``: each pair goes to
``OUT/<id>/`` through ``batch.register_one`` (every file written atomically, run.json last) under
``batch.pair_lock``, and pairs already complete are skipped, both before dispatch and again by
the worker that receives one (so a pair whose worker died after writing run.json is not written
a second time). A worker
that dies (killed, out of memory, node lost) is restarted by Ray and its pair is sent again.
The driver appends what happened to ``OUT/ray_batch.jsonl`` (workers and their pids, one line
per pair done, worker losses).

On a multi-node cluster every node must see the pairs list's images and OUT at the same paths
(a shared file system) and have samreg-rt installed with the model exported (or exportable).
"""
from __future__ import annotations

import json
import os
import time
from collections import Counter, deque
from pathlib import Path

from tqdm import tqdm

from .batch import is_done, pair_lock, register_one, remove_stale_temporaries
from .engine import Engine
from .errors import OutputError, SamregError

JOURNAL = "ray_batch.jsonl"


def connect(address: str | None = None, num_cpus: int | None = None, object_store_mb: int = 200) -> bool:
    """Join the Ray cluster at ``address``, or start a local Ray instance when it is None.

    A local instance gets ``num_cpus`` (default: this machine's cores), a small object store
    (only file paths and small summaries travel through it) and no dashboard. Returns True when
    this call started or joined Ray (the caller then calls ``ray.shutdown()``), False when Ray
    was already initialised in this process.
    """
    import ray

    if ray.is_initialized():
        return False
    if address:
        ray.init(address=address)
    else:
        ray.init(num_cpus=num_cpus or os.cpu_count(), object_store_memory=object_store_mb * 2**20,
                 include_dashboard=False)
    return True


class RegistrationWorker:
    """A Ray actor body: one loaded engine, registering the pairs it is sent."""

    def __init__(self, model: str, providers: str, threads: int | None, precision: str):
        import ray

        self.engine = Engine.load(model, providers=providers, threads=threads, precision=precision)
        self.where = {"pid": os.getpid(), "node": ray.util.get_node_ip_address(), "provider": self.engine.provider}

    def info(self) -> dict:
        """Where this worker runs: pid, node address, execution provider."""
        return self.where

    def register(self, pair_id: str, fixed: str, moving: str, target: str, options: dict) -> dict:
        """Register one pair into ``target`` as ``batch.register_many`` does: under
        ``pair_lock``, skipped when complete, stale temporaries removed, no folder left behind
        for a pair that failed."""
        out = Path(target)
        try:
            if out.is_symlink():
                raise OutputError(f"{out}: pair output folder is a symbolic link; outputs stay inside {out.parent}")
            with pair_lock(out) as created:
                if is_done(out):
                    return {"status": "found_done", **self.where}
                remove_stale_temporaries(out)
                try:
                    record = register_one(fixed, moving, self.engine, out, **options)
                except SamregError:
                    if created and not any(out.iterdir()):
                        out.rmdir()
                    raise
        except SamregError as exc:
            return {"status": "error", "message": str(exc), **self.where}
        return {"status": "done", "pairs": record["counts"]["pairs"], "register_s": record["register_s"],
                "rois": [record["counts"]["fixed"]["rois"], record["counts"]["moving"]["rois"]], **self.where}


class _Journal:
    """Append-only JSON-lines log of a Ray batch, one flushed line per event."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.handle = open(path, "a")

    def write(self, event: str, **fields) -> None:
        self.handle.write(json.dumps({"t": round(time.time(), 3), "event": event, **fields}) + "\n")
        self.handle.flush()

    def close(self) -> None:
        self.handle.close()


def _actor_resources(threads: int) -> tuple[int, dict]:
    """How many actors the cluster holds and what each asks for: one GPU each where the cluster
    has GPUs, otherwise ``threads`` CPUs each."""
    import ray

    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    if gpus:
        return gpus, {"num_gpus": 1, "num_cpus": 1}
    return max(1, int(resources.get("CPU", 1)) // threads), {"num_cpus": threads}


def register_many_ray(jobs: list[tuple[str, str, str]], model: str, out_dir: str | os.PathLike, *,
                      workers: int | None = None, threads: int = 1, providers: str = "auto",
                      precision: str = "fp32", preset: str = "default", fit_ddf: bool = False,
                      prompts: list[tuple[float, ...]] | None = None, max_restarts: int = 3,
                      max_attempts: int = 3, progress: bool = True, **overrides) -> dict:
    """Register (id, fixed, moving) jobs on the Ray cluster this process is connected to.

    ``workers`` actors (default: one per GPU, else one per ``threads`` CPUs of the cluster, at
    most one per pair) each load ``model`` once. A pair whose worker dies is sent again (at most
    ``max_attempts`` times); a worker is restarted up to ``max_restarts`` times. Returns a summary
    like ``batch.register_many``'s plus ``workers`` and ``worker_losses``.
    """
    import ray
    from ray.exceptions import RayActorError

    root = Path(out_dir).resolve()
    summary: dict = {"out": str(root), "done": [], "skipped": [], "errors": {}, "workers": [], "worker_losses": 0}
    todo = deque()
    for pair_id, fixed, moving in jobs:
        if not pair_id:
            raise SamregError("register --ray: every job needs an id (use --pairs LIST.csv)")
        if is_done(root / pair_id):
            summary["skipped"].append(pair_id)
        else:
            todo.append((pair_id, fixed, moving))
    if not todo:
        summary["failed"] = 0
        return summary
    count, resources = _actor_resources(threads)
    count = min(workers or count, len(todo))
    options = {"preset": preset, "fit_ddf": fit_ddf, "prompts": prompts, **overrides}
    actor_class = ray.remote(RegistrationWorker).options(max_restarts=max_restarts, max_task_retries=0, **resources)
    actors = [actor_class.remote(model, providers, threads, precision) for _ in range(count)]
    journal = _Journal(root / JOURNAL)
    journal.write("start", pairs=len(todo), skipped=len(summary["skipped"]), workers=count, resources=resources)
    try:
        try:
            summary["workers"] = ray.get([a.info.remote() for a in actors])
        except RayActorError as exc:
            raise SamregError(f"Ray workers could not load model {model!r}: {exc}") from None
        for index, where in enumerate(summary["workers"]):
            journal.write("worker", actor=index, **where)
        _dispatch(actors, todo, root, options, summary, journal, max_attempts, progress)
    finally:
        for actor in actors:
            ray.kill(actor)
        journal.write("finish", done=len(summary["done"]), failed=len(summary["errors"]),
                      worker_losses=summary["worker_losses"])
        journal.close()
    summary["failed"] = len(summary["errors"])
    return summary


def _dispatch(actors: list, todo: deque, root: Path, options: dict, summary: dict, journal: _Journal,
              max_attempts: int, progress: bool) -> None:
    """Keep every live actor busy with one pair until no pair is left.

    When a worker is lost under a pair, the actor is probed: the probe waits while Ray restarts
    it, and, should the worker only have been unreachable, it runs after the pair's task (an actor
    runs one task at a time). Only once the probe has answered (or failed: Ray gave the actor up,
    ``max_restarts`` spent) does the pair go back to the queue, so no two workers ever write one
    pair at once; a pair found complete then is not written again.
    """
    import ray
    from ray.exceptions import RayActorError, RayTaskError

    idle = list(range(len(actors)))
    in_flight: dict = {}  # ref -> (actor index, job)
    probes: dict = {}  # ref -> (actor index, the job it lost)
    attempts: Counter[str] = Counter()
    bar = tqdm(total=len(todo), disable=not progress, desc="register (ray)", unit="pair")
    while todo or in_flight or probes:
        while todo and idle:
            index, job = idle.pop(), todo.popleft()
            ref = actors[index].register.remote(job[0], job[1], job[2], str(root / job[0]), options)
            in_flight[ref] = (index, job)
        if not in_flight and not probes:
            raise SamregError(f"every Ray worker is gone (restarts spent); {len(todo)} pairs not registered "
                              "(rerun to resume)")
        (ref,), _ = ray.wait(list(in_flight) + list(probes), num_returns=1)
        if ref in probes:
            index, (pair_id, fixed, moving) = probes.pop(ref)
            try:
                journal.write("worker", actor=index, after_loss=True, **ray.get(ref))
                idle.append(index)
            except RayActorError as exc:
                journal.write("worker_gone", actor=index, error=type(exc).__name__)
            if attempts[pair_id] < max_attempts:
                todo.appendleft((pair_id, fixed, moving))
            else:
                summary["errors"][pair_id] = f"its worker was lost {attempts[pair_id]} times"
                bar.update()
            continue
        index, (pair_id, fixed, moving) = in_flight.pop(ref)
        try:
            result = ray.get(ref)
        except RayActorError as exc:  # the worker died (or is unreachable) under this pair
            attempts[pair_id] += 1
            summary["worker_losses"] += 1
            journal.write("worker_lost", actor=index, id=pair_id, error=type(exc).__name__)
            probes[actors[index].info.options(max_task_retries=-1).remote()] = (index, (pair_id, fixed, moving))
            continue
        except RayTaskError as exc:  # an unexpected exception inside register_one: this pair only
            result = {"status": "error", "message": f"{type(exc.cause).__name__}: {exc.cause}"}
        idle.append(index)
        bar.update()
        if result["status"] == "error":
            summary["errors"][pair_id] = result["message"]
            journal.write("error", id=pair_id, actor=index, message=result["message"])
        elif result["status"] == "found_done":
            summary["skipped"].append(pair_id)
            journal.write("found_done", id=pair_id, actor=index, pid=result["pid"])
        else:
            summary["done"].append({"id": pair_id, "pairs": result["pairs"], "rois": result["rois"],
                                    "register_s": result["register_s"]})
            journal.write("done", id=pair_id, actor=index, pid=result["pid"], node=result["node"])
    bar.close()
