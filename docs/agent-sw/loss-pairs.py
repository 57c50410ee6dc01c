"""The training loss of LoRA-SFT and MemGen-SFT on ScienceWorld's gold trajectories (issue 27), step by step.

    python docs/agent-sw/loss-pairs.py

Both runs used the same seed and data, so each step trained on the same 4 trajectories (the script checks that the
target token counts agree step by step): the per-step losses pair. Reads the two committed logs beside it and writes
docs/agent-sw/loss-pairs.md: every step, and the mean over stretches of the schedule.
"""

import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))

import files  # noqa: E402

RUNS = {"LoRA-SFT": "train-sw-sft-lora-log.jsonl", "MemGen-SFT": "train-sw-memgen-log.jsonl"}
STRETCHES = ((1, 4), (5, 10), (11, 20))


def steps(name):
    with open(os.path.join(HERE, name)) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return {r["step"]: r for r in rows if "loss" in r}  # a resumed run logs a step again: the last one counts


def main():
    if len(sys.argv) != 1:
        sys.exit(__doc__)
    (a_name, a), (b_name, b) = [(label, steps(f)) for label, f in RUNS.items()]
    if sorted(a) != sorted(b) or any(a[s]["tokens"] != b[s]["tokens"] for s in a):
        sys.exit("loss-pairs.py: the two logs did not train on the same batches (steps or token counts differ)")
    lines = ["# Training loss on the same batches, step by step", "",
             "`python docs/agent-sw/loss-pairs.py`, from the two training logs:",
             " and ".join(f"[{f}]({f})" for f in RUNS.values()),
             "", f"| step | target tokens | {a_name} loss | {b_name} loss | {a_name} grad norm | {b_name} grad norm |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {s} | {a[s]['tokens']} | {a[s]['loss']:.3f} | {b[s]['loss']:.3f} | {a[s]['grad_norm']:.1f} | "
              f"{b[s]['grad_norm']:.1f} |" for s in sorted(a)]
    lines += ["", f"| steps | {a_name} mean loss | {b_name} mean loss | steps {b_name} lower |", "|---|---|---|---|"]
    for lo, hi in STRETCHES:
        s = [i for i in sorted(a) if lo <= i <= hi]
        if s:
            lines.append(f"| {lo}-{hi} | {sum(a[i]['loss'] for i in s) / len(s):.3f} | "
                         f"{sum(b[i]['loss'] for i in s) / len(s):.3f} | "
                         f"{sum(b[i]['loss'] < a[i]['loss'] for i in s)} of {len(s)} |")
    files.write_atomic(os.path.join(HERE, "loss-pairs.md"), "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
