"""What ScienceWorld scores before the agent does anything useful (issue 27): the score of each of the eval's 30 test
episodes (eval.py --data=scienceworld --limit=30) at its start, before any action, after one action that changes
nothing in the world, `inventory`, and after `look around`, the action most replies of the 0.5B policies repeat for
the whole episode.

    python docs/agent-sw/floor.py

Needs Java and the scienceworld package (docs/agent.md); one simulator, about 20 seconds. Writes
docs/agent-sw/floor.json: per episode the three scores, and their means over the 30.
"""

import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))

import files  # noqa: E402
from data import scienceworld  # noqa: E402

EPISODES = 30
ACTIONS = ("inventory", "look around")


def main():
    if len(sys.argv) != 1:
        sys.exit(__doc__)
    rows = scienceworld.load("test")[:EPISODES]
    env = scienceworld.make_env()
    scores = {}
    try:
        for r in rows:
            s = scores[r["id"]] = {}
            for action in ACTIONS:  # each from a fresh start, whose score reset gives (the same every time)
                s["start"] = env.reset(r)[2]
                s[action] = env.step(action)[1]
    finally:
        env.close()
    out = {"episodes": len(rows), "mean": {a: sum(s[a] for s in scores.values()) / len(rows)
                                           for a in ("start",) + ACTIONS},
           "scores": scores}
    files.write_json(os.path.join(HERE, "floor.json"), out)
    print(json.dumps(out["mean"]))


if __name__ == "__main__":
    main()
