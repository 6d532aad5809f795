"""The sandbox contains hostile programs, and check_code decides its verdicts outside it.

Each hostile program runs with small limits (at most a few seconds); after every test no sandbox process may be
left running. Protections this machine cannot provide are skipped with the isolation the probe found.
"""

import json
import os
import socket
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from align.tasks import generate_problems
from reward.sandbox import UNPRIVILEGED_UIDS, SandboxLimits, isolation, run_untrusted
from reward.verifiers import _RESULTS_MARKER, _harness_program, check_code, check_task, split_call_test

FAST = SandboxLimits(wall_seconds=3, cpu_seconds=2, memory_bytes=256 << 20, output_bytes=16 << 10)
ISOLATION = isolation()
needs_namespaces = pytest.mark.skipif(
    not ISOLATION.has_namespaces, reason=f"isolation here is {ISOLATION.mode!r}: {ISOLATION.summary}")
needs_uid_drop = pytest.mark.skipif(
    not ISOLATION.drops_to_uid, reason=f"isolation here is {ISOLATION.mode!r}, which keeps the caller's uid")

TESTS = ["assert scaled(2, -3) == 7", "assert scaled(0, 0) == 0", "assert scaled(10, 4) == 16"]
RIGHT = "def scaled(a, b):\n    return 2 * a - b"


def python_block(code: str) -> str:
    return f"Here is my solution:\n```python\n{code}\n```\n"


