"""Stands in for ``llamafactory-cli`` (``LLAMAFACTORY_MINORSFT_CLI``) in the tools' trainings during the tests.

It hands its argv, working directory, stdin, stdout and stderr to the warm CLI server at ``$WARM_CLI_SOCKET``
(``warm_cli.py``), which forks the run, and exits with the run's exit status. A signal it gets goes on to the run.
Only the standard library is imported: the point is to skip LLaMA-Factory's imports.
"""

import json
import os
import signal
import socket
import sys


def main() -> int:
    connection = socket.socket(socket.AF_UNIX)
    connection.connect(os.environ["WARM_CLI_SOCKET"])
    request = json.dumps({"argv": ["llamafactory-cli", *sys.argv[1:]], "cwd": os.getcwd()})
    socket.send_fds(connection, [request.encode()], [0, 1, 2])
    replies = connection.makefile("r")
    pid = json.loads(replies.readline())["pid"]
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda signum, frame: os.kill(pid, signum))
    return json.loads(replies.readline())["returncode"]


if __name__ == "__main__":
    sys.exit(main())
