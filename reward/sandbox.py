"""Run untrusted, model-written Python in a sandbox: `run_untrusted(program, limits=...)` -> `SandboxResult`.

The program runs in a child process started as

    unshare --net --ipc --uts --pid --fork --mount --kill-child -- python -I -S -B -c BOOTSTRAP CONFIG

The bootstrap (trusted code, the first thing that runs in the child, as PID 1 of the new PID namespace) reads the
program, then, before running it:
  * mounts a size-limited tmpfs as the child's new root, holding only read-only binds of /usr (and the /lib,
    /bin symlinks) and of the Python installation, /dev/{null,zero,urandom}, a fresh /proc of the new PID
    namespace, a writable /tmp and the working directory /sandbox; then pivot_root()s into it and detaches
    the old root, so no host file outside those read-only binds is reachable;
  * forks: PID 1 stays a root process that only waits for the program (so the program cannot signal it) and
    exits with it; an alarm also ends it shortly after the wall-clock limit, should the caller die first;
  * in the forked child, drops every capability: as root it switches to a random unprivileged uid/gid (no
    supplementary groups), under a user namespace it clears the capability sets; both also empty the bounding
    set and set no_new_privs, so setuid binaries cannot give privileges back;
  * sets RLIMIT_CPU, RLIMIT_AS, RLIMIT_NPROC, RLIMIT_FSIZE, RLIMIT_NOFILE and RLIMIT_CORE=0.
The parent gives it an empty environment, no stdin, reads stdout and stderr with a cap (killing the child as
soon as either grows over it), and SIGKILLs PID 1 (and the process group) at the wall-clock limit. When PID 1
exits, the kernel kills every other process of its namespace, so nothing the program started survives it. The host
temporary directory (its mount point) is removed afterwards; the tmpfs disappears with the namespace.
`run_untrusted` never raises and never waits longer than the wall-clock limit (plus a moment to reap).

Which isolation works is probed once, at first use, and logged (`isolation()`):
  * "root": running as root with `unshare` available: everything above.
  * "user-namespace": not root, but unprivileged user namespaces work (`unshare --user --map-root-user`): the
    same namespaces and private root; the program is uid 0 inside its user namespace (the caller's uid outside)
    with no capabilities, and RLIMIT_NPROC counts the caller's own processes too. (Not measured as a non-root
    user here; forced as root, it ran programs and blocked the network, writes to /usr, mount and chroot.)
  * "rlimits-only": no namespaces: only the rlimits, the empty environment, the temporary working directory
    and the caps on time and output (and, for a root caller, a random unprivileged uid, under which a Python
    installed in a private directory cannot import its extension modules). The network, the host's
    world-readable and world-writable files and other processes of the same uid are NOT protected, and
    processes that leave the process group can outlive the run; a warning says so.

Measured on the development machine (root, Linux 6.18, util-linux 2.38, mode "root"; tests/test_sandbox.py
checks each of these with a hostile program):
  blocked:
  * network: connecting to a socket listening on the host's 127.0.0.1 fails (ENETUNREACH: only a down
    loopback in the new network namespace); abstract Unix sockets are per network namespace, and no host
    Unix socket file is inside the private root;
  * the caller's environment: os.environ is empty; /proc shows only the sandbox's own processes (its parent is
    outside the namespace: os.getppid() == 0), so /proc/<caller>/environ does not exist;
  * signalling the caller: os.kill(os.getppid(), 9) (PID 1, root: EPERM), os.kill(<caller's pid>, 9) (no such
    process), os.kill(-1, 9) and os.killpg(0, 9) reach no process outside the sandbox (PID namespace and a
    different uid);
  * host files: writing, deleting or reading files of the caller (e.g. in its temporary directories, the
    repository, /root, /etc) fails: they are not in the private root; /usr and the Python installation are
    read-only; /tmp and /sandbox are private to this run and vanish with it;
  * fork bombs (RLIMIT_NPROC, per run thanks to a random uid), memory bombs (MemoryError at RLIMIT_AS),
    infinite loops (RLIMIT_CPU, then the wall clock), huge output (killed past the cap), huge files
    (RLIMIT_FSIZE, and the tmpfs size), processes left behind (killed with PID 1).
  not blocked:
  * the kernel's system-call surface: there is no seccomp filter, so a kernel exploit could escape;
  * total memory: RLIMIT_AS is per process and there is no memory cgroup, so a run can use up to
    max_processes x memory_bytes (2 GiB with the defaults), plus its tmpfs;
  * reading /usr and the Python installation (world-readable system files; no secrets are expected there);
  * CPU and cache side channels, and the time and CPU the run itself takes (bounded by the limits).
Cost, measured on the same machine (2 cores, with another job running): `run_untrusted("pass")` takes about 40 ms
(unshare and Python's start about 13 ms; ctypes, the mounts and the fork most of the rest), a code check about
50 ms, and 200 code checks with evaluate's two threads about 8 s. On an AMD EPYC VM (2 cores, idle, 2026-12-07):
`run_untrusted("pass")` 46 ms, a code check 50 ms alone and 27 ms each with two threads; the bootstrap's
imports were 43 ms of Python start-up before it took plain-string arguments and _signal (now 27 ms; bare Python
18 ms).
"""