def live_sandbox_processes() -> list[int]:
    """Pids of processes (not zombies) running as a sandbox uid."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            status = dict(line.split(":", 1) for line in (entry / "status").read_text().splitlines() if ":" in line)
        except (OSError, ValueError):
            continue
        if int(status["Uid"].split()[0]) in UNPRIVILEGED_UIDS and not status["State"].strip().startswith("Z"):
            pids.append(int(entry.name))
    return pids


@pytest.fixture(autouse=True)
def nothing_left_running():
    yield
    deadline = time.monotonic() + 1.0
    while live_sandbox_processes() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert live_sandbox_processes() == []


# ---- normal programs ----------------------------------------------------------------------------------------------


def test_run_untrusted_reports_output_and_exit_status():
    result = run_untrusted("import sys, math\nprint(math.factorial(5))\nsys.exit(3)", limits=FAST)
    assert (result.ok, result.exit_code, result.stdout, result.reason) == (False, 3, "120\n", "exit status 3")
    assert run_untrusted("print('hello')", limits=FAST).ok


def test_correct_code_passes():
    verdict = check_code(python_block(RIGHT), TESTS)
    assert verdict.passed, verdict.reason
    assert verdict.reason == "all 3 tests passed"


def test_wrong_code_fails_with_the_first_wrong_value():
    verdict = check_code(python_block("def scaled(a, b):\n    return a - b"), TESTS)
    assert not verdict.passed
    assert verdict.reason == "test 1: got 5, expected 7"


def test_syntax_error_no_code_block_and_runtime_error():
    assert check_code(python_block("def scaled(a, b:\n    return a"), TESTS).reason.startswith("SyntaxError: ")
    assert check_code("The answer is scaled = lambda a, b: a - b.", TESTS).reason == "no ```python block"
    verdict = check_code(python_block("def scaled(a, b):\n    return a // 0"), TESTS)
    assert verdict.reason == "test 1: ZeroDivisionError: integer division or modulo by zero"


def test_tests_of_other_forms_run_as_asserts():
    tests = ["assert scaled(1, 1) in (0,)", "assert scaled(2, 1) == 1"]
    assert check_code(python_block("def scaled(a, b):\n    return a - b"), tests).passed
    verdict = check_code(python_block("def scaled(a, b):\n    return a + b"), tests)
    assert (verdict.passed, verdict.reason) == (False, "test 1: assertion failed")


def test_split_call_test_keeps_expected_values_out_of_the_sandbox():
    assert split_call_test("assert f(2, -3) == 7") == ("f(2, -3)", 7)
    assert split_call_test("assert g('a b') == ['a', 'b']") == ("g('a b')", ["a", "b"])
    assert split_call_test("assert h([1, 2]) == {'x': None}") == ("h([1, 2])", {"x": None})
    for other in ["assert f(1) in (1, 2)", "assert f(1) == (1, 2)", "assert f(1) == g(1)", "f(1) == 1",
                  "assert f(1) == 1 == 1", "assert f(1) == {1: 2}", "assert f(", "assert f(1) == 1e999"]:
        assert split_call_test(other) is None, other
    program = _harness_program("def f(x): return x", "calls", ["f(918273645)"])
    assert "918273645" in program and "537281" not in program  # the call goes in, `== 537281` never does


def test_reference_solutions_pass_and_mutants_fail_in_a_thread_pool_like_evaluate():
    problems = [p for level in (1, 2, 3) for p in generate_problems("code", level, 3, seed=7)]
    rows = [{"family": "code", "tests": list(p.tests)} for p in problems] * 2
    responses = [p.solution for p in problems] + [p.solution.replace("return ", "return 1 + ", 1) for p in problems]
    with ThreadPoolExecutor(max_workers=2) as pool:
        verdicts = list(pool.map(check_task, rows, responses))
    assert [v.passed for v in verdicts] == [True] * len(problems) + [False] * len(problems), verdicts


# ---- resource bombs -----------------------------------------------------------------------------------------------


def test_infinite_loop_is_killed_at_the_wall_clock():
    start = time.monotonic()
    result = run_untrusted("while True:\n    pass", limits=SandboxLimits(wall_seconds=1, cpu_seconds=5))
    assert (result.ok, result.reason) == (False, "timed out after 1s")
    assert time.monotonic() - start < 3
    verdict = check_code(python_block("def scaled(a, b):\n    while True:\n        pass"), TESTS, timeout=1)
    assert (verdict.passed, verdict.reason) == (False, "timed out after 1s")


def test_cpu_time_limit():
    result = run_untrusted("while True:\n    pass", limits=SandboxLimits(wall_seconds=4, cpu_seconds=1))
    assert not result.ok
    assert result.reason.startswith("CPU time limit of 1s reached")


@needs_namespaces
def test_sleeping_and_detached_processes_do_not_outlive_the_run():
    program = ("import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(60)\n"  # escapes the group
               "print('parent done')")
    result = run_untrusted(program, limits=FAST)
    assert result.ok and result.stdout == "parent done\n"
    result = run_untrusted("import os, time\nos.setsid()\ntime.sleep(60)", limits=SandboxLimits(wall_seconds=1))
    assert result.reason == "timed out after 1s"
    # the autouse fixture checks that neither sleeper survived


def test_fork_bomb_is_contained():
    program = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass"
    start = time.monotonic()
    result = run_untrusted(program, limits=SandboxLimits(wall_seconds=1.5, cpu_seconds=1))
    assert not result.ok
    assert time.monotonic() - start < 4


@needs_uid_drop
def test_fork_bomb_hits_the_process_limit():
    program = ("import os\nchildren = 0\nwhile True:\n    try:\n        pid = os.fork()\n    except OSError as error:\n"
               "        print(children, error.errno)\n        break\n    if pid == 0:\n        os.pause()\n"
               "    children += 1")
    result = run_untrusted(program, limits=SandboxLimits(wall_seconds=3, max_processes=4))
    assert result.ok, result.reason
    assert result.stdout == "3 11\n"  # EAGAIN once the program and its 3 children exist


def test_memory_bomb_gets_memory_error():
    result = run_untrusted("x = bytearray(8 << 30)", limits=FAST)
    assert (result.ok, result.reason) == (False, "MemoryError")
    result = run_untrusted("chunks = []\nwhile True:\n    chunks.append(bytearray(16 << 20))", limits=FAST)
    assert (result.ok, result.reason) == (False, "MemoryError")
    verdict = check_code(python_block("def scaled(a, b):\n    return len(bytearray(8 << 30))"), TESTS)
    assert verdict.reason == "test 1: MemoryError"


@pytest.mark.parametrize("stream", ["stdout", "stderr"])
def test_huge_output_is_cut_off(stream):
    start = time.monotonic()
    result = run_untrusted(f"import sys\nwhile True:\n    sys.{stream}.write('x' * 1000)", limits=FAST)
    assert (result.ok, result.reason) == (False, "output over 16 KiB")
    assert len(getattr(result, stream)) <= 16 << 10
    assert time.monotonic() - start < 2


@needs_namespaces
def test_huge_files_and_full_disk():
    result = run_untrusted("open('big', 'wb').write(bytes(2 << 20))", limits=SandboxLimits(file_bytes=1 << 20))
    assert result.reason == "OSError: [Errno 27] File too large"
    program = "for i in range(40):\n    open(f'/tmp/f{i}', 'wb').write(bytes((1 << 20) - 1))"
    result = run_untrusted(program, limits=SandboxLimits(disk_bytes=8 << 20))
    assert result.reason == "OSError: [Errno 28] No space left on device"


# ---- escapes ------------------------------------------------------------------------------------------------------


@needs_namespaces
def test_files_outside_the_sandbox_cannot_be_written_deleted_or_read(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("original")
    repo_file = Path(__file__).resolve().parent / "sandbox-escape-canary"
    tmp_escape = Path("/tmp") / f"sandbox-escape-{os.getpid()}"
    program = f"""
