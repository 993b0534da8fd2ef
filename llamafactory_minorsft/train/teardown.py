"""End of a distributed run: tear the process group down without tripping PyTorch's Gloo exit race.

The race (pytorch/pytorch#190489, open for torch 2.11): a Gloo worker thread frees each finished collective
after the caller has already moved on. If those tensors were created in Python, freeing them takes the GIL. When
the main thread has meanwhile reached interpreter shutdown, that GIL request ends the thread with a forced unwind,
and the process aborts with "terminate called without an active exception". A barrier alone does not help: the
barrier's own work keeps the collectives before it alive, and a worker frees them in the same way.

So the main thread sleeps, releasing the GIL, until every Gloo worker thread of the process is idle. An idle
worker is blocked on its queue (state S). A worker that still has to free something is either runnable or waiting
for the GIL, and the GIL is free while we sleep. The wait is Linux-only (it reads ``/proc``); elsewhere it is
skipped.
"""

import os
import time


GLOO_WORKER_THREAD = "pt_gloo_runloop"  # the name PyTorch gives ProcessGroupGloo's worker threads


def shut_down_process_group(settle_polls: int = 3, poll_s: float = 0.01, timeout_s: float = 10.0) -> None:
    """Barrier, destroy the process group, then wait until the Gloo workers have freed their last work."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return

    gloo = "gloo" in str(dist.get_backend()).lower()
    dist.barrier()  # no rank tears down while another still writes the checkpoint
    dist.destroy_process_group()
    if gloo:
        wait_for_idle_threads(GLOO_WORKER_THREAD, settle_polls, poll_s, timeout_s)


def wait_for_idle_threads(name: str, settle_polls: int, poll_s: float, timeout_s: float) -> bool:
    """Sleep until no thread called ``name`` is runnable in ``settle_polls`` polls in a row. False on timeout."""
    tasks = "/proc/self/task"
    if not os.path.isdir(tasks):
        return True

    quiet, deadline = 0, time.monotonic() + timeout_s
    while quiet < settle_polls:
        if time.monotonic() > deadline:
            return False

        time.sleep(poll_s)  # releases the GIL, so a worker waiting for it can finish
        busy = any(state != "S" for state in _thread_states(tasks, name))
        quiet = 0 if busy else quiet + 1

    return True


def _thread_states(tasks: str, name: str) -> list[str]:
    """The one-letter scheduler states of this process's threads called ``name`` (vanished threads skipped)."""
    states = []
    for tid in os.listdir(tasks):
        try:
            with open(f"{tasks}/{tid}/stat", encoding="utf-8") as f:
                stat = f.read()
        except OSError:
            continue

        comm = stat[stat.index("(") + 1 : stat.rindex(")")]
        if comm == name:
            states.append(stat[stat.rindex(")") + 2])

    return states
