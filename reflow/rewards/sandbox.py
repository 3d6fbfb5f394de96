"""Reward functions in sandboxed subprocesses: a time limit, memory/CPU/process limits, no network, a private folder.

A user reward function is code the training process did not write (or code a model wrote, for `code_exec`):
it can hang, allocate without bound, segfault, fork, or reach the network. `RewardSandbox` runs it in a pool
of `workers` server processes; each imports the spec itself (`load_reward_fn`), so user code never runs in
the trainer. Each call is a fresh process forked from its server:

    trainer --socket--> server (user ns + net ns + mount ns; imports the spec once)
                          `- fork A (new session; unshares a PID namespace)
                               `- fork B = PID 1 of that namespace: limits, private folder, calls fn, sends result

What each call gets, and where it does not (`isolation` says which applied; one warning is logged when
the namespaces are refused):
- time: the server kills A's process group after `timeout_s`; B is PID 1 of its own PID namespace, so its
  end (timeout, crash or return) kills every process it started, daemons included. Without namespaces:
  only processes still in the group are killed (one that calls setsid() survives).
- memory: RLIMIT_AS = memory_mb per process (a fork bomb could hold ~300 x memory_mb until it is killed;
  only a cgroup bounds the sum). CPU: RLIMIT_CPU = cpu_s. No core files.
- processes: the PID namespace's pid_max is 301, so at most ~300 processes per call. Without namespaces:
  RLIMIT_NPROC = the user's current count + 64, which the kernel ignores for root.
- network: a fresh network namespace with no interface up (connect: "Network is unreachable"). Without
  namespaces: `socket.socket` is replaced by one that raises (best effort; ctypes or a subprocess evades it).
- files: every mount is read-only except the call's own folder (a tmpfs; cwd, HOME and TMPDIR point at it;
  gone after the call); the function runs as a non-root user with no capabilities and cannot undo this.
  It can still read what the trainer's user can read, and its environment variables. Without namespaces:
  writes anywhere the user may write succeed.

Batches are split over the pool; a chunk that times out, crashes, raises or returns a wrong result is
retried one sample at a time, and only the samples that fail alone get `on_error`, counted in `errors`.
A bug that is not the sandbox's business (every sample of the first batch raising the same exception type,
or every one returning an invalid result) raises RewardError with the function's own message, as without
the sandbox.
"""

from __future__ import annotations

import ctypes
import json
import logging
import math
import os
import pickle
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

from reflow.rewards.registry import BUILTIN, RewardError, RewardShapeError, compute_rewards, compute_step_scores, load_reward_fn

log = logging.getLogger(__name__)

SANDBOXED_BUILTINS = {"code_exec"}  # builtins that run untrusted code: sandboxed unless reward.sandbox=false
PID_MAX = 301  # the kernel's smallest pid_max: at most ~300 processes in a call's PID namespace
STARTUP_S = 60.0  # on top of timeout_s: a server's Python start and the spec's imports (torch takes seconds)
_GRACE_S = 5.0  # the trainer's backstop on a server that neither answers nor dies

CLONE_NEWNS, CLONE_NEWUSER, CLONE_NEWNET, CLONE_NEWPID = 0x20000, 0x10000000, 0x40000000, 0x20000000
_MS_REC, _MS_PRIVATE, _MOUNT_ATTR_RDONLY, _AT_RECURSIVE, _SYS_MOUNT_SETATTR = 0x4000, 1 << 18, 1, 0x8000, 442
_PR_SET_PDEATHSIG, _PR_SET_NO_NEW_PRIVS, _PR_SET_CHILD_SUBREAPER = 1, 38, 36
_warned = False


def wants_sandbox(spec: str, sandbox: bool | None) -> bool:
    """reward.sandbox, or when unset (None): True for user code (file / module specs) and `code_exec`."""
    if sandbox is not None:
        return sandbox
    return spec.strip() not in BUILTIN or spec.strip() in SANDBOXED_BUILTINS


