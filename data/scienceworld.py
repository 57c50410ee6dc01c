"""data/scienceworld.py: ScienceWorld (Wang et al. 2022), 30 task types of elementary-science experiments in a text
world, as a multi-turn task for agent.py. The only module that imports the `scienceworld` package, which is not a
run-time dependency of memgen: `pip install scienceworld` and a Java 17 runtime (docs/agent.md). It runs with no
network (its wheel carries the simulator; Python talks to it over a local socket).

    get_task("scienceworld")              all 30 task types
    get_task("scienceworld:boil+melt")    the named ones ("+"-separated; names as ScienceWorld spells them)

A row is one (task type, variation) episode {"id": "boil-3", "task", "variation", "answer": None, "target"}; rows go
round-robin over the task types (variation 0 of each, then 1, ...), so --limit=N takes about N / types episodes of
each. Splits are ScienceWorld's own: train, val (its "dev") and test. The test split holds every variation; train
and val hold the first GOLD_PER_TASK of each type, with their gold trajectory (built once by replaying the gold
action sequence, cached under $MEMGEN_CACHE/scienceworld/): "question" (the task description), "observation" (the
first one), "turns" [{"action", "observation"}] for SFT (agent.encode_trajectories), and "target" (the gold actions,
one "Action: ..." line each) for a MemoryBank of successful trajectories (build_memory.py --memory_source=gold).

An episode's score is ScienceWorld's 0..100; a failed episode (the simulator's negative score) ends with score 0.
"""
import json
import os
import shutil

from data.download import cache_dir
from data.gsm8k import DataError

NAME = "scienceworld"
AGENT = True  # eval.py runs episodes (agent.evaluate) instead of grading one completion
SPLITS = {"train": "train", "val": "dev", "test": "test"}
GOLD_PER_TASK = {"train": 10, "val": 2}  # variations per task type with a gold trajectory (train / val rows)
SIMPLIFICATIONS = ""  # ScienceWorld's simplifications, comma-separated ("easy" = all of them); "" = none
INSTALL = ("install it with `pip install scienceworld` and a Java 17 runtime (Debian: apt-get install "
           "openjdk-17-jre-headless); see docs/agent.md")
PROMPT = (
    "You are an agent in ScienceWorld, a text world of elementary science experiments. Each turn, think in a "
    "sentence or two, then act: end your reply with one line \"Action: <action>\", one action per turn.\n"
    "Actions: look around, look at OBJ, look in OBJ, read OBJ, open OBJ, close OBJ, go to LOC, pick up OBJ, "
    "put down OBJ, move OBJ to OBJ, pour OBJ in OBJ, dunk OBJ in OBJ, mix OBJ, activate OBJ, deactivate OBJ, "
    "use OBJ on OBJ, connect OBJ to OBJ, disconnect OBJ, eat OBJ, flush OBJ, focus on OBJ, inventory, task, wait, "
    "wait1. Focus on an object only when the task asks for it: focusing on a wrong one fails the task.\n\n"
    "Task: {question}\n\nObservation: {observation}")


def _package(java=True):
    try:
        import scienceworld
    except ImportError:
        raise DataError(f"the ScienceWorld task needs the scienceworld package: {INSTALL}") from None
    if java and shutil.which("java") is None:
        raise DataError(f"ScienceWorld runs on Java, and no `java` is on PATH: {INSTALL}")
    return scienceworld


def task_names():
    """The 30 task types, in ScienceWorld's order (from the package's task list; no simulator needed)."""
    _package(java=False)
    from scienceworld.constants import ID2TASK
    from scienceworld.utils import infer_task
    return [infer_task(n) for n in ID2TASK.values()]


class Env:
    """One ScienceWorld simulator (a Java process, about 3 s to start) with agent.py's environment interface."""

    def __init__(self):
        self.env = _package().ScienceWorldEnv("")

    def reset(self, row):
        self.env.load(row["task"], int(row["variation"]), SIMPLIFICATIONS)
        observation, _ = self.env.reset()
        return self.env.get_task_description(), observation, self.score()  # some tasks score their start state

    def score(self):
        return int(round(100 * self.env.server.getScore()))

    def step(self, action):
        # the server's own step: ScienceWorldEnv.step also lists every valid action, each step (0.3 s)
        observation = self.env.server.step(action)
        score = self.score()
        if score < 0:  # a failed task (e.g. focus on the wrong object): the episode ends, scored 0
            return observation, 0, True
        return observation, score, bool(self.env.server.getCompleted())

    def close(self):
        """Stop the simulator and wait for its Java process to exit: the package's own __del__ closes once more and,
        finding the process still alive, writes to its closed stdin (a BrokenPipeError traceback on stderr)."""
        env, self.env = self.env, None
        if env is None:
            return
        env.close()
        try:
            env._gateway.java_process.wait(timeout=30)
        except Exception:  # noqa: BLE001 - a process that will not exit is left to the OS; nothing to report
            pass


