"""sandbox.py: run a Python program that a model wrote, in its own process, with limits.

    run(code, timeout=5.0, memory_mb=1024, cpu_s=None, max_output=10_000, guard=True)
        -> {"ok", "returncode", "timed_out", "stdout", "stderr", "pid"}
    run_many(codes, workers=2, **run_kwargs) -> [result, ...] in the order of codes

What each program gets:
  - its own interpreter (`python -I -S`: no environment variables, no user or site packages, stdlib only) in a
    new session, so that on a timeout the whole process group is killed;
  - a fresh temporary working directory (also HOME and TMPDIR), deleted afterwards; stdin closed; an
    environment holding only PATH, LANG, HOME and TMPDIR;
  - resource limits, set in the child before the program runs: address space (memory_mb), CPU seconds,
    file size (which also caps stdout/stderr: they go to files), no new processes (RLIMIT_NPROC = 0), no core;
  - a wall-clock timeout; stdout/stderr come back as text, the last max_output bytes of each;
  - with guard=True (the default) a guard that disables the destructive parts of the standard library
    (process creation, signals, chown, changing directory, links, ctypes) and refuses to write, delete,
    rename or chmod files outside the working directory.

This is a best-effort net for honest mistakes of a model (a runaway loop, a huge allocation, a stray
os.remove), NOT a security boundary: a determined program can get around a guard written in Python, there is no
network isolation, and as root Linux does not enforce RLIMIT_NPROC. Run untrusted models in a container or VM.
"""

import math
import os
import signal
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor

# -----------------------------------------------------------------------------
TIMEOUT_S = 5.0           # wall clock per program
MEMORY_MB = 1024          # address space; Python itself needs ~30 MB of it
MIN_MEMORY_MB = 64        # below this the interpreter cannot even start
MAX_OUTPUT = 10_000       # bytes of stdout and of stderr handed back (the tail: tracebacks and markers are last)
MAX_FILE_MB = 16          # no file the program writes, stdout/stderr included, grows past this
PYTHON_FLAGS = ("-I", "-S")  # isolated mode, no site: faster start and no .pth code from site-packages
ENV = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}

# The child runs this (python -c RUNNER program.py MEMORY_BYTES CPU_S FSIZE_BYTES GUARD): limits first, then
# the guard, then the program as __main__. The limits are set here rather than in Popen's preexec_fn because
# run_many calls Popen from several threads, where preexec_fn is documented as unsafe (it can deadlock).
RUNNER = r'''
import resource, sys

_, path, memory, cpu, fsize, guard = sys.argv
for what, n in ((resource.RLIMIT_AS, memory), (resource.RLIMIT_CPU, cpu), (resource.RLIMIT_FSIZE, fsize),
                (resource.RLIMIT_NPROC, 0), (resource.RLIMIT_CORE, 0)):
    hard = resource.getrlimit(what)[1]
    n = int(n) if hard == resource.RLIM_INFINITY else min(int(n), hard)
    resource.setrlimit(what, (n, n))  # soft = hard: the program cannot raise them again
with open(path, encoding="utf-8", errors="replace") as f:
    source = f.read()


def install_guard(root):
    import _posixsubprocess, builtins, faulthandler, io, os, posix, shutil, subprocess

    faulthandler.disable()  # a crash is just a failure; no C-level dumps of the grader's state
    root = os.path.realpath(root)
    real_open, real_os_open = builtins.open, os.open
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

    def refuse(what):
        raise PermissionError(f"memgen sandbox: {what} is not allowed")

    def blocked(name):
        def stub(*args, **kwargs):
            refuse(name)
        return stub

    def inside(path):
        if isinstance(path, int):
            return True  # an fd: it was opened through a checked call (or is stdin/stdout/stderr)
        real = os.path.realpath(os.fsdecode(os.fspath(path)))
        return real == root or real.startswith(root + os.sep)

    def inside_only(name, real):
        def checked(*args, **kwargs):
            paths = [a for a in (*args, *kwargs.values()) if isinstance(a, (str, bytes, os.PathLike))]
            # a dir_fd makes a path relative to some other folder, which we cannot check cheaply
            if any("dir_fd" in k and v is not None for k, v in kwargs.items()) or not all(map(inside, paths)):
                refuse(f"{name} outside the sandbox folder")
            return real(*args, **kwargs)
        return checked

    def guarded_open(file, mode="r", *args, **kwargs):
        if isinstance(mode, str) and any(c in mode for c in "wax+") and not inside(file):
            refuse(f"writing {str(file)!r} outside the sandbox folder")
        return real_open(file, mode, *args, **kwargs)

    def guarded_os_open(path, flags, *args, **kwargs):
        if flags & write_flags and (kwargs.get("dir_fd") is not None or not inside(path)):
            refuse(f"writing {str(path)!r} outside the sandbox folder")
        return real_os_open(path, flags, *args, **kwargs)

    def patch(name, replacement):  # os and posix hold the same functions: patch both (no way around via posix)
        for module in (os, posix):
            if hasattr(module, name):
                setattr(module, name, replacement)

    for name in ("system", "popen", "fork", "forkpty", "posix_spawn", "posix_spawnp", "execv", "execve",
                 "kill", "killpg", "pidfd_open", "setsid", "setpgid", "setpgrp", "setuid", "setgid",
                 "setresuid", "setresgid", "chroot", "chdir", "fchdir", "chown", "fchown", "lchown",
                 "link", "symlink", "mkfifo", "mknod"):
        patch(name, blocked(f"os.{name}"))
    # files inside the working directory stay usable (tempfile, for one, creates and deletes files there);
    # os.removedirs/renames/makedirs go through these
    for name in ("remove", "unlink", "rmdir", "rename", "replace", "truncate", "chmod", "lchmod", "mkdir",
                 "utime"):
        if hasattr(os, name):
            patch(name, inside_only(f"os.{name}", getattr(os, name)))
    patch("open", guarded_os_open)
    builtins.open = io.open = guarded_open  # pathlib and most of the stdlib open files through io.open
    for name in ("rmtree", "move", "chown"):
        setattr(shutil, name, blocked(f"shutil.{name}"))
    subprocess.Popen = blocked("subprocess.Popen")  # run/call/check_output all go through Popen
    _posixsubprocess.fork_exec = blocked("_posixsubprocess.fork_exec")
    for name in ("ctypes", "_ctypes"):  # foreign calls would reach libc directly
        sys.modules[name] = None


if guard == "1":
    install_guard(".")
del install_guard
exec(compile(source, path, "exec"), {"__name__": "__main__", "__file__": path, "__builtins__": __builtins__})
'''


