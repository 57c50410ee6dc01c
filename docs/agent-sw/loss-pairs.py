"""The training loss of LoRA-SFT and MemGen-SFT on ScienceWorld's gold trajectories (issue 27), step by step.

    python docs/agent-sw/loss-pairs.py

All runs used the same seed and data, so each step trained on the same 4 trajectories (the script checks that the
target token counts agree step by step): the per-step losses pair. Reads the committed logs beside it (the two trained
from fresh adapters, and the continual stage's two, trained from the GSM8K adapters, where committed) and writes
docs/agent-sw/loss-pairs.md: every step, and the mean over stretches of the schedule.
"""

import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))

import files  # noqa: E402

# label: log; the continual stage's logs (trained from the GSM8K adapters) join when they are committed
RUNS = {"LoRA-SFT": "train-sw-sft-lora-log.jsonl", "MemGen-SFT": "train-sw-memgen-log.jsonl",
        "LoRA-SFT after GSM8K": "train-cl-sft-lora-log.jsonl", "MemGen-SFT after GSM8K": "train-cl-memgen-log.jsonl"}
# (a, b): on how many steps b's loss is below a's
PAIRS = (("LoRA-SFT", "MemGen-SFT"), ("LoRA-SFT", "LoRA-SFT after GSM8K"), ("MemGen-SFT", "MemGen-SFT after GSM8K"))
STRETCHES = ((1, 4), (5, 10), (11, 20))


def steps(name):
    with open(os.path.join(HERE, name)) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return {r["step"]: r for r in rows if "loss" in r}  # a resumed run logs a step again: the last one counts


def main():
    if len(sys.argv) != 1:
        sys.exit(__doc__)
    runs = {label: steps(f) for label, f in RUNS.items() if os.path.exists(os.path.join(HERE, f))}
    first = next(iter(runs.values()))
    for label, r in runs.items():
        if sorted(r) != sorted(first) or any(r[s]["tokens"] != first[s]["tokens"] for s in r):
            sys.exit(f"loss-pairs.py: {RUNS[label]} did not train on the same batches as the others (steps or token "
                     "counts differ)")
    names = list(runs)
    lines = ["# Training loss on the same batches, step by step", "",
             f"`python docs/agent-sw/loss-pairs.py`, from the {len(runs)} training logs:",
             ", ".join(f"[{RUNS[n]}]({RUNS[n]})" for n in names), "",
             "| step | target tokens | " + " | ".join(f"{n} loss" for n in names) + " | "
             + " | ".join(f"{n} grad norm" for n in names) + " |", "|---|---|" + "---|" * (2 * len(names))]
    lines += [f"| {s} | {first[s]['tokens']} | " + " | ".join(f"{runs[n][s]['loss']:.3f}" for n in names) + " | "
              + " | ".join(f"{runs[n][s]['grad_norm']:.1f}" for n in names) + " |" for s in sorted(first)]
    pairs = [(a, b) for a, b in PAIRS if a in runs and b in runs]
    lines += ["", "Mean loss over stretches of the schedule, and on how many of their steps the second run of a pair "
              "is lower:", "", "| steps | " + " | ".join(f"{n} mean loss" for n in names) + " | "
              + " | ".join(f"{b} lower than {a}" for a, b in pairs) + " |",
              "|---|" + "---|" * (len(names) + len(pairs))]
    for lo, hi in STRETCHES:
        s = [i for i in sorted(first) if lo <= i <= hi]
        if s:
            lines.append(f"| {lo}-{hi} | " + " | ".join(f"{sum(runs[n][i]['loss'] for i in s) / len(s):.3f}"
                                                      for n in names) + " | "
                         + " | ".join(f"{sum(runs[b][i]['loss'] < runs[a][i]['loss'] for i in s)} of {len(s)}"
                                      for a, b in pairs) + " |")
    files.write_atomic(os.path.join(HERE, "loss-pairs.md"), "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