import os
attempts = [
    lambda: open({str(victim)!r}, "w").write("pwned"),
    lambda: os.remove({str(victim)!r}),
    lambda: open({str(tmp_path / "new.txt")!r}, "w").write("pwned"),
    lambda: open({str(repo_file)!r}, "w").write("pwned"),
    lambda: open("/usr/pwned", "w").write("pwned"),
    lambda: print(open({str(victim)!r}).read()),
    lambda: print(open({str(Path(__file__).resolve())!r}).read()[:20]),
    lambda: print(open("/etc/passwd").read()[:20]),
    lambda: print(os.listdir("/work")),
    lambda: print(os.listdir("/root/.pyenv/..")[:1], open("/root/.bashrc").read()[:20]),
]
for attempt in attempts:
    try:
        attempt()
        print("ESCAPED")
    except OSError as error:
        print(type(error).__name__)
open({str(tmp_escape)!r}, "w").write("private")  # its own /tmp, not the host's
open("inside.txt", "w").write("fine")  # and its own directory are writable
print(open("inside.txt").read())
"""
    result = run_untrusted(program, limits=FAST)
    assert result.ok, result.stderr
    assert "ESCAPED" not in result.stdout and result.stdout.endswith("fine\n")
    assert victim.read_text() == "original"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["victim.txt"]
    assert not repo_file.exists() and not tmp_escape.exists()


@needs_namespaces
def test_the_callers_environment_is_invisible(monkeypatch):
    secret = "sandbox-secret-" + os.urandom(8).hex()
    monkeypatch.setenv("QWEN_ALIGN_TEST_SECRET", secret)
    program = f"""
import os
print(dict(os.environ))
for pid in {[os.getpid(), os.getppid()]!r} + [os.getppid(), 1] + [int(p) for p in os.listdir("/proc") if p.isdigit()]:
    try:
        print(pid, open(f"/proc/{{pid}}/environ", "rb").read())
    except OSError as error:
        print(pid, type(error).__name__)
"""
    result = run_untrusted(program, limits=FAST)
    assert result.ok, result.stderr
    assert secret not in result.stdout + result.stderr
    assert f"{os.getpid()} FileNotFoundError" in result.stdout  # the caller is not even in its /proc
    code = "import os\ndef scaled(a, b):\n    return os.environ.get('QWEN_ALIGN_TEST_SECRET')"
    verdict = check_code(python_block(code), TESTS)
    assert verdict.reason == "test 1: got None, expected 7"


@needs_namespaces
def test_no_network():
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    listener.settimeout(0.3)
    abstract = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    abstract_name = f"\0qwen-align-sandbox-test-{os.getpid()}"
    abstract.bind(abstract_name)
    abstract.listen(4)
    abstract.settimeout(0.3)
    program = f"""