class SandboxError(ValueError):
    """A bad argument to run/run_many; the message names it."""


def _check(code, timeout, memory_mb, cpu_s, max_output):
    if not isinstance(code, str):
        raise SandboxError(f"code must be a str of Python source, got {type(code).__name__}")
    if not isinstance(timeout, (int, float)) or not timeout > 0:
        raise SandboxError(f"timeout must be a positive number of seconds, got {timeout!r}")
    if not isinstance(memory_mb, int) or memory_mb < MIN_MEMORY_MB:
        raise SandboxError(f"memory_mb must be an int >= {MIN_MEMORY_MB} (Python needs that much to start), "
                           f"got {memory_mb!r}")
    if cpu_s is not None and (not isinstance(cpu_s, int) or cpu_s < 1):
        raise SandboxError(f"cpu_s must be a whole number of seconds >= 1 (or None), got {cpu_s!r}")
    if not isinstance(max_output, int) or max_output < 0:
        raise SandboxError(f"max_output must be an int >= 0 (bytes), got {max_output!r}")


def _tail(path, n):
    """The last n bytes of a file as text, with a note of how much was cut."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        f.seek(max(0, size - n))
        text = f.read().decode("utf-8", errors="replace")
    return text if size <= n else f"[... {size - n} bytes cut]\n{text}"


def _kill_group(pgid):
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass  # the group is already gone


def run(code, timeout=TIMEOUT_S, memory_mb=MEMORY_MB, cpu_s=None, max_output=MAX_OUTPUT, guard=True):
    """Run `code` as a Python program in a fresh sandboxed process and wait for it (at most `timeout` s).

    cpu_s defaults to ceil(timeout) + 1 (a backstop: the wall clock normally fires first). guard=False leaves
    the standard library intact (tests use it to check the OS limits alone). Returns a dict:
    ok (exit code 0 and no timeout), returncode (negative: killed by that signal), timed_out, stdout, stderr,
    pid (also the id of the process group, which is gone when run returns).
    """
    _check(code, timeout, memory_mb, cpu_s, max_output)
    cpu_s = cpu_s if cpu_s is not None else math.ceil(timeout) + 1
    with tempfile.TemporaryDirectory(prefix="memgen-sandbox-") as root:
        work = os.path.join(root, "work")  # the program's cwd; its own source and outputs sit beside it
        os.mkdir(work)
        program = os.path.join(root, "program.py")
        with open(program, "w", encoding="utf-8", errors="replace") as f:  # lone surrogates -> '?'
            f.write(code)
        out_path, err_path = os.path.join(root, "stdout"), os.path.join(root, "stderr")
        args = [sys.executable, *PYTHON_FLAGS, "-c", RUNNER, program, str(memory_mb << 20), str(cpu_s),
                str(MAX_FILE_MB << 20), "1" if guard else "0"]
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            proc = subprocess.Popen(args, cwd=work, env={**ENV, "HOME": work, "TMPDIR": work},
                                    stdin=subprocess.DEVNULL, stdout=out, stderr=err, start_new_session=True)
            try:
                proc.wait(timeout)
                timed_out = False
            except subprocess.TimeoutExpired:
                timed_out = True
            _kill_group(proc.pid)  # on a timeout the program; otherwise any process it left behind
            returncode = proc.wait()
        return {"ok": returncode == 0 and not timed_out, "returncode": returncode, "timed_out": timed_out,
                "stdout": _tail(out_path, max_output), "stderr": _tail(err_path, max_output), "pid": proc.pid}


def run_many(codes, workers=2, **run_kwargs):
    """run() for each program, at most `workers` at a time (threads that each wait on one process)."""
    codes = list(codes)
    if not isinstance(workers, int) or workers < 1:
        raise SandboxError(f"workers must be an int >= 1, got {workers!r}")
    for code in codes:  # bad arguments fail here, in the caller, not inside a worker thread
        _check(code, run_kwargs.get("timeout", TIMEOUT_S), run_kwargs.get("memory_mb", MEMORY_MB),
               run_kwargs.get("cpu_s"), run_kwargs.get("max_output", MAX_OUTPUT))
    if not codes:
        return []
    with ThreadPoolExecutor(max_workers=min(workers, len(codes))) as pool:
        return list(pool.map(lambda code: run(code, **run_kwargs), codes))