from __future__ import annotations

import logging
import math
import os
import re
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

logger = logging.getLogger(__name__)

UNPRIVILEGED_UIDS = range(1_500_000_000, 1_600_000_000)
"""Uids (and gids) a root caller runs programs as: random per run, so RLIMIT_NPROC counts only that run's processes."""

_NAMESPACES = ("--net", "--ipc", "--uts", "--pid", "--fork", "--mount", "--kill-child")
_REAP_GRACE_SECONDS = 2.0  # after SIGKILL, how long to wait for the child to be reaped before giving up on it
_KILLED_BY_SIGNAL = re.compile(r"sandbox: program killed by signal (\d+)\s*\Z")  # PID 1's last word (bootstrap)


@dataclass(frozen=True)
class SandboxLimits:
    """What a sandboxed program may use."""

    wall_seconds: float = 10.0
    """Wall-clock time before the whole sandbox is killed."""
    cpu_seconds: int = 5
    """RLIMIT_CPU of each process (SIGXCPU when reached, SIGKILL a second later)."""
    memory_bytes: int = 512 << 20
    """RLIMIT_AS (virtual memory) of each process."""
    max_processes: int = 4
    """RLIMIT_NPROC: processes and threads of the run, its first process included."""
    file_bytes: int = 1 << 20
    """RLIMIT_FSIZE: the largest file it may write."""
    disk_bytes: int = 16 << 20
    """Size of the tmpfs holding its root, /tmp and working directory (all of its files together)."""
    output_bytes: int = 64 << 10
    """Cap on each of stdout and stderr; more output kills the program."""

    def __post_init__(self) -> None:
        if min(self.wall_seconds, self.cpu_seconds, self.memory_bytes, self.max_processes, self.file_bytes,
               self.disk_bytes, self.output_bytes) <= 0:
            raise ValueError(f"sandbox limits must be positive: {self}")


DEFAULT_LIMITS = SandboxLimits()


@dataclass(frozen=True)
class SandboxResult:
    """How a sandboxed program ended."""

    ok: bool
    """True when it exited with status 0 within every limit."""
    reason: str
    """Why it failed ("timed out after 10s", "output over 64 KiB", the last stderr line, ...), or "exit status 0"."""
    exit_code: int | None
    """Its exit status, or minus the signal that killed it; None when the sandbox killed it or could not start it."""
    stdout: str
    """What it wrote to stdout (at most output_bytes)."""
    stderr: str
    """What it wrote to stderr (at most output_bytes)."""
    cpu_seconds: float
    """User plus system CPU time of the sandbox's processes that were reaped."""


