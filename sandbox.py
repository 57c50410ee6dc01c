"""sandbox.py: run a Python program that a model wrote, in its own process, contained by the kernel where it can.

    run(code, timeout=5.0, memory_mb=1024, cpu_s=None, max_output=10_000, guard=True, kernel=None)
        -> {"ok", "returncode", "timed_out", "stdout", "stderr", "pid"}
    run_many(codes, workers=2, **run_kwargs) -> [result, ...] in the order of codes
    isolation() -> {"kernel", "layers", "missing"}: what is in force on this machine, measured by a probe program

Every program gets:
  - its own interpreter (`python -I -S`: no environment variables, no user or site packages, stdlib only) in a
    new session; a fresh temporary working directory (also HOME and TMPDIR), deleted afterwards; stdin closed; an
    environment holding only PATH, LANG, HOME and TMPDIR;
  - resource limits, set in the child before the program runs: address space (memory_mb), CPU seconds, file size
    (which also caps stdout/stderr: they go to files), no new processes (RLIMIT_NPROC = 0), no core;
  - a wall-clock timeout; stdout/stderr come back as text, the last max_output bytes of each;
  - with guard=True (the default) a Python guard that disables the destructive parts of the standard library
    (process creation, signals, chown, changing directory, links, ctypes) and refuses to write, delete, rename or
    chmod files outside the working directory.

With kernel layers (Linux with util-linux `unshare` where namespaces are allowed; kernel=False or the environment
variable MEMGEN_SANDBOX_KERNEL=0 turns them off) the program also runs
  - in new network, PID, mount, IPC and UTS namespaces: no network but a loopback that is down; it is process 1
    of its PID namespace and sees and can signal only its own processes; when it ends or is killed, the kernel
    kills every process it left behind (its supervisor, the runner's first process, waits outside the namespace);
  - as a uid/gid of its own that owns no files (when the grader is root; then the kernel also enforces
    RLIMIT_NPROC), or without any capability in a user namespace (when the grader is not root);
  - with every mount read-only and nosuid, its working directory a small private tmpfs (WORK_MB), and no setuid
    programs (no_new_privs).
The guard stays on as a second layer. docs/sandbox.md says what each layer stops and what is still not stopped;
without the kernel layers (another OS, a kernel or container that forbids namespaces) this is a best-effort net
for honest mistakes of a model, not a security boundary: a guard written in Python can be walked around from
Python, and there is no network or file isolation.
"""

import itertools
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor

# -----------------------------------------------------------------------------
TIMEOUT_S = 5.0           # wall clock per program
MEMORY_MB = 1024          # address space; Python itself needs ~30 MB of it
MIN_MEMORY_MB = 64        # below this the interpreter cannot even start
MAX_OUTPUT = 10_000       # bytes of stdout and of stderr handed back (the tail: tracebacks and markers are last)
MAX_FILE_MB = 16          # no file the program writes, stdout/stderr included, grows past this
MAX_PROCESSES = 0         # RLIMIT_NPROC: 0 = no new process (tests raise it to attack the PID namespace)
WORK_MB = 64              # size of the private tmpfs that is the working directory under the kernel layers
PYTHON_FLAGS = ("-I", "-S")  # isolated mode, no site: faster start and no .pth code from site-packages
ENV = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}
KERNEL = os.environ.get("MEMGEN_SANDBOX_KERNEL", "1") != "0"  # 0: guard and limits only, even where namespaces work
UID_BASE = 2_000_000_000  # as root, each program runs as UID_BASE + a number unique among the programs running now
UNSHARE = shutil.which("unshare", path="/usr/bin:/bin:/usr/sbin:/sbin")
UNSHARE_FLAGS = ("--net", "--pid", "--mount", "--ipc", "--uts")  # no --fork: the runner forks (see RUNNER)

