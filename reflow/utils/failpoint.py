"""Failpoints: named places where a test (or `bench/chaos.py`) makes a run fail for real.

    REFLOW_FAILPOINT="checkpoint.state.step_000002=kill,call.actor_train.r1.s3=hang"

Each item is `pattern=action` (the pattern in `fnmatch` syntax); when the code reaches `failpoint(name)` with
a matching name, the action happens in this process:

    kill   SIGKILL to this process (no cleanup, no flush: what a crash or an OOM kill does)
    hang   block forever (a stuck collective, a dead NFS mount)
    raise  RuntimeError (a bug in a call)

With REFLOW_FAILPOINT_ONCE=<file>, a failpoint fires only while that file does not exist and creates it
as it fires: the run that is restarted or resumed after the failure passes the same point unharmed.

Unset (the normal case), a failpoint costs one environment lookup. The runtime forwards both variables to
its Ray workers, so they reach every process of a run.
"""

from __future__ import annotations

import fnmatch
import os
import signal
import threading

ENV = "REFLOW_FAILPOINT"
ONCE_ENV = "REFLOW_FAILPOINT_ONCE"


def failpoint(name: str) -> None:
    spec = os.environ.get(ENV)
    if not spec:
        return
    for item in spec.split(","):
        pattern, _, action = item.strip().partition("=")
        if not fnmatch.fnmatchcase(name, pattern):
            continue
        once = os.environ.get(ONCE_ENV)
        if once:
            try:
                os.close(os.open(once, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                return
        if action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        elif action == "hang":
            threading.Event().wait()
        elif action == "raise":
            raise RuntimeError(f"failpoint {name}")
        else:
            raise ValueError(f"{ENV}: unknown action {action!r} in {item!r}; use kill, hang or raise")
