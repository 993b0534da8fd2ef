"""A warm ``llamafactory-cli``: one process imports LLaMA-Factory once, then forks a child for each run.

Importing LLaMA-Factory (torch, transformers, datasets, this package's hooks) takes 5-7 s, and most tests run the
CLI several times. Each child is a fresh copy of a process that has done exactly the imports that a
``llamafactory-cli`` process does first; it then runs the console script's own ``main()`` with the run's argv,
working directory, stdout and stderr, and exits as that script does: an uncaught exception prints its traceback and
exits 1, ``sys.exit`` codes pass through, threads are joined, atexit handlers run and stdio is flushed. It skips
the interpreter's teardown of its modules, which took 2 s of every run (``end_as_a_process``); the runs here write
their files with ``with`` blocks, logging handlers and atexit hooks, not from finalizers. Runs with another
environment than the default (torchrun, other packages on PYTHONPATH, switches read at import) do not come here:
``run_cli`` starts those as ordinary subprocesses.
"""

import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional


#: the server: import what a CLI run imports, then fork one child per request; replies go to the file descriptor in
#: argv[1], which the children close, so nothing a run prints can reach them. Requests come as JSON lines on stdin
#: (``WarmCLI.run``: output into files), or, with a socket path in argv[2], from ``warm_client.py`` processes, each
#: passing its own stdin, stdout and stderr along (``WarmCLI.socket``); the server ends when its stdin closes.
SERVER = r"""
import atexit, contextlib, ctypes, json, os, random, select, signal, socket, sys, threading
import datasets.fingerprint, numpy
import llamafactory.cli, llamafactory.launcher, llamafactory.train.tuner  # noqa: F401 (a CLI run's own imports)

replies = os.fdopen(int(sys.argv[1]), "w")
listener = None
if len(sys.argv) > 2:
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(sys.argv[2])
    listener.listen()
# no fork after a thread has started, but for pyarrow's jemalloc background thread (jemalloc handles a fork itself)
others = [open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task") if int(t) != os.getpid()]
assert set(others) <= {"jemalloc_bg_thd"}, others
print(json.dumps({"ready": True}), file=replies, flush=True)


def end_as_a_process(main):
    # main() as the console script runs it, then the end of a process: the uncaught exception's traceback, threads
    # joined, atexit handlers, stdio flushed (Python's and C's), the exit status (an uncaught Ctrl-C: killed by
    # SIGINT). Left out: the interpreter's teardown of its modules, which takes 2 s after a fork (its collector
    # touches every page that the server's imports filled).
    interrupted = False
    try:
        code = main()
    except SystemExit as exit:
        code = exit.code
    except BaseException as error:
        sys.excepthook(type(error), error, error.__traceback__)
        code, interrupted = 1, isinstance(error, KeyboardInterrupt)
    if code is not None and not isinstance(code, int):
        print(code, file=sys.stderr)
        code = 1
    threading._shutdown()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        with contextlib.suppress(Exception):
            stream.flush()
    ctypes.CDLL(None).fflush(None)
    if interrupted:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    os._exit(code or 0)


def fork_run(request, fds, closing):
    sys.stdout.flush(), sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the run: nothing below returns to the loop
        for f in closing:
            f.close()
        datasets.fingerprint.fingerprint_rng.seed(), numpy.random.seed(), random.seed()  # as a new process's
        os.chdir(request["cwd"])
        for fd, new in zip((0, 1, 2), fds):
            os.dup2(new, fd)
        for new in set(fds) - {0, 1, 2}:  # the run holds its stdio once, as a new process would
            os.close(new)
        sys.argv = request["argv"]
        end_as_a_process(llamafactory.cli.main)
    for new in fds:
        os.close(new)
    return pid


def request_fds(request):
    return [os.open(name, os.O_RDONLY if fd == 0 else os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            for fd, name in enumerate((os.devnull, request["stdout"], request["stderr"]))]


if listener is None:
    for line in sys.stdin:
        request = json.loads(line)
        pid = fork_run(request, request_fds(request), [replies])
        print(json.dumps({"pid": pid}), file=replies, flush=True)
        _, status = os.waitpid(pid, 0)
        print(json.dumps({"returncode": os.waitstatus_to_exitcode(status)}), file=replies, flush=True)
while listener is not None:  # one client at a time: the others wait in the listen queue
    if sys.stdin in select.select([listener, sys.stdin], [], [])[0] and not sys.stdin.buffer.read1(1):
        break
    connection, _ = listener.accept()
    fds = []
    try:  # a client that sends garbage, nothing, or goes away loses its run, not the server
        connection.settimeout(60)
        message, fds, _, _ = socket.recv_fds(connection, 65536, 3)
        connection.settimeout(None)
        request = json.loads(message)
        if len(fds) != 3:
            raise ValueError(f"a request passes stdin, stdout and stderr, not {len(fds)} file descriptors")
    except (OSError, ValueError) as error:
        print(f"warm CLI: request dropped: {error!r}", file=sys.stderr, flush=True)
        for new in fds:
            os.close(new)
        connection.close()
        continue
    pid = fork_run(request, fds, [replies, listener, connection])  # the run never comes back here
    try:
        connection.sendall((json.dumps({"pid": pid}) + "\n").encode())
    except OSError:  # its client is gone: nobody would stop the run, or wait for it
        os.kill(pid, 9)
    _, status = os.waitpid(pid, 0)
    with contextlib.suppress(OSError):
        connection.sendall((json.dumps({"returncode": os.waitstatus_to_exitcode(status)}) + "\n").encode())
    connection.close()
"""