# The child runs this (python -c RUNNER program.py MEMORY_BYTES CPU_S FSIZE_BYTES NPROC GUARD CONTAIN WORK_MB):
# limits, then the guard, then the program as __main__. The limits are set here rather than in Popen's preexec_fn
# because run_many calls Popen from several threads, where preexec_fn is documented as unsafe (it can deadlock).
# CONTAIN is "-" (no kernel layers), a uid (the grader is root) or "userns". With one of the last two, `unshare`
# has put the runner in new namespaces (root there) except for the PID namespace, which only its children enter:
# contain() builds the mounts, then forks the program, which becomes process 1 of that PID namespace, while the
# runner stays outside it as a supervisor that waits and ends the way the program ended. (unshare --fork would cost
# a process and a wake-up more, and cannot pass on a death by signal.)
RUNNER = r'''
import os, resource, sys

_, path, memory, cpu, fsize, nproc, guard, contain_as, work_mb = sys.argv
with open(path, encoding="utf-8", errors="replace") as f:
    source = f.read()


def contain(contain_as, work_mb):
    import _ctypes  # the C half of ctypes: the ctypes package on top would cost more than the rest of this

    class Long(_ctypes._SimpleCData):
        _type_ = "l"  # every argument goes as a C long: syscall() is variadic

    class Libc:
        _handle = _ctypes.dlopen(None)

    def libc(name):
        class Function(_ctypes.CFuncPtr):
            _flags_ = _ctypes.FUNCFLAG_CDECL | _ctypes.FUNCFLAG_USE_ERRNO
            _restype_ = Long
        function = Function((name, Libc))

        def call(*args):
            if function(*[Long(a) if isinstance(a, int) else a for a in args]) == -1:
                e = _ctypes.get_errno()
                raise OSError(e, f"memgen sandbox: {name}{args[:2]}: {os.strerror(e)}")
        return call

    mount, syscall, prctl, capset = libc("mount"), libc("syscall"), libc("prctl"), libc("capset")
    MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_BIND, MS_REC = 1, 2, 4, 8, 4096, 16384
    ATTR_RDONLY, ATTR_NOSUID, AT_RECURSIVE, SYS_MOUNT_SETATTR = 1, 2, 0x8000, 442  # 442 on x86-64 and arm64

    def read_only(where):  # mount_setattr(2): every mount at and below `where` read-only and nosuid
        attr = b"".join(n.to_bytes(8, sys.byteorder) for n in (ATTR_RDONLY | ATTR_NOSUID, 0, 0, 0))
        try:
            syscall(SYS_MOUNT_SETATTR, -100, os.fsencode(where), AT_RECURSIVE, attr, len(attr))  # -100: AT_FDCWD
        except OSError as e:
            if e.errno != 38:  # ENOSYS (Linux < 5.12): no read-only layer; isolation() reports it
                raise

    uid = None if contain_as == "userns" else int(contain_as)
    work = os.getcwd()
    os.umask(0o022)
    read_only("/")
    if uid is not None:
        # The stdlib must stay readable for the program's uid. Python is often installed under a folder others may
        # not pass through (pyenv or conda in /root): lay a tmpfs over that folder holding only the stdlib folders
        # (bound from their real places) and the working directory's mount point.
        needed = sorted(p for p in sys.path if os.path.isdir(p))
        needed = [p for p in needed if not any(p.startswith(q + "/") for q in needed)] + [work]
        tops = {}
        for p in needed:
            ancestor = "/"
            for part in p.strip("/").split("/")[:-1]:
                ancestor = os.path.join(ancestor, part)
                if not os.stat(ancestor).st_mode & 0o001:
                    tops.setdefault(ancestor, []).append(p)
                    break
        for top, paths in tops.items():
            fds = {p: os.open(p, os.O_PATH) for p in paths if p != work}
            mount(b"tmpfs", os.fsencode(top), b"tmpfs", MS_NOSUID | MS_NODEV, b"mode=0755,size=1m")
            for p in paths:
                os.makedirs(p, mode=0o755, exist_ok=True)
                if p in fds:
                    mount(f"/proc/self/fd/{fds[p]}".encode(), os.fsencode(p), None, MS_BIND | MS_REC, None)
                    os.close(fds[p])
            read_only(top)
    owner = "" if uid is None else f",uid={uid},gid={uid}"
    mount(b"tmpfs", os.fsencode(work), b"tmpfs", MS_NOSUID | MS_NODEV,
          f"size={work_mb}m,nr_inodes=65536,mode=0700{owner}".encode())
    os.chdir(work)  # into the tmpfs that now covers it

    pid = os.fork()
    if pid:  # the supervisor. When the program (process 1) ends, the kernel kills every process it left behind
        status = os.waitpid(pid, 0)[1]  # and only then reports its end
        if os.WIFSIGNALED(status):
            import _signal
            resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
            if os.WTERMSIG(status) != _signal.SIGKILL:  # (SIGKILL's disposition cannot be set, nor needs to be)
                _signal.signal(os.WTERMSIG(status), _signal.SIG_DFL)
            os.kill(os.getpid(), os.WTERMSIG(status))
        os._exit(os.WEXITSTATUS(status) if os.WIFEXITED(status) else 1)
    try:  # a /proc that shows only this PID namespace
        mount(b"proc", b"/proc", b"proc", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC, None)
    except PermissionError:
        pass  # a container that hides parts of /proc forbids new ones: other processes stay visible, not reachable
    if uid is None:  # user namespace: drop every capability from all sets, for good
        for cap in range(64):
            try:
                prctl(24, cap, 0, 0, 0)  # PR_CAPBSET_DROP
            except OSError:
                break  # EINVAL: past the last capability
        capset((0x20080522).to_bytes(4, sys.byteorder) + bytes(4), bytes(24))  # version 3, this process: all zero
    else:  # root gives up its identity (and with it every capability) for a uid that owns nothing
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)
    prctl(38, 1, 0, 0, 0)  # PR_SET_NO_NEW_PRIVS: executing a setuid or file-capability program gains nothing


if contain_as != "-":
    contain(contain_as, int(work_mb))
del contain
for what, n in ((resource.RLIMIT_AS, memory), (resource.RLIMIT_CPU, cpu), (resource.RLIMIT_FSIZE, fsize),
                (resource.RLIMIT_NPROC, nproc), (resource.RLIMIT_CORE, 0)):
    hard = resource.getrlimit(what)[1]
    n = int(n) if hard == resource.RLIM_INFINITY else min(int(n), hard)
    resource.setrlimit(what, (n, n))  # soft = hard: the program cannot raise them again


def install_guard(root):
    import _posixsubprocess, builtins, faulthandler, io, os, posix

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
    # subprocess (Popen, run, ...) ends in fork_exec or posix_spawn, shutil's rmtree/move/chown in the os calls
    # patched above: importing the two here would cost more than the rest of the guard (re, enum, lzma, ...)
    _posixsubprocess.fork_exec = blocked("_posixsubprocess.fork_exec")
    for name in ("ctypes", "_ctypes"):  # foreign calls would reach libc directly
        sys.modules[name] = None


if guard == "1":
    install_guard(".")
del install_guard
exec(compile(source, path, "exec"), {"__name__": "__main__", "__file__": path, "__builtins__": __builtins__})
'''