import socket
for family, address in [(socket.AF_INET, ("127.0.0.1", {listener.getsockname()[1]})),
                        (socket.AF_UNIX, {abstract_name!r}), (socket.AF_INET, ("1.1.1.1", 53))]:
    try:
        connection = socket.socket(family, socket.SOCK_STREAM)
        connection.settimeout(1)
        connection.connect(address)
        connection.sendall(b"escaped")
        print("CONNECTED")
    except OSError as error:
        print(type(error).__name__, error.errno)
"""
    try:
        result = run_untrusted(program, limits=FAST)
        for server in (listener, abstract):
            with pytest.raises(TimeoutError):
                server.accept()
    finally:
        listener.close()
        abstract.close()
    assert result.ok, result.stderr
    assert result.stdout == "OSError 101\nConnectionRefusedError 111\nOSError 101\n"  # ENETUNREACH, ECONNREFUSED


@needs_namespaces
def test_the_program_cannot_kill_its_caller_or_other_processes():
    canary = subprocess.Popen(["sleep", "30"], start_new_session=True)
    try:
        program = f"""
import os
for name, kill in [("parent", lambda: os.kill(os.getppid(), 9)), ("caller", lambda: os.kill({os.getpid()}, 9)),
                   ("canary", lambda: os.kill({canary.pid}, 9)), ("pid 1", lambda: os.kill(1, 9)),
                   ("everyone", lambda: os.kill(-1, 9))]:
    try:
        kill()
        print(name, "sent", flush=True)
    except OSError as error:
        print(name, type(error).__name__, flush=True)
print("still here", flush=True)
os.killpg(0, 9)
"""
        result = run_untrusted(program, limits=FAST)
        assert canary.poll() is None  # and this process is still running the test
    finally:
        canary.kill()
        canary.wait()
    assert not result.ok
    assert "caller ProcessLookupError" in result.stdout and "canary ProcessLookupError" in result.stdout
    assert "still here" in result.stdout  # kill(-1) reached only the program's own processes (none besides itself)
    assert result.reason == "killed by SIGKILL"  # os.killpg(0, 9) killed only the program itself


@needs_uid_drop
def test_the_program_runs_without_privileges():
    program = """
import os
print(os.getuid() != 0, os.getgid() != 0, os.getgroups())
print([line.split()[1] for line in open("/proc/self/status") if line.startswith(("CapEff", "CapPrm", "CapBnd"))])
for attempt in (lambda: os.setuid(0), lambda: os.chroot("."), lambda: os.mknod("null", 0o20666, os.makedev(1, 3))):
    try:
        attempt()
        print("ESCAPED")
    except OSError as error:
        print(type(error).__name__)
"""
    result = run_untrusted(program, limits=FAST)
    assert result.ok, result.stderr
    assert result.stdout == ("True True []\n['0000000000000000', '0000000000000000', '0000000000000000']\n"
                             "PermissionError\nPermissionError\nPermissionError\n")


# ---- faking a pass ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ending", ["import os\nos._exit(0)", "import sys\nsys.exit(0)", "raise SystemExit(0)"])
def test_exiting_early_does_not_pass(ending):
    verdict = check_code(python_block(f"def scaled(a, b):\n    return 0\n{ending}"), TESTS)
    assert not verdict.passed
    assert verdict.reason in ("exited before reporting test results", "SystemExit: 0")


def test_exiting_from_inside_the_tested_function_does_not_pass():
    code = "import os, sys\ndef scaled(a, b):\n    sys.stdout.flush()\n    os._exit(0)"
    assert check_code(python_block(code), TESTS).reason == "exited before reporting test results"


def test_expected_values_cannot_be_found_from_inside():
    # Looks for `== <number>` everywhere the old sentinel could be read: code objects of every frame, every string
    # the interpreter holds, its command line, the program file; returns what it finds for the first test.
    code = r"""
import gc, os, re, sys
def scaled(a, b):
    texts = []
    frame = sys._getframe()
    while frame is not None:
        texts += [repr(frame.f_code.co_consts), repr(frame.f_globals)[:100000]]
        frame = frame.f_back
    texts += [o for o in gc.get_objects() if isinstance(o, str)]
    for path in ("/proc/self/cmdline", "/proc/1/cmdline"):
        try:
            texts.append(open(path, "rb").read().decode(errors="replace"))
        except OSError:
            pass
    for text in texts:
        for found in re.findall(r"scaled\(2, -3\) == (-?\d+)", text):
            return int(found)
    return None
