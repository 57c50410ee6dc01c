"""Time grading all 164 canonical HumanEval solutions with an older sandbox.py and with today's (issue 25).

    python docs/sandbox-timing.py OLD_REVISION [HumanEval.jsonl.gz] [ROUNDS]
    e.g. python docs/sandbox-timing.py b94119d ../shared/data/humaneval/HumanEval.jsonl.gz 2

OLD_REVISION's sandbox.py (git show, into a temporary folder) and the working tree's, the latter with and without
its kernel layers (MEMGEN_SANDBOX_KERNEL=0), each grade the 164 canonical solutions with data/humaneval.grade_many
(2 workers) in a fresh process; the three take turns, ROUNDS times, so that load from other work on the machine
falls on all of them alike. Writes docs/sandbox-timing.json: every run's wall-clock seconds, CPU seconds of the
sandboxed processes and the load average before it; the medians and their ratios to the old version.
"""

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CHILD = r"""
import json, resource, sys, time
sys.path[:0] = [sys.argv[1], sys.argv[2]]  # the sandbox.py under test first, then the repository
import sandbox
from data import humaneval
rows = humaneval.load("test", sys.argv[3])
t0 = time.perf_counter()
ok = humaneval.grade_many(rows, [r["target"] for r in rows], workers=2)
seconds = time.perf_counter() - t0
children = resource.getrusage(resource.RUSAGE_CHILDREN)
cpu = children.ru_utime + children.ru_stime  # every sandboxed process, waited for
layers = sandbox.isolation()["layers"] if hasattr(sandbox, "isolation") else ["resource limits", "python guard"]
print(json.dumps({"seconds": round(seconds, 3), "cpu_seconds": round(cpu, 3), "passed": sum(ok), "of": len(ok),
                  "layers": layers}))
"""


def main(old_revision, data, rounds):
    old = subprocess.run(["git", "-C", REPO, "show", f"{old_revision}:sandbox.py"], check=True,
                         capture_output=True, text=True).stdout
    new_revision = subprocess.run(["git", "-C", REPO, "rev-parse", "--short", "HEAD"], check=True,
                                  capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", REPO, "diff", "--quiet", "HEAD", "--", "sandbox.py"]).returncode != 0
    with tempfile.TemporaryDirectory() as old_dir:
        with open(os.path.join(old_dir, "sandbox.py"), "w") as f:
            f.write(old)
        variants = {f"old ({old_revision})": (old_dir, {}),
                    f"new ({new_revision}{'+changes' if dirty else ''})": (REPO, {}),
                    "new, kernel layers off": (REPO, {"MEMGEN_SANDBOX_KERNEL": "0"})}
        runs = []
        for i in range(rounds):
            for name, (folder, env) in variants.items():
                load = os.getloadavg()[0]
                out = subprocess.run([sys.executable, "-c", CHILD, folder, REPO, data], check=True, text=True,
                                     capture_output=True, env={**os.environ, **env}, cwd=REPO).stdout
                runs.append({"round": i + 1, "variant": name, "load_before": round(load, 2), **json.loads(out)})
                print(json.dumps(runs[-1]), flush=True)
    old_name, new_name, off_name = variants
    result = {"command": f"python docs/sandbox-timing.py {old_revision} HumanEval.jsonl.gz {rounds}",
              "machine": {"cpus": os.cpu_count(), "kernel": platform.release(), "python": platform.python_version(),
                          "euid": os.geteuid()},
              "runs": runs}
    for key in ("seconds", "cpu_seconds"):  # wall clock, and CPU time of the sandboxed processes (user + system)
        median = {name: statistics.median(r[key] for r in runs if r["variant"] == name) for name in variants}
        result[f"median_{key}"] = median
        result[f"ratio_{key}_new_to_old"] = round(median[new_name] / median[old_name], 3)
        result[f"ratio_{key}_new_kernel_off_to_old"] = round(median[off_name] / median[old_name], 3)
    with open(os.path.join(REPO, "docs", "sandbox-timing.json"), "w") as f:
        json.dump(result, f, indent=1)
        f.write("\n")
    print(json.dumps({k: v for k, v in result.items() if k.startswith(("median", "ratio"))}))


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else os.path.join(REPO, "..", "shared", "data", "humaneval",
                                                                            "HumanEval.jsonl.gz"),
         int(sys.argv[3]) if len(sys.argv) > 3 else 2)