class WarmCLI:
    """The server process of one pytest process; ``run`` mirrors ``subprocess.run(..., capture_output=True)``.

    A run that is interrupted (timeout, Ctrl-C, a failed reply) kills the server: ``broken`` says to start another.
    """

    def __init__(self, env: dict, log: Path, socket: Optional[str] = None) -> None:
        self.log, self.buffer, self.broken, self.socket = log, b"", False, socket
        read, write = os.pipe()
        with open(log, "wb") as output:  # the server's own output (import-time warnings, a failed start)
            self.process = subprocess.Popen(
                # -P: no working directory on sys.path, as the console script
                [sys.executable, "-P", "-c", SERVER, str(write), *([socket] if socket else [])],
                env=env,
                stdin=subprocess.PIPE,
                stdout=output,
                stderr=subprocess.STDOUT,
                pass_fds=(write,),
            )
        os.close(write)
        self.replies = read
        try:
            assert self._reply(timeout=300).get("ready") is True
        except Exception as error:
            self.close()
            raise RuntimeError(f"the warm llamafactory-cli did not start:\n{self._log_tail()}") from error

    def _log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]

    def _reply(self, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.replies], [], [], left)[0]:
                raise TimeoutError("no reply from the warm llamafactory-cli")
            chunk = os.read(self.replies, 4096)
            if not chunk:
                raise RuntimeError(f"the warm llamafactory-cli exited:\n{self._log_tail()}")
            self.buffer += chunk
        line, _, self.buffer = self.buffer.partition(b"\n")
        return json.loads(line)

    def run(self, argv: list[str], cwd: Path, timeout: float) -> subprocess.CompletedProcess:
        if self.socket is not None:
            raise RuntimeError("this warm CLI serves warm_client.py over its socket: it takes no requests on stdin")
        stdout, stderr = cwd / "cli.stdout", cwd / "cli.stderr"
        for path in (stdout, stderr):  # never the files of an earlier run in the same directory
            path.unlink(missing_ok=True)
        request = dict(argv=argv, cwd=str(cwd), stdout=str(stdout), stderr=str(stderr))
        pid = None
        try:
            self.process.stdin.write((json.dumps(request) + "\n").encode())
            self.process.stdin.flush()
            pid = self._reply(timeout=60)["pid"]
            returncode = self._reply(timeout)["returncode"]
        except BaseException as error:
            if pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            self.broken = True
            self.close()
            if isinstance(error, TimeoutError):
                raise subprocess.TimeoutExpired(argv, timeout) from None
            raise
        return subprocess.CompletedProcess(
            argv, returncode, stdout.read_text(errors="replace"), stderr.read_text(errors="replace")
        )

    def close(self) -> None:
        if self.process.poll() is None:
            with contextlib.suppress(OSError):
                self.process.stdin.close()
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
        if self.replies is not None:
            os.close(self.replies)
            self.replies = None