@dataclass(frozen=True)
class Isolation:
    """How programs are isolated on this machine, as probed at first use."""

    mode: str
    """"root", "user-namespace" or "rlimits-only" (see the module docstring)."""
    command_prefix: tuple[str, ...]
    """The `unshare ... --` command that starts the child in its namespaces; empty for "rlimits-only"."""
    drops_to_uid: bool
    """True when the program runs as a random unprivileged uid (root callers)."""
    summary: str
    """What is and is not blocked, for the log."""

    @property
    def has_namespaces(self) -> bool:
        return bool(self.command_prefix)


# The child's first code: reads the program, isolates itself (see the module docstring), sets the rlimits and runs
# the program in a fresh namespace. Kept dependency-free and small: it runs before anything can be trusted less.
# Its arguments are plain strings, and it imports _signal rather than signal: parsing JSON and signal's enums
# would double its start-up (~16 ms of ~65 per run, every code check pays it).
_BOOTSTRAP = r'''
import _signal, ctypes, os, resource, sys
mode, program_path, root, workdir, uid, disk_bytes, wall_seconds, *rlimits = sys.argv[1:]
uid = int(uid) if uid else None
with open(program_path, encoding="utf-8") as file:
    source = file.read()
libc = ctypes.CDLL(None, use_errno=True)
libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]


def check(result, what):
    if result != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, "sandbox setup: " + what + ": " + os.strerror(errno))


def mount(source, target, fstype, flags, data=None):
    as_bytes = lambda text: None if text is None else text.encode()
    check(libc.mount(as_bytes(source), as_bytes(target), as_bytes(fstype), flags, as_bytes(data)), "mount " + target)


if mode == "rlimits-only":
    os.chdir(workdir)
else:
    os.umask(0o022)
    RDONLY, NOSUID, NODEV, NOEXEC, REMOUNT, BIND, REC, PRIVATE = 1, 2, 4, 8, 32, 4096, 16384, 1 << 18
    mount(None, "/", None, REC | PRIVATE)
    mount("sandbox", root, "tmpfs", NOSUID | NODEV, "size=%s,nr_inodes=4096,mode=755" % disk_bytes)
    bound = []
    for path in ["/usr", "/lib", "/lib64", "/lib32", "/bin", "/sbin", os.path.abspath(sys.base_prefix)]:
        if any(path == done or path.startswith(done + "/") for done in bound) or not os.path.exists(path):
            continue
        if os.path.islink(path) and path.count("/") == 1:  # merged /usr: /lib -> usr/lib
            os.symlink(os.readlink(path), root + path)
            continue
        os.makedirs(root + path)
        mount(path, root + path, None, BIND | REC)
        mount(None, root + path, None, REMOUNT | BIND | RDONLY | NOSUID | NODEV)
        bound.append(path)
    os.mkdir(root + "/dev")
    for name in ("null", "zero", "urandom"):
        open(root + "/dev/" + name, "w").close()
        mount("/dev/" + name, root + "/dev/" + name, None, BIND)
    os.mkdir(root + "/proc")
    mount("proc", root + "/proc", "proc", NOSUID | NODEV | NOEXEC)
    os.mkdir(root + "/tmp")
    os.chmod(root + "/tmp", 0o1777)
    os.mkdir(root + "/sandbox", 0o700)
    if uid is not None:
        os.chown(root + "/sandbox", uid, uid)
    os.chdir(root)
    pivot_root = {"x86_64": 155, "aarch64": 41}.get(os.uname().machine)
    if pivot_root is None:
        os.chroot(".")
    else:  # pivot_root(".", ".") then detaching "." drops the host's root from this mount namespace altogether
        check(libc.syscall(pivot_root, b".", b"."), "pivot_root")
        check(libc.umount2(b".", 2), "detach the old root")
    os.chdir("/sandbox")
    # PID 1 stays a trusted root process that only waits: the program cannot signal it, and when it exits (the program
    # ended, or the alarm fired because the caller died without killing it) the kernel kills the whole namespace.
    worker = os.fork()
    if worker:
        _signal.signal(_signal.SIGALRM, lambda *_: os._exit(124))
        _signal.alarm(int(wall_seconds) + 1)
        while True:
            pid, status = os.wait()  # also reaps orphans, which PID 1 inherits
            if pid == worker:
                break
        if os.WIFSIGNALED(status):
            os.write(2, b"sandbox: program killed by signal %d\n" % os.WTERMSIG(status))
            os._exit(128 + os.WTERMSIG(status))
        os._exit(os.WEXITSTATUS(status))
for capability in range(64):
    libc.prctl(24, capability, 0, 0, 0)  # PR_CAPBSET_DROP; fails harmlessly without privileges or past the last one
if uid is not None:
    os.setgroups([])
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)
    if os.getuid() != uid:
        raise SystemExit("sandbox setup: still uid %d" % os.getuid())
elif mode == "user-namespace":
    class CapabilityHeader(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]
    check(libc.capset(ctypes.byref(CapabilityHeader(0x20080522, 0)), ctypes.byref((ctypes.c_uint32 * 6)())), "capset")
    libc.prctl(47, 4, 0, 0, 0)  # PR_CAP_AMBIENT_CLEAR_ALL
check(libc.prctl(38, 1, 0, 0, 0), "no_new_privs")
for rlimit in rlimits:
    name, soft, hard = rlimit.split(":")
    resource.setrlimit(getattr(resource, name), (int(soft), int(hard)))
del mode, program_path, root, workdir, disk_bytes, wall_seconds, rlimits, file
exec(compile(source, "<program>", "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
'''