def open_reward(rcfg, spec: str | None = None, kind: str = "outcome", workers: int | None = None,
                budget_s: float | None = None):
    """The reward function of a RewardConfig (`spec`: reward.fn, or reward.prm for kind="process"): a started
    RewardSandbox where reward.sandbox says so, else the function loaded in this process."""
    spec = spec or rcfg.fn
    if not wants_sandbox(spec, rcfg.sandbox):
        keywords = ("prompts", "responses", "steps") if kind == "process" else ("prompts", "responses", "answers")
        return load_reward_fn(spec, keywords=keywords)
    return RewardSandbox(spec, kind=kind, timeout_s=rcfg.timeout_s, on_error=rcfg.on_error, memory_mb=rcfg.memory_mb,
                         cpu_s=rcfg.cpu_s, workers=workers or rcfg.workers, budget_s=budget_s)


# --------------------------------------------------------------------------- the trainer's side


class RewardSandbox:
    """A pool of sandboxed servers for one reward spec. `kind`: "outcome" (prompts, responses, answers ->
    one float per sample) or "process" (prompts, responses, steps -> one list of step scores per sample;
    a failed sample gets 0.0 per step, no signal, rather than on_error at every step).

    Starting it imports the spec in every server and checks its signature there; a problem raises the
    same one-line RewardError as `load_reward_fn`. Use as a context manager or call `close()`.
    """

    def __init__(self, spec: str, *, kind: str = "outcome", timeout_s: float = 30.0, on_error: float = 0.0,
                 memory_mb: int = 2048, cpu_s: float | None = None, workers: int = 2, budget_s: float | None = None):
        """budget_s: the time one batch may take. Sample-by-sample retries start only while one more can end
        inside it; samples left unretried get on_error. The runtime sets it below runtime.timeout_s, so a
        function that hangs on many samples costs a bounded step instead of a run ended as a hang."""
        self.budget_s = budget_s
        self.spec, self.kind, self.on_error = spec.strip(), kind, float(on_error)
        self.reflow_spec = self.spec  # registry._name reports the user's spelling
        self.limits = {"timeout_s": float(timeout_s), "memory_mb": int(memory_mb),
                       "cpu_s": float(cpu_s if cpu_s is not None else timeout_s)}
        self.errors_total, self._calls = 0, 0
        self._servers: list[_Server] = []
        try:
            for _ in range(max(1, int(workers))):
                self._servers.append(_Server(self.spec, kind, self.limits))
            hello = self._servers[0].hello
        except BaseException:
            self.close()
            raise
        self.reward_range = hello.get("reward_range")
        self.correct_at = hello.get("correct_at")  # what the function declares; registry.correct_at resolves it
        self.isolation: dict[str, bool] = hello["isolation"]
        global _warned
        if hello.get("warning") and not _warned:
            _warned = True
            log.warning("reward sandbox: %s", hello["warning"])

    # the calling convention of a reward function, so compute_rewards and evaluation take the sandbox as is
    def __call__(self, *, prompts, responses, answers) -> list[float]:
        return self.score(prompts, responses, answers)[0]

    def score(self, prompts: list[str], responses: list[str], answers: list) -> tuple[list[float], int]:
        """One float per sample (on_error for those that failed alone) and how many failed."""
        return self._score({"prompts": list(prompts), "responses": list(responses), "answers": list(answers)})

    def score_steps(self, prompts: list[str], responses: list[str], steps: list[list[str]]) -> tuple[list, int]:
        """Process rewards: one list of step scores per sample, and how many samples failed."""
        return self._score({"prompts": list(prompts), "responses": list(responses), "steps": list(steps)})

    def probe(self, prompt: str, response: str, answer) -> None:
        """Score one sample at start-up: a result of the wrong shape (a bug for any input) raises RewardError
        with its message. Any other failure of this one sample (it raised, hung, crashed) says nothing about
        the others, so it only warns: during the run such a sample gets reward.on_error, and a function that
        fails every sample of its first batch the same way stops the run then. Not counted as that batch."""
        res = self._run([{"prompts": [prompt], "responses": [response], "answers": [answer]}])[0]
        if res[0] == "shape":
            raise RewardError(res[2])
        if res[0] != "ok":
            log.warning("reward '%s' failed on the start-up sample (%s): %s", self.spec, res[0], res[2])

    def _score(self, columns: dict[str, list]) -> tuple[list, int]:
        n = len(columns["prompts"])
        if n == 0:
            return [], 0
        t0 = time.monotonic()
        first_call, self._calls = self._calls == 0, self._calls + 1
        per = 1 if self.spec in SANDBOXED_BUILTINS else math.ceil(n / len(self._servers))
        chunks = [list(range(a, min(n, a + per))) for a in range(0, n, per)]
        out: list[Any] = [None] * n
        failed: dict[int, tuple] = {}
        retry: list[int] = []
        for idx, res in zip(chunks, self._run([_take(columns, c) for c in chunks])):
            if res[0] == "shape":  # the wrong count or container: the function's bug for any input
                raise RewardError(res[2])
            if res[0] == "ok":
                for i, v in zip(idx, res[1]):
                    out[i] = v
            elif len(idx) == 1:
                failed[idx[0]] = res
            else:
                retry += idx
        last_start = None if self.budget_s is None else t0 + self.budget_s - self.limits["timeout_s"] - 1.0
        for i, res in zip(retry, self._run([_take(columns, [i]) for i in retry], last_start)):
            if res[0] == "shape":
                raise RewardError(res[2])
            if res[0] == "ok":
                out[i] = res[1][0]
            else:
                failed[i] = res
        if failed and first_call and len(failed) == n and _same_bug(failed.values()):
            raise RewardError(next(iter(failed.values()))[2])
        for i, res in failed.items():
            out[i] = [0.0] * len(columns["steps"][i]) if self.kind == "process" else self.on_error
        if failed:
            self.errors_total += len(failed)
            kinds: dict[str, int] = {}
            for res in failed.values():
                kinds[res[0]] = kinds.get(res[0], 0) + 1
            first = next(iter(failed.values()))[2]
            log.warning("reward '%s': %d of %d samples failed (%s; %d so far); they get %s. First: %s", self.spec,
                        len(failed), n, ", ".join(f"{v} {k}" for k, v in sorted(kinds.items())), self.errors_total,
                        "0.0 per step" if self.kind == "process" else f"reward.on_error={self.on_error}", first)
        return out, len(failed)

    def _run(self, jobs: list[dict], last_start: float | None = None) -> list[tuple]:
        """Run jobs over the pool, one per server at a time -> ("ok", values) or (kind, key, message) each.
        last_start: a job not started by then (time.monotonic()) is not run: a "timeout" result."""
        results: list[tuple | None] = [None] * len(jobs)
        todo = list(range(len(jobs)))[::-1]
        busy: dict[int, tuple[int, float]] = {}  # server index -> (job, backstop deadline)
        while todo or busy:
            if todo and last_start is not None and time.monotonic() > last_start:
                for j in todo:
                    results[j] = ("timeout", "budget", f"reward '{self.spec}': not retried, the batch's time "
                                  f"budget ({self.budget_s:.0f} s, from runtime.timeout_s) was spent")
                todo = []
                if not busy:
                    break
            for s, server in enumerate(self._servers):
                if s not in busy and todo:
                    j = todo.pop()
                    try:
                        server.send(jobs[j])
                        busy[s] = (j, time.monotonic() + self.limits["timeout_s"] + _GRACE_S)
                    except OSError:
                        results[j] = ("crashed", "server", f"reward '{self.spec}': its sandbox process died")
                        server.restart()
            if not busy:
                continue
            timeout = max(0.0, min(d for _, d in busy.values()) - time.monotonic())
            ready = wait([self._servers[s].conn for s in busy], timeout)
            for s in list(busy):
                server, (j, deadline) = self._servers[s], busy[s]
                if server.conn in ready:
                    try:
                        results[j] = server.conn.recv()
                    except (EOFError, OSError, pickle.UnpicklingError):
                        results[j] = ("crashed", "server", f"reward '{self.spec}': its sandbox process died")
                        server.restart()
                elif time.monotonic() >= deadline:
                    results[j] = ("timeout", "server", f"reward '{self.spec}': its sandbox process stopped "
                                  f"answering (killed after {self.limits['timeout_s'] + _GRACE_S:.0f} s)")
                    server.restart()
                else:
                    continue
                del busy[s]
        return results

    def close(self) -> None:
        for server in self._servers:
            server.close()
        self._servers = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        if getattr(self, "_servers", None):
            self.close()