# Run under the kernel layers (with guard=False) by isolation(): checks from the inside which layers took effect.
PROBE = r'''
import errno, json, os, socket
layers = []
try:
    socket.create_connection(("127.0.0.1", 9), timeout=2).close()
except OSError as e:
    if e.errno == errno.ENETUNREACH:  # a loopback that is down: no route even to ourselves
        layers.append("network namespace")
if os.getpid() == 1:  # the first process of a PID namespace of its own
    layers.append("pid namespace")
outside = os.path.dirname(os.path.dirname(os.getcwd()))  # the grader's temporary folder
if all(os.statvfs(p).f_flag & os.ST_RDONLY for p in ("/", outside)) and not os.statvfs(".").f_flag & os.ST_RDONLY:
    layers.append("read-only filesystem")
status = dict(line.split(":\t", 1) for line in open("/proc/self/status").read().splitlines() if ":\t" in line)
if os.getuid() != 0:
    layers.append("unprivileged uid")
elif open("/proc/self/uid_map").read().split() != ["0", "0", "4294967295"] and int(status["CapEff"], 16) == 0:
    layers.append("user namespace without capabilities")
try:
    pid = os.fork()
except OSError:
    layers.append("process limit")
else:
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
print(json.dumps(layers))
'''
KERNEL_LAYERS = ("network namespace", "pid namespace", "read-only filesystem", "unprivileged uid", "process limit")


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


def _kill_program(supervisor):
    """SIGKILL the program, process 1 of its PID namespace (the supervisor's child): the kernel then kills every
    process in that namespace before the supervisor can reap it, so waiting for the supervisor afterwards waits for
    all of them. False if there is no child (yet)."""
    try:
        with open(f"/proc/{supervisor}/task/{supervisor}/children") as f:
            children = [int(pid) for pid in f.read().split()]
    except OSError:
        return False
    for pid in children:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return bool(children)


_run_numbers = itertools.count()  # next() on it is atomic under the GIL: run_many's threads get distinct numbers