# ---- isolation probe ---------------------------------------------------------------------------------------------

_SUMMARIES = {
    "root": "network, host files, other processes, the caller's environment and privileges are blocked "
            "(namespaces, private read-only root, random unprivileged uid); the kernel's syscall surface is not "
            "(no seccomp) and total memory is bounded only by max_processes x memory_bytes",
    "user-namespace": "network, host files, other processes and the caller's environment are blocked (namespaces, "
                      "private read-only root, no capabilities); the program keeps the caller's uid outside its "
                      "user namespace, so RLIMIT_NPROC also counts the caller's processes; no seccomp",
    "rlimits-only": "NOT blocked: network, reading and writing the caller's files, seeing and signalling other "
                    "processes of the same uid (no namespaces could be created); only rlimits, an empty "
                    "environment, a temporary directory and time/output caps apply",
}
_isolation: Isolation | None = None
_isolation_lock = threading.Lock()


def _candidate_isolations() -> list[Isolation]:
    """Strongest first: the isolations worth probing for this process."""
    unshare = shutil.which("unshare")
    candidates = []
    if unshare and os.geteuid() == 0:
        candidates.append(Isolation("root", (unshare, *_NAMESPACES, "--"), True, _SUMMARIES["root"]))
    if unshare:
        prefix = (unshare, "--user", "--map-root-user", *_NAMESPACES, "--")
        candidates.append(Isolation("user-namespace", prefix, False, _SUMMARIES["user-namespace"]))
    # Even without namespaces, a root caller runs the program as an unprivileged uid: it may then fail to import
    # modules of a Python installed in a private directory, which fails the check rather than the host.
    candidates.append(Isolation("rlimits-only", (), os.geteuid() == 0, _SUMMARIES["rlimits-only"]))
    return candidates


def isolation() -> Isolation:
    """The strongest isolation that works here, probed once by running a tiny program, and logged."""
    global _isolation
    with _isolation_lock:
        if _isolation is None:
            failures = []
            for candidate in _candidate_isolations():
                failure = _probe_failure(candidate)
                if failure is None or candidate.mode == "rlimits-only":
                    _isolation = candidate
                    break
                failures.append(f"{candidate.mode}: {failure}")
            log = logger.warning if _isolation.mode == "rlimits-only" else logger.info
            log("sandbox isolation %r: %s%s", _isolation.mode, _isolation.summary,
                f" (unavailable: {'; '.join(failures)})" if failures else "")
        return _isolation


def _probe_failure(candidate: Isolation) -> str | None:
    """Why a tiny program does not run under this isolation, or None when it does."""
    try:
        probe = _run(f"print({candidate.mode!r})", SandboxLimits(wall_seconds=30), candidate)
    except Exception as error:  # e.g. unshare cannot be executed
        return f"{type(error).__name__}: {error}"
    return None if probe.ok and probe.stdout.strip() == candidate.mode else probe.reason