def _take(columns: dict[str, list], idx: list[int]) -> dict[str, list]:
    return {k: [v[i] for i in idx] for k, v in columns.items()}


def _same_bug(failures) -> bool:
    """Every failure the function's own doing, and the same: one exception type, or every result invalid."""
    keys = {(kind, key) for kind, key, _ in failures}
    return len(keys) == 1 and next(iter(keys))[0] in ("raised", "invalid")


class _Server:
    """One sandbox server process and its socket."""

    def __init__(self, spec: str, kind: str, limits: dict):
        self.spec, self.kind, self.limits = spec, kind, limits
        self.proc: subprocess.Popen | None = None
        self.workdir = ""
        self.hello = self._start()

    def _start(self) -> dict:
        ours, theirs = socket.socketpair()
        self.workdir = tempfile.mkdtemp(prefix="reflow-reward-")
        args = json.dumps({"spec": self.spec, "kind": self.kind, "limits": self.limits, "fd": theirs.fileno(),
                           "workdir": self.workdir})
        env = dict(os.environ)
        root = str(Path(__file__).resolve().parents[2])  # the folder holding the reflow package
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        self.proc = subprocess.Popen([sys.executable, "-m", "reflow.rewards.sandbox", args], pass_fds=[theirs.fileno()],
                                     stdin=subprocess.DEVNULL, start_new_session=True, env=env)
        theirs.close()
        self.conn = Connection(ours.detach())
        limit = STARTUP_S + self.limits["timeout_s"]
        if not self.conn.poll(limit):
            self.close()
            raise RewardError(f"reward '{self.spec}': its sandbox did not start within {limit:.0f} s (importing the "
                              "spec takes too long or hangs); check the module's top-level code")
        try:
            hello = self.conn.recv()
        except (EOFError, OSError):
            code = self.proc.wait()
            self.close()
            raise RewardError(f"reward '{self.spec}': its sandbox process exited with {code} while importing the "
                              "spec; run the import on its own to see why") from None
        if not hello.get("ok"):
            self.close()
            raise RewardError(hello["error"])
        return hello

    def send(self, job: dict) -> None:
        self.conn.send(job)

    def restart(self) -> None:
        self.close()
        self.hello = self._start()

    def close(self) -> None:
        if self.proc is not None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            self.proc.wait()
            self.proc = None
            self.conn.close()
        if self.workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = ""


