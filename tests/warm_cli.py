"""A warm ``llamafactory-cli``: one process imports LLaMA-Factory once, then forks a child for each run.

Importing LLaMA-Factory (torch, transformers, datasets, this package's hooks) takes 5-7 s, and most tests run the
CLI several times. Each child is a fresh copy of a process that has done exactly the imports that a
``llamafactory-cli`` process does first; it then runs the console script's own ``main()`` with the run's argv,
working directory, stdout and stderr, and exits as that script does: an uncaught exception prints its traceback and
exits 1, ``sys.exit`` codes pass through, atexit handlers run. Runs with another environment than the default
(torchrun, other packages on PYTHONPATH, switches read at import) do not come here: ``run_cli`` starts those as
ordinary subprocesses.
"""

import json
import os
import select
import signal
import subprocess
import sys
import threading
from pathlib import Path


#: the server: import what a CLI run imports, then fork one child per request (one JSON line on stdin)
SERVER = r"""
import json, os, sys, threading
import llamafactory.cli, llamafactory.launcher, llamafactory.train.tuner  # noqa: F401 (a CLI run's own imports)

assert threading.active_count() == 1, "no fork after a thread has started"
print(json.dumps({"ready": True}), flush=True)
for line in sys.stdin:
    request = json.loads(line)
    sys.stdout.flush(), sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the run: nothing below returns to the loop
        os.chdir(request["cwd"])
        for fd, name in ((0, os.devnull), (1, request["stdout"]), (2, request["stderr"])):
            os.dup2(os.open(name, os.O_RDONLY if fd == 0 else os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
        sys.argv = request["argv"]
        sys.exit(llamafactory.cli.main())
    print(json.dumps({"pid": pid}), flush=True)
    _, status = os.waitpid(pid, 0)
    print(json.dumps({"returncode": os.waitstatus_to_exitcode(status)}), flush=True)
"""


class WarmCLI:
    """The server process of one pytest process; ``run`` mirrors ``subprocess.run(..., capture_output=True)``."""

    def __init__(self, env: dict) -> None:
        self.lock = threading.Lock()
        self.process = subprocess.Popen(
            [sys.executable, "-c", SERVER], env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        if self._reply(timeout=300).get("ready") is not True:
            raise RuntimeError("the warm llamafactory-cli did not start")

    def _reply(self, timeout: float) -> dict:
        ready, _, _ = select.select([self.process.stdout], [], [], timeout)
        line = self.process.stdout.readline() if ready else ""
        if not line:
            raise TimeoutError("no reply") if not ready else RuntimeError("the warm llamafactory-cli exited")
        return json.loads(line)

    def run(self, argv: list[str], cwd: Path, timeout: float) -> subprocess.CompletedProcess:
        stdout, stderr = cwd / "cli.stdout", cwd / "cli.stderr"
        request = dict(argv=argv, cwd=str(cwd), stdout=str(stdout), stderr=str(stderr))
        with self.lock:
            self.process.stdin.write(json.dumps(request) + "\n")
            self.process.stdin.flush()
            pid = self._reply(timeout=60)["pid"]
            try:
                returncode = self._reply(timeout)["returncode"]
            except TimeoutError:
                os.kill(pid, signal.SIGKILL)
                self._reply(timeout=60)
                raise subprocess.TimeoutExpired(argv, timeout) from None
        return subprocess.CompletedProcess(
            argv, returncode, stdout.read_text(errors="replace"), stderr.read_text(errors="replace")
        )

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=60)