# ---- running ----------------------------------------------------------------------------------------------------


def run_untrusted(program: str, *, limits: SandboxLimits = DEFAULT_LIMITS) -> SandboxResult:
    """Runs Python source in the sandbox; never raises, never outlives limits.wall_seconds by more than a moment."""
    try:
        return _run(program, limits, isolation())
    except Exception as error:  # a broken sandbox must fail the check, not the caller
        logger.exception("sandbox failed to run a program")
        return SandboxResult(False, f"sandbox error: {type(error).__name__}: {error}", None, "", "", 0.0)


def _rlimits(limits: SandboxLimits) -> list[tuple[str, int, int]]:
    """(name, soft, hard): SIGXCPU at the CPU limit, SIGKILL a second later if the program ignores it."""
    return [("RLIMIT_CPU", limits.cpu_seconds, limits.cpu_seconds + 1),
            *((name, value, value) for name, value in [
                ("RLIMIT_AS", limits.memory_bytes), ("RLIMIT_NPROC", limits.max_processes),
                ("RLIMIT_FSIZE", limits.file_bytes), ("RLIMIT_NOFILE", 64), ("RLIMIT_CORE", 0)])]


def _bootstrap_config(host_dir: str, limits: SandboxLimits, isolation: Isolation) -> dict:
    uid = UNPRIVILEGED_UIDS[int.from_bytes(os.urandom(4), "little") % len(UNPRIVILEGED_UIDS)]
    return {"mode": isolation.mode, "program": os.path.join(host_dir, "program.py"), "root": host_dir,
            "workdir": os.path.join(host_dir, "work"), "uid": uid if isolation.drops_to_uid else None,
            "disk_bytes": limits.disk_bytes, "wall_seconds": math.ceil(limits.wall_seconds),
            "rlimits": _rlimits(limits)}


def _bootstrap_args(config: dict) -> list[str]:
    """The bootstrap's arguments, in the order it unpacks them; the rlimits last, one "NAME:soft:hard" each."""
    return [config["mode"], config["program"], config["root"], config["workdir"],
            "" if config["uid"] is None else str(config["uid"]), str(config["disk_bytes"]),
            str(config["wall_seconds"]), *(f"{name}:{soft}:{hard}" for name, soft, hard in config["rlimits"])]


def _run(program: str, limits: SandboxLimits, isolation: Isolation) -> SandboxResult:
    with tempfile.TemporaryDirectory(prefix="sandbox-", ignore_cleanup_errors=True) as host_dir:
        config = _bootstrap_config(host_dir, limits, isolation)
        with open(config["program"], "w", encoding="utf-8") as file:
            file.write(program)
        os.mkdir(config["workdir"])
        if isolation.drops_to_uid and not isolation.has_namespaces:
            os.chown(config["workdir"], config["uid"], config["uid"])
        command = [*isolation.command_prefix, sys.executable, "-I", "-S", "-B", "-c", _BOOTSTRAP,
                   *_bootstrap_args(config)]
        deadline = time.monotonic() + limits.wall_seconds
        child = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 env={}, cwd=host_dir, start_new_session=True)
        try:
            return _supervise(child, limits, deadline)
        finally:
            _kill(child, isolation)
            child.stdout.close()
            child.stderr.close()