# --------------------------------------------------------------------------- the server (inside the sandbox)

_libc = ctypes.CDLL(None, use_errno=True)


class _MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64), ("propagation", ctypes.c_uint64),
                ("userns_fd", ctypes.c_uint64)]


def _check(ret: int, what: str) -> None:
    if ret != 0:
        raise OSError(ctypes.get_errno(), f"{what}: {os.strerror(ctypes.get_errno())}")


def _isolate(workdir: str, memory_mb: int) -> tuple[dict[str, bool], str | None]:
    """Enter new user, network and mount namespaces; make every mount read-only but `workdir` (a tmpfs).
    Returns what applied and, where something did not, why."""
    iso = {"network": False, "filesystem": False, "processes": False}
    uid, gid = os.getuid(), os.getgid()
    try:
        _check(_libc.unshare(CLONE_NEWUSER | CLONE_NEWNET | CLONE_NEWNS), "unshare(user, net, mount)")
        Path("/proc/self/setgroups").write_text("deny")
        Path("/proc/self/uid_map").write_text(f"1000 {uid} 1")  # not root inside: exec regains no capabilities
        Path("/proc/self/gid_map").write_text(f"1000 {gid} 1")
    except OSError as e:
        _block_sockets()
        return iso, (f"network and filesystem isolation are not available ({e}); reward functions run with "
                     "sockets blocked in Python only, may write wherever this user can, and a process that "
                     "leaves its session survives a timeout")
    iso["network"] = iso["processes"] = True
    try:
        _check(_libc.mount(b"none", b"/", None, _MS_REC | _MS_PRIVATE, None), "mount --make-rprivate /")
        ro = _MountAttr(_MOUNT_ATTR_RDONLY, 0, 0, 0)
        _check(_libc.syscall(_SYS_MOUNT_SETATTR, -100, b"/", _AT_RECURSIVE, ctypes.byref(ro), ctypes.sizeof(ro)),
               "mount_setattr(/, read-only)")
        rw = _MountAttr(0, _MOUNT_ATTR_RDONLY, 0, 0)  # /proc stays writable so a call can set its pid_max
        _check(_libc.syscall(_SYS_MOUNT_SETATTR, -100, b"/proc", 0, ctypes.byref(rw), ctypes.sizeof(rw)),
               "mount_setattr(/proc, read-write)")
        _check(_libc.mount(b"tmpfs", workdir.encode(), b"tmpfs", 0, f"size={memory_mb}m,mode=700".encode()),
               "mount tmpfs")
    except OSError as e:
        return iso, f"filesystem isolation is not available ({e}); reward functions may write wherever this user can"
    iso["filesystem"] = True
    return iso, None


