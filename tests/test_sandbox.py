"""sandbox.py: limits, the guard, the kernel layers, cleanup. Each escape attempt is checked from the outside: a
snapshot of a folder in pytest's tmp_path (a sentinel file and a sentinel folder) must be unchanged afterwards, a
file must not appear, a process must still be alive or must be gone. Attacks on a kernel layer skip, naming the
reason, where this machine does not give that layer (sandbox.isolation() says which); each such attack also runs
with kernel=False where that is safe, to show that the check would see it get through."""

import functools
import json
import os
import random
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

import sandbox
from sandbox import SandboxError, run, run_many

GUARD_MESSAGE = "memgen sandbox:"


@functools.cache
def isolation():
    return sandbox.isolation()


def require(*layers):
    """Skip the calling test unless every named kernel layer is in force here; the reason says why it is not."""
    missing = [m for m in isolation()["missing"] if m.split(":")[0] in layers]
    if missing:
        pytest.skip("; ".join(missing))


def live_members(pgid):
    """Pids of the processes in process group `pgid` that are still alive (zombies wait for init, not us)."""
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = open(f"/proc/{pid}/stat").read()
        except OSError:
            continue  # exited while we looked
        state, _, pgrp = stat.rsplit(")", 1)[1].split()[:3]  # after "pid (comm)": state ppid pgrp ...
        if int(pgrp) == pgid and state != "Z":
            pids.append(int(pid))
    return pids


