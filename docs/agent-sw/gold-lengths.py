"""How long ScienceWorld's gold trajectories are, in tokens, as the agent loop renders them (issue 27): what
train_weaver.py's --max_len keeps of them.

    python docs/agent-sw/gold-lengths.py MODEL_FOLDER
    e.g. python docs/agent-sw/gold-lengths.py ../models/qwen2.5-coder-0.5b

Reads the train split's gold trajectories (built and cached by data/scienceworld.load; the first call needs Java and
the scienceworld package, later ones only the cache), renders each with agent.encode_trajectories as SFT does and
writes docs/agent-sw/gold-lengths.json: the quantiles of the whole length, of the turn count and of the first prompt,
and per --max_len candidate how many trajectories fit whole and what share of all turns start inside it.
"""

import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))

import agent  # noqa: E402
import files  # noqa: E402
import tokenizer  # noqa: E402
from data import scienceworld  # noqa: E402


def quantiles(values):
    v = sorted(values)
    out = {f"p{int(p * 100)}": v[min(len(v) - 1, int(len(v) * p))] for p in (0.1, 0.25, 0.5, 0.75, 0.9)}
    return out | {"max": v[-1]}


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    tok = tokenizer.load_tokenizer(sys.argv[1])
    rows = scienceworld.load("train")
    examples, _ = agent.encode_trajectories(rows, tok, scienceworld, 10 ** 9)
    lengths = [len(e["prompt"]) + len(e["completion"]) for e in examples]
    turns = [len(e["turn_starts"]) for e in examples]
    out = {"model": os.path.basename(os.path.normpath(sys.argv[1])), "trajectories": len(examples),
           "tokens": quantiles(lengths), "turns": quantiles(turns),
           "first_prompt_tokens": quantiles([len(e["prompt"]) for e in examples]), "max_len": {}}
    for m in (1024, 2048, 4096):
        kept = sum(sum(s < m - 1 for s in e["turn_starts"]) for e in examples)
        out["max_len"][m] = {"whole": sum(n <= m for n in lengths), "turns_kept": round(kept / sum(turns), 3)}
    files.write_json(os.path.join(HERE, "gold-lengths.json"), out)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