def _block_sockets() -> None:
    class _NoSocket(socket.socket):
        def __init__(self, *args, **kwargs):
            raise PermissionError("network access is blocked in the reward sandbox")

    socket.socket = _NoSocket  # type: ignore[misc]


def _validate(fn, kind: str, job: dict) -> tuple:
    """Call fn on a job as the in-process path does -> ("ok", values) or (kind, key, message)."""
    try:
        if kind == "process":
            values = compute_step_scores(fn, job["prompts"], job["responses"], job["steps"])
        else:
            values = compute_rewards(fn, job["prompts"], job["responses"], job["answers"])
    except RewardShapeError as e:
        return ("shape", "result", str(e))
    except RewardError as e:
        cause = e.__cause__
        return ("raised", type(cause).__name__, str(e)) if cause is not None else ("invalid", "result", str(e))
    return "ok", values


def _call(fn, kind: str, job: dict, iso: dict, limits: dict, workdir: str, close_fd: int, seq: int) -> tuple:
    """Run one job in a fresh process tree (fork A -> B, PID 1 of a new PID namespace) under the limits."""
    r, w = os.pipe()
    a = os.fork()
    if a == 0:  # A: a new session, a new PID namespace for its child, then wait for it
        try:
            os.close(r)
            os.setsid()
            pid_ns = iso["processes"] and _libc.unshare(CLONE_NEWPID) == 0
            b = os.fork()
            if b == 0:
                _child(fn, kind, job, pid_ns, limits, os.path.join(workdir, f"call-{seq}"), close_fd, w)
            os.close(w)
            _, status = os.waitpid(b, 0)
            os._exit(os.waitstatus_to_exitcode(status) % 256 if os.WIFEXITED(status) else 128 + os.WTERMSIG(status))
        finally:
            os._exit(127)
    os.close(w)
    timeout = limits["timeout_s"]
    pipe = Connection(r, writable=False)
    ready = pipe.poll(timeout)
    result = None
    if ready:
        try:
            result = pipe.recv()
        except (EOFError, OSError, pickle.UnpicklingError):
            pass
    pipe.close()
    # A exits once B has: give it a moment (B is sending or crashed), then kill what is left of the group
    status = _finish(a, 0.0 if not ready else 1.0)
    if result is None:
        code = os.waitstatus_to_exitcode(status)
        if not ready:
            result = ("timeout", "timeout", f"reward '{_SPEC}' did not return within reward.timeout_s={timeout:g} s")
        elif code > 128 or code < 0:
            sig = code - 128 if code > 128 else -code
            name = signal.Signals(sig).name if sig in signal.Signals._value2member_map_ else str(sig)
            why = " (over reward.cpu_s)" if sig == signal.SIGXCPU else ""
            result = ("crashed", f"signal {name}", f"reward '{_SPEC}' was killed by {name}{why}")
        else:
            result = ("crashed", f"exit {code}", f"reward '{_SPEC}' exited with status {code} without returning")
    shutil.rmtree(os.path.join(workdir, f"call-{seq}"), ignore_errors=True)
    return result


def _finish(a: int, wait_s: float) -> int:
    """Wait up to wait_s for A, kill its process group, and reap: A's wait status. The server is a child
    subreaper, so B, orphaned when A is killed, is reaped here too; B's exit as PID 1 returns only once
    every process of its namespace is gone, so nothing a call started outlives it."""
    deadline, status = time.monotonic() + wait_s, None
    while status is None and time.monotonic() < deadline:
        pid, st = os.waitpid(a, os.WNOHANG)
        if pid:
            status = st
        else:
            time.sleep(0.002)
    _killpg(a)
    if status is None:
        _, status = os.waitpid(a, 0)
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline:  # orphans (B after A): bounded, a stray that left the group may live on
        try:
            if os.waitpid(-1, os.WNOHANG)[0] == 0:
                time.sleep(0.002)
        except ChildProcessError:
            break
    return status