"""
    verdict = check_code(python_block(code), TESTS)
    assert verdict.reason == "test 1: got None, expected 7"


@pytest.mark.parametrize("value", [
    "type('AlwaysEqual', (), {'__eq__': lambda self, other: True, '__hash__': lambda self: 0})()",
    "type('Sly', (int,), {'__eq__': lambda self, other: True})(0)",
    "type('Sly', (list,), {'__eq__': lambda self, other: True})()",
])
def test_objects_that_claim_equality_are_refused(value):
    verdict = check_code(python_block(f"def scaled(a, b):\n    return {value}"), TESTS)
    assert not verdict.passed
    assert "which is not plain JSON data" in verdict.reason


def test_types_must_match_exactly():
    tests = ["assert flag(1) == True", "assert flag(0) == False"]
    assert check_code(python_block("def flag(x):\n    return x > 0"), tests).passed
    assert check_code(python_block("def flag(x):\n    return 1 if x else 0"), tests).reason == (
        "test 1: got 1, expected True")
    assert check_code(python_block("def scaled(a, b):\n    return 7.0"), TESTS).reason == "test 1: got 7.0, expected 7"


def test_returned_values_of_every_plain_kind_reach_the_caller_intact():
    # The harness encodes its report by hand (without importing json); the caller parses it with json.
    values = [None, True, False, 0, -12345678901234567890, 2.5, -0.0, 1e300, "", "quote \" slash \\ tab \t",
              "ünïcödé ✓ \u2028", [], [1, [2.5, ["x"]]], {}, {"a": [1, {"b": None}], "é": "ß"}]
    tests = [f"assert same({i}) == 0" for i in range(len(values))]
    code = f"def same(i):\n    return {values!r}[i]"
    result = run_untrusted(_harness_program(code, "calls", [f"same({i})" for i in range(len(values))]), limits=FAST)
    (line,) = [line for line in result.stdout.splitlines() if line.startswith(_RESULTS_MARKER)]
    assert json.loads(line[len(_RESULTS_MARKER):]) == [{"value": value} for value in values]
    assert check_code(python_block(code), tests).reason == "test 1: got None, expected 0"
    # Non-finite floats are not JSON: reported as that test's error, as json.dumps(allow_nan=False) would.
    verdict = check_code(python_block("def scaled(a, b):\n    return float('nan')"), TESTS)
    assert verdict.reason == "test 1: ValueError: Out of range float values are not JSON compliant"


def test_patching_the_harness_and_builtins_does_not_pass():
    forged = json.dumps([{"value": 7}] * 3)
    code = f"""
import atexit, builtins, json, sys
builtins.type = lambda value: int
builtins.isinstance = lambda value, kind: True
json.dumps = lambda *args, **kwargs: '{{"value": 7}}'
atexit.register(lambda: print({_RESULTS_MARKER + forged!r}))
class Everything:
    def __eq__(self, other):
        return True
def scaled(a, b):
    return Everything()
"""
    verdict = check_code(python_block(code), TESTS)
    assert not verdict.passed  # the forged values are 7, 7, 7: right for test 1 only
    assert verdict.reason == "test 2: got 7, expected 0"


def test_a_forged_report_does_not_pass():
    report = _RESULTS_MARKER + json.dumps([{"passed": True}] * 3)
    code = f"import os\nprint({report!r}, flush=True)\nos._exit(0)"
    verdict = check_code(python_block(code), TESTS)
    assert verdict.reason == "test 1: got None, expected 7"


@pytest.mark.xfail(strict=True, reason="asserts mode (tests not of the form `assert CALL == LITERAL`) trusts the "
                                       "process: code that knows the report format can forge it (documented)")
def test_a_forged_report_does_not_pass_in_asserts_mode():
    report = _RESULTS_MARKER + json.dumps([{"passed": True}] * 2)
    code = f"import os\nprint({report!r}, flush=True)\nos._exit(0)"
    assert not check_code(python_block(code), ["assert f(1) in (2,)", "assert f(2) in (3,)"]).passed
