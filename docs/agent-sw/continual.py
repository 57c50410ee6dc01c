"""The continual-learning table of issue 27: each domain before and after a second training stage, for LoRA-SFT and
MemGen-SFT. Stage 1 trained on GSM8K, stage 2 went on from that adapter on ScienceWorld's gold trajectories.

    python docs/agent-sw/continual.py

Reads the committed eval.py summaries (no model, no simulator): "before" is the GSM8K-trained adapter
(crossdomain-f32/eval-gsm8k-NAME.json, agent-sw/eval-sw-NAME.json), "after" the same adapter after the ScienceWorld
stage (agent-sw/eval-cl-gsm8k-NAME.json, agent-sw/eval-cl-sw-NAME.json); beside them, what the ScienceWorld stage gives
from a fresh adapter (agent-sw/eval-sw-in-NAME.json) and vanilla. Writes docs/agent-sw/continual.md.

The before and after runs were not kept problem by problem (the "before" rows were lost with a machine), so the
difference is unpaired: its 95 % interval is +-1.96 times the root of the two squared standard errors (a GSM8K pass@1's
s.e. is the binomial one, sqrt(p (1 - p) / n); a ScienceWorld mean score's is the one eval.py reports). A policy whose
"after" files are not there yet gets "not run".
"""

import json
import math
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
DOCS = os.path.dirname(HERE)
sys.path.insert(0, os.path.dirname(DOCS))

import files  # noqa: E402

POLICIES = {"sft-lora": "LoRA-SFT", "memgen": "MemGen-SFT"}


def read(path):
    path = os.path.join(DOCS, path)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def gsm8k(s):
    """(pass@1 in %, its s.e., n) of a GSM8K summary, or None."""
    if s is None:
        return None
    p, n = s["pass@1"], s["n"]
    return 100 * p, 100 * math.sqrt(p * (1 - p) / n), n


def sw(s):
    """(mean score, its s.e., n) of a ScienceWorld summary, or None."""
    return None if s is None else (s["mean_score"], s["score_stderr"], s["n"])


def cell(v):
    return "not run" if v is None else f"{v[0]:.1f} ± {v[1]:.1f} (n={v[2]})"


def diff(a, b):
    if a is None or b is None:
        return "-"
    d, half = b[0] - a[0], 1.96 * math.hypot(a[1], b[1])
    return f"{d:+.1f} [{d - half:+.1f}, {d + half:+.1f}]"


def main():
    if len(sys.argv) != 1:
        sys.exit(__doc__)
    lines = ["# Continual learning: GSM8K, then ScienceWorld (issue 27)", "",
             "Written by `python docs/agent-sw/continual.py` from the committed summaries; GSM8K is pass@1 in % "
             "(100 test", "problems), ScienceWorld the mean score 0-100 (30 test episodes), each ± its standard "
             "error. The difference", "after minus before is unpaired, with a 95 % interval.", "",
             "| policy | domain | before (GSM8K-trained) | after (then ScienceWorld) | after minus before | "
             "ScienceWorld stage alone |", "|---|---|---|---|---|---|"]
    van_g, van_s = gsm8k(read("crossdomain-f32/eval-gsm8k-vanilla.json")), sw(read("agent-sw/eval-sw-vanilla.json"))
    for name, label in POLICIES.items():
        bg = gsm8k(read(f"crossdomain-f32/eval-gsm8k-{name}.json"))
        ag = gsm8k(read(f"agent-sw/eval-cl-gsm8k-{name}.json"))
        bs, as_ = sw(read(f"agent-sw/eval-sw-{name}.json")), sw(read(f"agent-sw/eval-cl-sw-{name}.json"))
        alone = sw(read(f"agent-sw/eval-sw-in-{name}.json"))
        lines.append(f"| {label} | GSM8K | {cell(bg)} | {cell(ag)} | {diff(bg, ag)} | - |")
        lines.append(f"| {label} | ScienceWorld | {cell(bs)} | {cell(as_)} | {diff(bs, as_)} | {cell(alone)} |")
    lines += ["", f"Vanilla (no training): GSM8K {cell(van_g)}, ScienceWorld {cell(van_s)}.", ""]
    files.write_atomic(os.path.join(HERE, "continual.md"), "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
