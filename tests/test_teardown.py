"""The exit wait of a distributed run (train/teardown.py): it returns only once the named threads are idle.

The two-process runs of test_distributed.py and test_deepspeed.py go through the whole tear-down; this checks the
wait itself on a thread that first spins, then blocks.
"""

import hashlib
import sys
import threading
import time

import pytest

from llamafactory_minorsft.train.teardown import wait_for_idle_threads


pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")


def _start_worker(name: str, spin_s: float, release: threading.Event) -> threading.Thread:
    def work():
        with open("/proc/thread-self/comm", "w", encoding="utf-8") as f:
            f.write(name)  # the kernel's thread name, as PyTorch names its Gloo workers
        end, data = time.monotonic() + spin_s, bytes(1 << 22)
        while time.monotonic() < end:  # runnable (state R), mostly without the GIL, as a native worker
            hashlib.sha256(data).digest()
        release.wait()  # blocked: state S

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    return thread


def test_wait_returns_once_the_worker_blocks():
    release = threading.Event()
    thread = _start_worker("mtest_worker", spin_s=0.5, release=release)
    start = time.monotonic()
    assert wait_for_idle_threads("mtest_worker", settle_polls=3, poll_s=0.01, timeout_s=10.0)
    elapsed = time.monotonic() - start
    release.set()
    thread.join()
    assert 0.4 < elapsed < 5.0


def test_wait_gives_up_after_its_timeout():
    release = threading.Event()
    thread = _start_worker("mtest_spinner", spin_s=3.0, release=release)
    time.sleep(0.05)
    start = time.monotonic()
    assert not wait_for_idle_threads("mtest_spinner", settle_polls=3, poll_s=0.01, timeout_s=0.3)
    assert time.monotonic() - start < 2.0
    release.set()
    thread.join()


def test_no_such_threads_is_idle_at_once():
    start = time.monotonic()
    assert wait_for_idle_threads("mtest_absent", settle_polls=3, poll_s=0.01, timeout_s=5.0)
    assert time.monotonic() - start < 1.0