def _killpg(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _child(fn, kind: str, job: dict, pid_ns: bool, limits: dict, folder: str, close_fd: int, w: int):
    """B: limits, a private folder, no capabilities; call fn, send the result, exit (never returns)."""
    try:
        os.close(close_fd)  # the server's socket to the trainer: not the function's to write on
        _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if pid_ns:
            try:  # per PID namespace since Linux 6.14; older kernels leave only the time limit
                Path("/proc/sys/kernel/pid_max").write_text(str(PID_MAX))
            except OSError:
                pass
        elif os.getuid() != 0:  # the kernel ignores RLIMIT_NPROC for root
            mine = sum(1 for p in Path("/proc").glob("[0-9]*/task/*") if _owner(p) == os.getuid())
            resource.setrlimit(resource.RLIMIT_NPROC, (mine + 64, mine + 64))
        memory = limits["memory_mb"] * 2**20
        cpu = max(1, math.ceil(limits["cpu_s"]))
        resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        os.makedirs(folder, mode=0o700)
        os.chdir(folder)
        for key in ("HOME", "TMPDIR", "TMP", "TEMP"):
            os.environ[key] = folder
        tempfile.tempdir = folder
        os.environ["REFLOW_REWARD_TIMEOUT_S"] = str(limits["timeout_s"])
        _drop_capabilities()
        result = _validate(fn, kind, job)
    except BaseException as e:  # noqa: BLE001 - SystemExit from the function, or a setup failure
        result = ("raised", type(e).__name__, f"reward '{_SPEC}' raised {type(e).__name__}: {e}")
    try:
        Connection(w, readable=False).send(result)
    finally:
        os._exit(0)


def _owner(p: Path) -> int:
    try:
        return p.stat().st_uid
    except OSError:
        return -1


def _drop_capabilities() -> None:
    """No capabilities in the user namespace: the function cannot remount, raise pid_max or regain them by exec."""
    class Header(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

    class Data(ctypes.Structure):
        _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]

    _libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    _libc.capset(ctypes.byref(Header(0x20080522, 0)), ctypes.byref((Data * 2)()))


_SPEC = "?"


def _serve(args: dict) -> None:
    """The server's loop: isolate, import the spec, then run each job the trainer sends until it closes."""
    global _SPEC
    _SPEC = args["spec"]
    conn = Connection(args["fd"])
    limits, workdir, kind = args["limits"], args["workdir"], args["kind"]
    os.dup2(2, 1)  # a print in the function goes to the trainer's stderr, not into a protocol
    _libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)  # a call's orphans are reaped here (see _finish)
    iso, warning = _isolate(workdir, limits["memory_mb"])
    keywords = ("prompts", "responses", "steps") if kind == "process" else ("prompts", "responses", "answers")
    try:
        fn = load_reward_fn(args["spec"], keywords=keywords)
        from reflow.rewards.registry import declared_correct_at, reward_range

        hello = {"ok": True, "isolation": iso, "warning": warning, "reward_range": reward_range(fn),
                 "correct_at": declared_correct_at(fn)}
        vm_mb = _vm_mb()
        if vm_mb > limits["memory_mb"]:
            hello = {"ok": False, "error": f"reward '{_SPEC}' takes {vm_mb} MB of address space once imported, over "
                                           f"reward.memory_mb={limits['memory_mb']}; raise reward.memory_mb"}
    except RewardError as e:
        hello = {"ok": False, "error": str(e)}
    except BaseException as e:  # noqa: BLE001
        hello = {"ok": False, "error": f"reward '{_SPEC}': loading it raised {type(e).__name__}: {e}"}
    conn.send(hello)
    if not hello["ok"]:
        return
    seq = 0
    while True:
        try:
            job = conn.recv()
        except (EOFError, OSError):
            return
        seq += 1
        conn.send(_call(fn, kind, job, iso, limits, workdir, args["fd"], seq))


def _vm_mb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmSize:"):
            return int(line.split()[1]) // 1024
    return 0


if __name__ == "__main__":
    _serve(json.loads(sys.argv[1]))