def _execute(code, timeout, memory_mb, cpu_s, max_output, guard, mode):
    """run() once its arguments are checked; mode: None (guard and limits only), "uid" or "userns"."""
    cpu_s = cpu_s if cpu_s is not None else math.ceil(timeout) + 1
    with tempfile.TemporaryDirectory(prefix="memgen-sandbox-") as root:
        work = os.path.join(root, "work")  # the program's cwd; its own source and outputs sit beside it
        os.mkdir(work)
        program = os.path.join(root, "program.py")
        with open(program, "w", encoding="utf-8", errors="replace") as f:  # lone surrogates -> '?'
            f.write(code)
        out_path, err_path = os.path.join(root, "stdout"), os.path.join(root, "stderr")
        contain_as = "-" if mode is None else mode
        if mode == "uid":  # distinct among the programs running now (several threads, several graders)
            contain_as = str(UID_BASE + (os.getpid() % 1000) * 1000 + next(_run_numbers) % 1000)
            os.chmod(root, 0o711)  # that uid may pass through to its working directory, not list or write here
        args = [sys.executable, *PYTHON_FLAGS, "-c", RUNNER, program, str(memory_mb << 20), str(cpu_s),
                str(MAX_FILE_MB << 20), str(MAX_PROCESSES), "1" if guard else "0", contain_as, str(WORK_MB)]
        if mode:
            args = [UNSHARE, *UNSHARE_FLAGS, *(("--user", "--map-root-user") if mode == "userns" else ()), *args]
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            proc = subprocess.Popen(args, cwd=work, env={**ENV, "HOME": work, "TMPDIR": work},
                                    stdin=subprocess.DEVNULL, stdout=out, stderr=err, start_new_session=True)
            try:
                proc.wait(timeout)
                timed_out = False
            except subprocess.TimeoutExpired:
                timed_out = True
                if mode and _kill_program(proc.pid):
                    try:
                        proc.wait(10)  # returns once the kernel has killed the whole namespace
                    except subprocess.TimeoutExpired:
                        pass
            _kill_group(proc.pid)  # on a timeout the program; otherwise any process it left behind
            returncode = proc.wait()
        return {"ok": returncode == 0 and not timed_out, "returncode": returncode, "timed_out": timed_out,
                "stdout": _tail(out_path, max_output), "stderr": _tail(err_path, max_output), "pid": proc.pid}


_probed = {}  # "mode" and "isolation", filled once by _probe
_probe_lock = threading.Lock()


def _probe():
    """Which kernel layers this machine gives (once per process): run PROBE under them and read what it saw."""
    with _probe_lock:
        if _probed:
            return _probed
        mode, layers, why = None, [], None
        if not sys.platform.startswith("linux"):
            why = f"not Linux ({sys.platform})"
        elif UNSHARE is None:
            why = "util-linux `unshare` not found"
        else:
            mode = "uid" if os.geteuid() == 0 else "userns"
            try:
                r = _execute(PROBE, 20.0, MEMORY_MB, None, MAX_OUTPUT, False, mode)
            except OSError as e:  # unshare cannot even be started
                r = {"ok": False, "stdout": "", "stderr": str(e), "returncode": None}
            try:
                layers = json.loads(r["stdout"].strip().splitlines()[-1]) if r["ok"] else None
            except (ValueError, IndexError):
                layers = None
            if layers is None:
                lines = r["stderr"].strip().splitlines()
                mode, layers, why = None, [], f"unshare failed ({lines[-1] if lines else r['returncode']})"
        missing = []
        for name in KERNEL_LAYERS:
            if name not in layers:
                missing.append(f"{name}: " + (why if mode is None else
                                              "the grader is not root: the program keeps the grader's uid in a user "
                                              "namespace" if name == "unprivileged uid" and mode == "userns" else
                                              "not in force on this machine (docs/sandbox.md)"))
        _probed.update(mode=mode, isolation={"kernel": mode is not None,
                                             "layers": layers + ["resource limits", "python guard"],
                                             "missing": missing})
        return _probed


def isolation(kernel=None):
    """What contains a program that run() starts here: {"kernel": bool, "layers": [what is in force],
    "missing": ["layer: why not"]}. kernel=None follows KERNEL (MEMGEN_SANDBOX_KERNEL), False: guard and limits only."""
    if not (KERNEL if kernel is None else kernel):
        return {"kernel": False, "layers": ["resource limits", "python guard"],
                "missing": [f"{name}: kernel layers turned off (kernel=False or MEMGEN_SANDBOX_KERNEL=0)"
                            for name in KERNEL_LAYERS]}
    return json.loads(json.dumps(_probe()["isolation"]))  # a copy: callers may change theirs


def run(code, timeout=TIMEOUT_S, memory_mb=MEMORY_MB, cpu_s=None, max_output=MAX_OUTPUT, guard=True, kernel=None):
    """Run `code` as a Python program in a fresh sandboxed process and wait for it (at most `timeout` s).

    cpu_s defaults to ceil(timeout) + 1 (a backstop: the wall clock normally fires first). guard=False leaves
    the standard library intact (tests use it to check the layers below alone); kernel=False runs without the
    kernel layers (None: as KERNEL says, where the machine allows them). Returns a dict: ok (exit code 0 and no
    timeout), returncode (negative: killed by that signal), timed_out, stdout, stderr, pid (also the id of the
    process group; it and every process the program started are gone when run returns).
    """
    _check(code, timeout, memory_mb, cpu_s, max_output)
    mode = _probe()["mode"] if (KERNEL if kernel is None else kernel) else None
    return _execute(code, timeout, memory_mb, cpu_s, max_output, guard, mode)


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
    if run_kwargs.get("kernel", KERNEL) is not False:
        _probe()  # once, before the threads start
    with ThreadPoolExecutor(max_workers=min(workers, len(codes))) as pool:
        return list(pool.map(lambda code: run(code, **run_kwargs), codes))
