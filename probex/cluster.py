"""Independent jobs run here, one after another, or as tasks on a Ray cluster, with the same results either way.

`map_jobs(fn, jobs, ray)` gives `fn(job)` for every job, in job order. A job function and its jobs must pickle
(module-level functions, `functools.partial` of them, paths, configs, small tensors), and on a cluster every node
must import probex and see the same files: zoos, caches and roots on a shared filesystem, under the same absolute
paths (callers resolve relative ones before they hand them over).

Each Ray task reserves as many CPUs as the caller has torch threads, and runs with that many: float reductions
depend on the thread count, so the same count is what makes a task's numbers equal the local ones.

Ray is imported here only, and only when a run asks for it: the package works without it.
"""
from __future__ import annotations

import re
import socket
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

import torch
from tqdm.auto import tqdm

from probex.errors import ProbexError

INSTALL_HINT = "pip install 'probex[cluster]'"

Job = TypeVar("Job")
Result = TypeVar("Result")


def map_jobs(fn: Callable[[Job], Result], jobs: Iterable[Job], ray: bool | str = False, gpus: float = 0,
             desc: str = "jobs", progress: bool = True) -> Iterator[Result]:
    """`fn(job)` for each job, yielded in job order as each is ready.

    ray: False — here, in order; True — on the Ray instance `ray.init()` finds or starts on this machine;
    "HOST:PORT" — on the running cluster at that address. gpus: GPUs each Ray task reserves (jobs on cuda; Ray hides
    the GPUs from a task that reserves none)."""
    jobs = list(jobs)
    if not ray or not jobs:
        for job in tqdm(jobs, desc=desc, disable=not progress):
            yield fn(job)
        return
    ray_lib = connect(ray)
    threads = torch.get_num_threads()
    task = ray_lib.remote(run_with_threads).options(num_cpus=threads, num_gpus=gpus)
    shared_fn = ray_lib.put(fn)   # stored once, not pickled again into every task
    # A bounded window of submitted tasks instead of all of them: after an error (or an abandoned iteration) only the
    # window is left running, and nothing is cancelled — `ray.cancel` racing a task that is finishing aborts the
    # driver process in Ray 2.x (a failed RAY_CHECK "Tried to complete task that was not pending").
    window = 2 * max(1, int(ray_lib.cluster_resources().get("CPU", 1) // threads))
    pending = deque(task.remote(shared_fn, job, threads) for job in jobs[:window])
    submitted = len(pending)
    with tqdm(total=len(jobs), desc=desc, disable=not progress) as bar:
        while pending:
            try:
                result = ray_lib.get(pending.popleft())
            except ray_lib.exceptions.RayTaskError as err:
                if err.cause is None:
                    raise
                raise err.cause from None   # the job's own error (its one-line message), not Ray's traceback dump
            if submitted < len(jobs):
                pending.append(task.remote(shared_fn, jobs[submitted], threads))
                submitted += 1
            bar.update()
            yield result


def run_with_threads(fn: Callable[[Job], Result], job: Job, threads: int) -> Result:
    """One Ray task: the job with the caller's torch thread count."""
    torch.set_num_threads(threads)
    return fn(job)


def connect(ray: bool | str):
    """The ray module, connected: to `ray` ("HOST:PORT"), or when `ray` is True to what `ray.init()` finds or starts."""
    try:
        import ray as ray_lib
    except ImportError:
        raise ProbexError(f"--ray needs Ray, which is not installed: {INSTALL_HINT}") from None
    if not ray_lib.is_initialized():
        address = None if ray is True else str(ray)
        if address and (host_port := re.fullmatch(r"(.+):(\d+)", address)):
            check_reachable(host_port[1], int(host_port[2]))
        try:
            ray_lib.init(address=address)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            detail = " ".join(str(exc).split())[:200]
            raise ProbexError(f"cannot start or reach Ray at {address or 'this machine'}: {detail}") from None
    return ray_lib


def check_reachable(host: str, port: int) -> None:
    """Fail in seconds on a wrong address: `ray.init` retries an unreachable one for minutes."""
    try:
        socket.create_connection((host, port), timeout=5).close()
    except OSError as exc:
        raise ProbexError(f"no Ray cluster answers at {host}:{port} ({exc.strerror or exc}); "
                          "start one with `ray start --head` or check the address") from None