def group_gone(pgid, wait_s=3.0):
    """True once no live process is left in process group `pgid` (SIGKILL takes a moment to land)."""
    deadline = time.monotonic() + wait_s
    while live_members(pgid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def snapshot(folder):
    """Every path under folder with its bytes (files), mode and mtime: any change shows up."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(folder):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            data = open(p, "rb").read() if os.path.isfile(p) else None
            out[os.path.relpath(p, folder)] = (data, st.st_mode, st.st_mtime_ns)
    return out


@pytest.fixture
def outside(tmp_path):
    """A folder outside the sandbox holding sentinel.txt and sentinel_dir/keep.txt; `new` names a file that
    must not appear."""
    (tmp_path / "sentinel.txt").write_text("keep me\n")
    (tmp_path / "sentinel_dir").mkdir()
    (tmp_path / "sentinel_dir" / "keep.txt").write_text("keep me too\n")
    return tmp_path


def program(template, folder):
    return textwrap.dedent(template).format(sentinel=folder / "sentinel.txt", sentinel_dir=folder / "sentinel_dir",
                                            new=folder / "new.txt")


# -----------------------------------------------------------------------------
# time, memory, processes

def test_infinite_loop_is_killed_on_time():
    t0 = time.monotonic()
    r = run("while True:\n    pass\n", timeout=1.0)
    assert time.monotonic() - t0 < 1.0 + 2
    assert r["timed_out"] and not r["ok"] and r["returncode"] == -signal.SIGKILL
    assert group_gone(r["pid"])


def test_timeout_kills_the_whole_process_group():
    # guard off so that the program can fork (possible as root, where RLIMIT_NPROC is not enforced); the
    # grandchild sleeps in the same process group and must die with it
    code = """
        import os, time
        try:
            if os.fork() == 0:
                time.sleep(60)
        except OSError:
            pass  # RLIMIT_NPROC: no grandchild, the group check below still holds
        while True:
            pass
    """
    r = run(textwrap.dedent(code), timeout=1.0, guard=False)
    assert r["timed_out"]
    assert group_gone(r["pid"])


def test_processes_left_behind_are_killed_too():
    code = """
        import os, time
        try:
            if os.fork() == 0:
                time.sleep(60)
        except OSError:
            pass
        print("parent done")
    """
    t0 = time.monotonic()
    r = run(textwrap.dedent(code), timeout=5.0, guard=False)
    assert r["ok"] and "parent done" in r["stdout"] and time.monotonic() - t0 < 4
    assert group_gone(r["pid"])


def test_cpu_limit():
    t0 = time.monotonic()
    r = run("while True:\n    pass\n", timeout=30.0, cpu_s=1)
    assert not r["timed_out"] and r["returncode"] in (-signal.SIGXCPU, -signal.SIGKILL)
    assert time.monotonic() - t0 < 10


@pytest.mark.parametrize("kernel", [True, False])
def test_a_death_by_signal_is_reported_as_one(kernel):
    # under the kernel layers the supervisor outside the PID namespace passes the program's end on as its own
    r = run("import ctypes\nctypes.string_at(0)", guard=False, kernel=kernel)
    assert r["returncode"] == -signal.SIGSEGV and not r["ok"], r


def test_huge_allocation_fails_in_the_child_only():
    before = resource.getrlimit(resource.RLIMIT_AS)
    r = run("x = bytearray(20 * 1024 ** 3)\nprint('allocated')\n")
    assert not r["ok"] and r["returncode"] != 0 and "MemoryError" in r["stderr"] and "allocated" not in r["stdout"]
    assert resource.getrlimit(resource.RLIMIT_AS) == before  # our own limits are untouched
    assert bytearray(64 << 20)  # and we can still allocate
    assert run("print('fine')")["stdout"] == "fine\n"


def test_fork_bomb_is_blocked_by_the_guard(outside):
    before = snapshot(outside)
    code = """
        import os, time
        for _ in range(100):
            if os.fork() == 0:
                time.sleep(30)
    """
    r = run(textwrap.dedent(code), timeout=3.0)
    assert not r["ok"] and "os.fork" in r["stderr"] and GUARD_MESSAGE in r["stderr"]
    assert group_gone(r["pid"])
    assert snapshot(outside) == before


def test_fork_is_refused_by_rlimit_nproc_without_the_guard():
    if os.geteuid() == 0:
        require("process limit")  # for root Linux does not enforce RLIMIT_NPROC: only the kernel layers' uid does
    code = """
        import os
        try:
            pid = os.fork()
        except OSError as e:
            print("fork refused", e.errno)
            raise SystemExit(3)
        if pid == 0:
            os._exit(0)
        os.waitpid(pid, 0)
        print("forked")
    """
    r = run(textwrap.dedent(code), guard=False)
    assert r["returncode"] == 3 and "fork refused" in r["stdout"]
    assert group_gone(r["pid"])


# -----------------------------------------------------------------------------
# the guard: nothing outside the working directory changes

ESCAPES = {
    "os.system": "import os\nos.system('touch {new}')",
    "subprocess.run": "import subprocess\nsubprocess.run(['touch', '{new}'])",
    "os.popen": "import os\nos.popen('touch {new}').read()",
    "os.remove": "import os\nos.remove('{sentinel}')",
    "os.unlink via posix": "import posix\nposix.unlink('{sentinel}')",
    "os.rename": "import os\nos.rename('{sentinel}', '{new}')",
    "os.chmod": "import os\nos.chmod('{sentinel}', 0o777)",
    "os.truncate": "import os\nos.truncate('{sentinel}', 0)",
    "os.utime": "import os\nos.utime('{sentinel}', (0, 0))",
    "shutil.rmtree": "import shutil\nshutil.rmtree('{sentinel_dir}')",
    "shutil.move": "import shutil\nshutil.move('{sentinel}', '{new}')",
    "open w": "open('{new}', 'w').write('x')",
    "open a": "open('{sentinel}', 'a').write('x')",
    "open r+": "open('{sentinel}', 'r+').write('x')",
    "io.open": "import io\nio.open('{new}', 'wb').write(b'x')",
    "pathlib": "import pathlib\npathlib.Path('{new}').write_text('x')",
    "os.open": "import os\nos.write(os.open('{new}', os.O_CREAT | os.O_WRONLY), b'x')",
    "os.mkdir": "import os\nos.mkdir('{sentinel_dir}/sub')",
    "shutil.copy": "import shutil\nshutil.copy('{sentinel}', '{new}')",
    "symlink": "import os\nos.symlink('{sentinel}', 'link')\nopen('link', 'w').write('x')",
    "ctypes": "import ctypes\nctypes.CDLL(None).unlink(b'{sentinel}')",
}


LAYERS = {"guard alone": {"kernel": False}, "guard and kernel": {}, "kernel alone": {"guard": False}}


@pytest.mark.parametrize("layers", LAYERS)
@pytest.mark.parametrize("name", ESCAPES)
def test_escape_is_contained(name, layers, outside):
    if layers == "kernel alone":
        require("read-only filesystem", "process limit")
    before = snapshot(outside)
    r = run(program(ESCAPES[name], outside), **LAYERS[layers])
    if layers == "guard alone":  # the guard still works where there are no namespaces
        assert not r["ok"], r
        assert GUARD_MESSAGE in r["stderr"] or "ctypes" in r["stderr"], r["stderr"]
    assert snapshot(outside) == before  # (kernel alone: os.system just returns -1 when it cannot fork)


def test_the_snapshot_would_see_an_escape_without_the_guard(outside):
    # proves the checks above can fail: with the guard off the same writes go through
    before = snapshot(outside)
    r = run(program("open('{new}', 'w').write('x')\nopen('{sentinel}', 'a').write('x')", outside), guard=False,
            kernel=False)
    assert r["ok"], r["stderr"]
    after = snapshot(outside)
    assert after != before and "new.txt" in after


def test_files_inside_the_working_directory_stay_usable():
    code = """
        import os, pathlib, shutil, tempfile
        pathlib.Path("a.txt").write_text("hello")
        os.makedirs("d/e")
        os.rename("a.txt", "d/b.txt")
        shutil.copy("d/b.txt", "c.txt")
        with tempfile.NamedTemporaryFile() as f:
            f.write(b"x")
        os.remove("c.txt")
        print(open("d/b.txt").read(), sorted(os.listdir(".")))
    """
    r = run(textwrap.dedent(code))
    assert r["ok"], r["stderr"]
    assert r["stdout"] == "hello ['d']\n"


def test_the_guard_leaves_what_tests_use_working():
    code = """
        import collections, decimal, fractions, functools, hashlib, heapq, itertools, json, logging, math
        import random, re, statistics, string, threading, typing
        assert math.isclose(sum(itertools.accumulate([0.1] * 10)), 5.5)
        assert re.sub(r"a+", "b", "caat") == "cbt" and hashlib.md5(b"x").hexdigest()[:4] == "9dd4"
        print("ok")
    """
    r = run(textwrap.dedent(code))
    assert r["ok"] and r["stdout"] == "ok\n", r["stderr"]


# -----------------------------------------------------------------------------
# results, environment, cleanup

def test_program_outcomes():
    r = run("print(6 * 7)")
    assert r.pop("pid") > 0
    assert r == {"ok": True, "returncode": 0, "timed_out": False, "stdout": "42\n", "stderr": ""}
    r = run("def f(:\n    pass\n")
    assert not r["ok"] and r["returncode"] == 1 and "SyntaxError" in r["stderr"]
    r = run("1 / 0")
    assert not r["ok"] and "ZeroDivisionError" in r["stderr"]
    assert run("import sys\nsys.exit(3)")["returncode"] == 3
    assert run("import sys\nsys.exit(0)")["ok"]  # exit 0 is ok here; data/humaneval.py needs its marker too
    assert run("\x00")["returncode"] == 1  # unparsable source is just a failing program
    assert run("print('\udcff')")["stdout"] == "?\n"  # a lone surrogate (bad model decode) becomes '?'


def test_environment_stdin_and_temp_dir():
    code = """
        import os, sys
        print(os.getcwd())
        print(sorted(os.environ))
        print(os.environ["HOME"] == os.environ["TMPDIR"] == os.getcwd())
        print(sys.flags.isolated, sys.flags.no_site)
        input()
    """
    r = run(textwrap.dedent(code))
    cwd, env, home, flags = r["stdout"].splitlines()
    assert env == "['HOME', 'LANG', 'PATH', 'TMPDIR']" and home == "True" and flags == "1 1"
    assert "EOFError" in r["stderr"]  # stdin is closed
    assert not os.path.exists(cwd) and not os.path.exists(os.path.dirname(cwd))  # removed afterwards


def test_output_is_truncated_to_its_tail():
    r = run("print('a' * 50000 + 'END')", max_output=1000)
    assert r["ok"] and r["stdout"].endswith("aEND\n") and "bytes cut]" in r["stdout"]
    assert len(r["stdout"]) < 1100
    r = run(f"import sys\nsys.stdout.write('x' * ({sandbox.MAX_FILE_MB + 1} << 20))")
    assert not r["ok"] and "File too large" in r["stderr"]  # RLIMIT_FSIZE caps what a program can write


def test_run_many_keeps_order_and_runs_in_parallel():
    out = run_many([f"print({i})" for i in range(5)], workers=2)
    assert [r["stdout"] for r in out] == [f"{i}\n" for i in range(5)]
    assert run_many([]) == []
    t0 = time.monotonic()
    assert all(r["ok"] for r in run_many(["import time\ntime.sleep(1.5)"] * 2, workers=2))
    assert time.monotonic() - t0 < 2.8  # one after the other would take 3 s


@pytest.mark.parametrize("call, message", [
    (lambda: run(b"print(1)"), "code must be a str"),
    (lambda: run("1", timeout=0), "timeout must be a positive number"),
    (lambda: run("1", memory_mb=10), "memory_mb must be an int >= 64"),
    (lambda: run("1", cpu_s=0.5), "cpu_s must be a whole number"),
    (lambda: run("1", max_output=-1), "max_output must be an int >= 0"),
    (lambda: run_many(["1"], workers=0), "workers must be an int >= 1"),
    (lambda: run_many(["1", None]), "code must be a str"),
])
def test_bad_arguments(call, message):
    with pytest.raises(SandboxError, match=message) as e:
        call()
    assert isinstance(e.value, ValueError)


# -----------------------------------------------------------------------------
# the kernel layers: attacks that walk around the guard, or that it never covered

@pytest.fixture
def open_dir():
    """A world-writable folder outside pytest's private tmp_path: any uid may write here, so only a read-only
    mount keeps a program out."""
    d = Path(tempfile.mkdtemp(prefix="memgen-test-"))
    d.chmod(0o777)
    yield d
    shutil.rmtree(d)


LOW_LEVEL_WRITE = "import _io\n_io.FileIO('{target}', 'w').write(b'x')"  # the C file object under the patched open


@pytest.mark.parametrize("kernel", [True, False])
def test_write_through_a_low_level_file_api(kernel, open_dir):
    if kernel:
        require("read-only filesystem")
    r = run(LOW_LEVEL_WRITE.format(target=open_dir / "new.txt"), kernel=kernel)
    if kernel:
        assert not r["ok"] and "Read-only file system" in r["stderr"], r
        assert not (open_dir / "new.txt").exists()
    else:  # the guard alone misses this route: the check above can fail
        assert r["ok"] and (open_dir / "new.txt").exists(), r


REIMPORT = """
    import sys
    for name in ("os", "posix"):  # the guard patched these module objects; a re-import builds unpatched ones
        del sys.modules[name]
    import posix
    print("system:", posix.system("touch {open_dir}/by_system"), flush=True)  # fork + exec of a shell
    posix.execv("/bin/sh", ["sh", "-c", "echo hi > {open_dir}/by_exec"])  # no fork: the shell replaces us
"""


@pytest.mark.parametrize("kernel", [True, False])
def test_reimporting_a_blocked_module(kernel, open_dir):
    if kernel:
        require("read-only filesystem", "process limit")
    r = run(textwrap.dedent(REIMPORT).format(open_dir=open_dir), kernel=kernel)
    made = sorted(os.listdir(open_dir))
    if kernel:
        assert made == [] and "system: 0" not in r["stdout"], r
    else:
        assert made == ["by_exec", "by_system"], r


CONNECT = """
    import socket
    try:
        socket.create_connection(("127.0.0.1", {port}), timeout=2).sendall(b"hello")
        print("connected")
    except OSError as e:
        print("refused:", e)
"""


@pytest.mark.parametrize("kernel", [True, False])
def test_tcp_connection_to_a_server_on_the_loopback(kernel):
    if kernel:
        require("network namespace")
    with socket.socket() as server:  # listen() alone completes connections: no thread, nothing left running
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        r = run(textwrap.dedent(CONNECT).format(port=server.getsockname()[1]), kernel=kernel)
        server.setblocking(False)
        try:
            server.accept()[0].close()
            reached = True
        except BlockingIOError:
            reached = False
    assert reached == (not kernel) and ("connected" in r["stdout"]) == (not kernel), r
    if kernel:
        assert "Network is unreachable" in r["stdout"]


def survivors(marker):
    """Pids of live processes whose command line is `sleep <marker>`."""
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read()
            with open(f"/proc/{pid}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if cmdline == b"sleep\0" + marker.encode() + b"\0" and state != "Z":
            pids.append(int(pid))
    return pids


OUTLIVE = """
    import os
    if os.fork() == 0:
        os.setsid()  # a session of its own: out of the process group that the grader kills
        os.execv("/bin/sleep", ["sleep", "{marker}"])
    print("parent done", flush=True)
    while {loop}:
        pass
"""


@pytest.mark.parametrize("ending", ["exits", "times out"])
@pytest.mark.parametrize("kernel", [True, False])
def test_a_process_that_outlives_the_program_is_gone_when_run_returns(kernel, ending, monkeypatch):
    if kernel:
        require("pid namespace")
    elif os.geteuid() != 0:
        pytest.skip("the control needs fork without the kernel layers, which RLIMIT_NPROC forbids when not root")
    monkeypatch.setattr(sandbox, "MAX_PROCESSES", 20)  # let it fork: this attacks the PID namespace, not the limit
    marker = f"{40 + random.random():.9f}"  # seconds to sleep, and a command line no other process has
    try:
        r = run(textwrap.dedent(OUTLIVE).format(marker=marker, loop=ending == "times out"), timeout=1.0,
                guard=False, kernel=kernel)
        assert "parent done" in r["stdout"] and r["timed_out"] == (ending == "times out"), r
        assert bool(survivors(marker)) == (not kernel)  # today's process-group kill misses the new session
    finally:
        for pid in survivors(marker):
            os.kill(pid, signal.SIGKILL)


def test_signals_to_the_grader_and_its_processes():
    require("pid namespace")
    victim = subprocess.Popen(["sleep", "30"])  # a process of the grader's, with the grader's uid
    code = f"""
        import os, signal
        for pid, sig in (({victim.pid}, signal.SIGKILL), ({os.getpid()}, 0), ({os.getppid()}, 0)):
            try:
                os.kill(pid, sig)
                print("signalled", pid)
            except OSError as e:
                print("refused", type(e).__name__)
        os.kill(-1, signal.SIGKILL)  # every process it may signal: inside its namespace, only its own
        print("still here")
    """
    try:
        r = run(textwrap.dedent(code), guard=False)
        time.sleep(0.2)  # a SIGKILL that got through would have landed by now
        assert victim.poll() is None, r
        assert r["stdout"].count("refused ProcessLookupError") == 3 and "signalled" not in r["stdout"], r
    finally:
        victim.kill()
        victim.wait()


def test_reading_a_file_only_the_graders_user_may_read():
    require("unprivileged uid")
    folder = Path(tempfile.mkdtemp(prefix="memgen-test-"))
    try:
        folder.chmod(0o755)
        (folder / "public.txt").write_text("public words")
        (folder / "secret.txt").write_text("secret words")
        (folder / "secret.txt").chmod(0o600)
        code = f"""
            print(open("{folder}/public.txt").read())
            try:
                print(open("{folder}/secret.txt").read())
            except PermissionError:
                print("refused")
        """
        r = run(textwrap.dedent(code), guard=False)
        assert r["stdout"] == "public words\nrefused\n", r
        if os.geteuid() == 0:  # control: without its own uid the program reads what root reads
            assert "secret words" in run(textwrap.dedent(code), guard=False, kernel=False)["stdout"]
    finally:
        shutil.rmtree(folder)


def test_the_working_folder_cannot_fill_the_disk(monkeypatch):
    require("read-only filesystem")  # the only writable place left is the working folder, a tmpfs of WORK_MB
    monkeypatch.setattr(sandbox, "WORK_MB", 4)
    code = """
        written = 0
        try:
            for i in range(100):
                with open(f"f{i}", "wb") as f:
                    f.write(bytes(1 << 20))
                written += 1
        except OSError as e:
            print("full after", written, "MB:", e.strerror)
    """
    r = run(textwrap.dedent(code))
    assert r["ok"] and "No space left on device" in r["stdout"] and int(r["stdout"].split()[2]) <= 4, r


def test_fork_bomb_as_root():
    require("process limit")
    code = """
        import os, time
        n = 0
        try:
            for _ in range(10_000):
                if os.fork() == 0:
                    time.sleep(30)
                    os._exit(0)
                n += 1
        except OSError as e:
            print("refused after", n, e.strerror)
    """
    t0 = time.monotonic()
    r = run(textwrap.dedent(code), guard=False, timeout=10.0)
    assert r["ok"] and r["stdout"].startswith("refused after 0 "), r
    assert time.monotonic() - t0 < 5 and group_gone(r["pid"])


# -----------------------------------------------------------------------------
# what is in force, and turning the kernel layers off

def test_isolation_reports_what_a_program_sees():
    iso = isolation()
    kernel_layers = set(sandbox.KERNEL_LAYERS) | {"user namespace without capabilities"}
    assert set(iso["layers"]) <= kernel_layers | {"resource limits", "python guard"}
    assert iso["layers"][-2:] == ["resource limits", "python guard"]
    for name in sandbox.KERNEL_LAYERS:  # each layer is either in force or named as missing, with a reason
        assert (name in iso["layers"]) + sum(m.startswith(f"{name}: ") for m in iso["missing"]) == 1
    assert iso["kernel"] or not set(iso["layers"]) & kernel_layers
    pid = int(run("import os\nprint(os.getpid())")["stdout"])
    assert (pid == 1) == ("pid namespace" in iso["layers"])
    assert int(run("import os\nprint(os.getpid())", kernel=False)["stdout"]) != 1


def test_kernel_layers_turn_off(monkeypatch):
    off = sandbox.isolation(kernel=False)
    assert off["kernel"] is False and off["layers"] == ["resource limits", "python guard"]
    assert len(off["missing"]) == len(sandbox.KERNEL_LAYERS) and all("turned off" in m for m in off["missing"])
    monkeypatch.setattr(sandbox, "KERNEL", False)
    assert sandbox.isolation() == off
    r = run("import os\nprint(len([p for p in os.listdir('/proc') if p.isdigit()]) > 2, os.getuid())")
    assert r["stdout"] == f"True {os.getuid()}\n"  # it sees the machine's processes and keeps our uid
    env = {**os.environ, "MEMGEN_SANDBOX_KERNEL": "0"}
    out = subprocess.run([sys.executable, "-c", "import sandbox; print(sandbox.isolation()['kernel'])"], env=env,
                         capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert out.stdout == "False\n", out.stderr


def test_a_machine_that_forbids_namespaces_falls_back_to_the_guard(tmp_path, monkeypatch, outside):
    fake = tmp_path / "unshare"  # what util-linux prints where the kernel or a container says no
    fake.write_text("#!/bin/sh\necho 'unshare: unshare failed: Operation not permitted' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setattr(sandbox, "UNSHARE", str(fake))
    monkeypatch.setattr(sandbox, "_probed", {})
    iso = sandbox.isolation()
    assert iso["kernel"] is False and iso["layers"] == ["resource limits", "python guard"]
    assert iso["missing"][0] == "network namespace: unshare failed (unshare: unshare failed: Operation not permitted)"
    before = snapshot(outside)
    r = run(program(ESCAPES["os.remove"], outside))
    assert GUARD_MESSAGE in r["stderr"] and snapshot(outside) == before
    assert int(run("import os\nprint(os.getpid())")["stdout"]) != 1  # no PID namespace: the guard alone
    monkeypatch.setattr(sandbox, "UNSHARE", str(tmp_path / "absent"))
    monkeypatch.setattr(sandbox, "_probed", {})
    assert sandbox.isolation()["kernel"] is False and run("print(1)")["ok"]


def test_user_namespace_mode_as_a_grader_that_is_not_root():
    # the mode a non-root grader gets; forced here so that a root machine tests it too (as root the uid is
    # still root's, so the process limit is not enforced in this mode: that part only holds for a real user)
    require("pid namespace")
    r = sandbox._execute(sandbox.PROBE, 20.0, sandbox.MEMORY_MB, None, sandbox.MAX_OUTPUT, False, "userns")
    if not r["ok"]:
        pytest.skip(f"no user namespaces here: {r['stderr'].strip()}")
    assert set(r["stdout"].strip()[1:-1].replace('"', "").split(", ")) >= {
        "network namespace", "pid namespace", "read-only filesystem", "user namespace without capabilities"}, r


def test_eval_prints_and_records_what_contains_the_graded_code(long_folder, tmp_path, monkeypatch, capsys):
    import eval as ev

    monkeypatch.chdir(tmp_path)
    fixture = Path(__file__).parent / "fixtures" / "humaneval5.jsonl"
    summary = ev.main(["--model", long_folder, "--data", f"humaneval:{fixture}", "--limit", "2", "--max-new-tokens",
                       "4", "--dtype", "float32", "--progress=false", "--results-md", ""])
    assert summary["sandbox"] == sandbox.isolation()
    saved = json.loads(next(tmp_path.glob("out/eval/*/summary.json")).read_text())
    assert saved["sandbox"] == summary["sandbox"]
    assert f"sandbox: {', '.join(summary['sandbox']['layers'])}" in capsys.readouterr().err