def make_env():
    return Env()


# -----------------------------------------------------------------------------
# rows and gold trajectories


def _cache():
    return cache_dir() / "scienceworld" / _package(java=False).__version__


def _write_json(path, obj):
    from files import write_json
    os.makedirs(os.path.dirname(path), exist_ok=True)
    write_json(str(path), obj)


def variations(env=None):
    """{task: {"train": [...], "dev": [...], "test": [...]}}, asked of the simulator once and cached."""
    path = _cache() / "variations.json"
    if path.is_file():
        with open(path) as f:
            return json.load(f)
    own = env is None
    env = env or Env()
    try:
        out = {}
        for task in task_names():
            env.env.load(task, 0, "")
            out[task] = {"train": env.env.get_variations_train(), "dev": env.env.get_variations_dev(),
                         "test": env.env.get_variations_test()}
    finally:
        if own:
            env.close()
    _write_json(path, out)
    return out


def gold(row, env):
    """The gold trajectory of one episode (cached): question, first observation, turns, final score."""
    path = _cache() / "gold" / f"{row['id']}.json"
    if path.is_file():
        with open(path) as f:
            return json.load(f)
    sw = env.env
    sw.load(row["task"], int(row["variation"]), SIMPLIFICATIONS, generateGoldPath=True)
    observation, _ = sw.reset()
    out = {"question": sw.get_task_description(), "observation": observation, "turns": []}
    for action in sw.get_gold_action_sequence():
        obs, score, done = env.step(action)
        out["turns"].append({"action": action, "observation": obs})
    out["score"] = score
    _write_json(path, out)
    return out


def _selected(tasks):
    names = task_names()
    if not tasks:
        return names
    bad = [t for t in tasks if t not in names]
    if bad:
        raise DataError(f"unknown ScienceWorld task {', '.join(bad)}; the tasks are: {', '.join(names)}")
    return list(dict.fromkeys(tasks))


def load(split, path=None, tasks=None):
    """The split's episodes, round-robin over the task types; train and val with their gold trajectories."""
    if split not in SPLITS:
        raise DataError(f"ScienceWorld has no split {split!r}; use one of: {', '.join(SPLITS)}")
    if path is not None:
        raise DataError("the ScienceWorld task reads no file; name task types as scienceworld:TASK+TASK")
    tasks = _selected(tasks)
    var = variations()
    per = {t: var[t][SPLITS[split]][:GOLD_PER_TASK.get(split, None)] for t in tasks}
    rows = [{"id": f"{t}-{per[t][j]}", "task": t, "variation": per[t][j], "answer": None, "target": None}
            for j in range(max(len(v) for v in per.values())) for t in tasks if j < len(per[t])]
    if split in GOLD_PER_TASK:
        missing = [r for r in rows if not (_cache() / "gold" / f"{r['id']}.json").is_file()]
        env = Env() if missing else None
        try:
            for r in rows:
                g = gold(r, env)
                r.update(question=g["question"], observation=g["observation"], turns=g["turns"],
                         target="\n".join(f"Action: {t['action']}" for t in g["turns"]), gold_score=g["score"])
        finally:
            if env is not None:
                env.close()
        rows = [r for r in rows if r["gold_score"] >= 100]  # a gold sequence that does not finish is no example
    return rows


def select(spec):
    """get_task("scienceworld:boil+melt"): this task with load() limited to the named task types."""
    import functools
    import types

    tasks = [t.strip() for t in spec.split("+") if t.strip()]
    _selected(tasks)
    return types.SimpleNamespace(NAME=NAME, AGENT=AGENT, load=functools.partial(load, tasks=tasks),
                                 messages=messages, grade=grade, make_env=make_env, tasks=tasks)


def messages(row):
    return [{"role": "user", "content": PROMPT.format(question=row["question"], observation=row["observation"])}]


def grade(row, completion):
    raise DataError("ScienceWorld is scored by its environment over a whole episode, not by grading one completion: "
                    "evaluate it with eval.py --data=scienceworld (agent.evaluate)")