def _supervise(child: subprocess.Popen, limits: SandboxLimits, deadline: float) -> SandboxResult:
    """Reads the child's output under the caps until it exits, or kills it at a limit."""
    output = {child.stdout: bytearray(), child.stderr: bytearray()}
    text = lambda stream: output[stream].decode(errors="replace")
    killed = lambda reason: SandboxResult(False, reason, None, text(child.stdout), text(child.stderr), 0.0)
    with selectors.DefaultSelector() as selector:
        for stream in output:
            selector.register(stream, selectors.EVENT_READ)
        while selector.get_map():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return killed(f"timed out after {limits.wall_seconds:g}s")
            for key, _ in selector.select(remaining):
                chunk = os.read(key.fd, 1 << 16)
                if not chunk:
                    selector.unregister(key.fileobj)
                    continue
                output[key.fileobj] += chunk
                if len(output[key.fileobj]) > limits.output_bytes:
                    del output[key.fileobj][limits.output_bytes:]
                    return killed(f"output over {_size(limits.output_bytes)}")
    ended = _reap(child, deadline)
    if ended is None:
        return killed(f"timed out after {limits.wall_seconds:g}s")
    exit_code, cpu_seconds = ended
    stdout, stderr = text(child.stdout), text(child.stderr)
    exit_code = _program_exit_code(exit_code, stderr)
    return SandboxResult(exit_code == 0, _exit_reason(exit_code, stderr, cpu_seconds, limits), exit_code, stdout,
                         stderr, cpu_seconds)


def _reap(child: subprocess.Popen, deadline: float) -> tuple[int, float] | None:
    """(exit code, CPU seconds) once the child has exited, or None at the deadline; wait4 gives its CPU time."""
    pause = 0.001
    while child.returncode is None:
        try:
            pid, status, usage = os.wait4(child.pid, os.WNOHANG)
        except ChildProcessError:  # already reaped
            return None
        if pid:
            child.returncode = os.waitstatus_to_exitcode(status)
            return child.returncode, usage.ru_utime + usage.ru_stime
        if time.monotonic() >= deadline:
            return None
        time.sleep(pause)
        pause = min(2 * pause, 0.05)  # prompt for the usual exit right after the output closes, cheap for a sleeper
    return child.returncode, 0.0


def _kill(child: subprocess.Popen, isolation: Isolation) -> None:
    """Kills the sandbox unless it has ended, and reaps it.

    SIGKILL goes first to the namespace's PID 1, so that `unshare` reaps it (an orphan would wait for the host's
    init to reap it) and the kernel kills every process of the namespace; then to the process group, for
    "rlimits-only" mode and in case PID 1 could not be found."""
    if child.returncode is not None:
        return
    pid_1 = _children(child.pid) if isolation.has_namespaces else []
    for pid in pid_1:
        _sigkill(os.kill, pid)
    if not pid_1 or _reap(child, time.monotonic() + 0.5) is None:
        _sigkill(os.killpg, child.pid)
        _reap(child, time.monotonic() + _REAP_GRACE_SECONDS)


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as file:
            return [int(word) for word in file.read().split()]
    except (OSError, ValueError):
        return []


def _sigkill(send: Callable[[int, int], None], target: int) -> None:
    """`send(target, SIGKILL)` (os.kill or os.killpg), ignoring a target that is gone or not ours."""
    try:
        send(target, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _program_exit_code(exit_code: int, stderr: str) -> int:
    """The program's exit code, minus the signal that killed it as reported by the bootstrap's PID 1 (a program
    that forges that report only makes itself fail)."""
    killed = _KILLED_BY_SIGNAL.search(stderr[-100:])
    return -int(killed.group(1)) if killed and exit_code == 128 + int(killed.group(1)) else exit_code


def _exit_reason(exit_code: int, stderr: str, cpu_seconds: float, limits: SandboxLimits) -> str:
    if exit_code == 0:
        return "exit status 0"
    if exit_code < 0:
        name = signal.Signals(-exit_code).name if -exit_code in signal.valid_signals() else f"signal {-exit_code}"
        if -exit_code in (signal.SIGXCPU, signal.SIGKILL) and cpu_seconds >= limits.cpu_seconds - 0.1:
            return f"CPU time limit of {limits.cpu_seconds}s reached ({name})"
        return f"killed by {name}"
    lines = [line for line in stderr.splitlines() if line.strip()]
    return lines[-1].strip()[:200] if lines else f"exit status {exit_code}"


def _size(n_bytes: int) -> str:
    return f"{n_bytes >> 20} MiB" if n_bytes >= 1 << 20 and n_bytes % (1 << 20) == 0 else (
        f"{n_bytes >> 10} KiB" if n_bytes % 1024 == 0 else f"{n_bytes} bytes")
