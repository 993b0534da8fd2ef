"""Stands in for ``llamafactory-cli`` (``LLAMAFACTORY_MINORSFT_CLI``) in the tools' trainings during the tests.

It hands its argv, working directory, stdin, stdout and stderr to the warm CLI server at ``$WARM_CLI_SOCKET``
(``warm_cli.py``), which forks the run, and exits with the run's exit status: a run killed by a signal kills this
process with the same signal, as the console script would die. A signal it gets goes on to the run. Only the standard
library is imported: the point is to skip LLaMA-Factory's imports.
"""

import contextlib
import json
import os
import signal
import socket
import sys


FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def main() -> int:
    # a signal that comes before the run's pid is known waits (blocked) until it can be passed on
    signal.pthread_sigmask(signal.SIG_BLOCK, FORWARDED)
    connection = socket.socket(socket.AF_UNIX)
    connection.connect(os.environ["WARM_CLI_SOCKET"])
    request = json.dumps({"argv": ["llamafactory-cli", *sys.argv[1:]], "cwd": os.getcwd()})
    socket.send_fds(connection, [request.encode()], [0, 1, 2])
    replies = connection.makefile("r")
    pid = json.loads(replies.readline())["pid"]

    def forward(signum, frame):
        with contextlib.suppress(ProcessLookupError):  # the run has just ended
            os.kill(pid, signum)

    for sig in FORWARDED:
        signal.signal(sig, forward)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, FORWARDED)
    returncode = json.loads(replies.readline())["returncode"]
    if returncode < 0:  # killed by a signal: die of it too, so that the caller sees what the run saw
        with contextlib.suppress(OSError):  # SIGKILL's action cannot be set (it is the default)
            signal.signal(-returncode, signal.SIG_DFL)
        os.kill(os.getpid(), -returncode)
    return returncode


if __name__ == "__main__":
    sys.exit(main())
