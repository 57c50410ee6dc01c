"""
build_memory.py: build a retrieval memory (MemoryBank, ExpeL or AWM) from a task's training split.

    python build_memory.py --kind=memorybank --data=gsm8k --model=FOLDER --out_dir=out/memory/memorybank
    python build_memory.py --kind=expel --data=gsm8k --model=FOLDER --out_dir=out/memory/expel --limit=500
    python build_memory.py --kind=awm --data=gsm8k --model=FOLDER --out_dir=out/memory/awm --memory_source=self

The directory holds plain files (meta.json, items.jsonl, embeddings.safetensors, attempts.jsonl, insights.json,
workflows.json and their logs; see memory.py). A killed build resumes when rerun with the same command; a finished
one is left as it is. Evaluate with: python eval.py --mode=<kind> --memory=DIR --model=FOLDER.
"""
import os
import sys
import time

import data
import errors
import loading
import memory
import settings
from model import pick_dtype

# -----------------------------------------------------------------------------
KIND = ""  # memorybank | expel | awm (required)
DATA = "gsm8k"  # the task (data.get_task) whose train split is remembered: gsm8k, or FORMAT:FILE.jsonl (qa|choice|fever)
MODEL = ""  # the base model: a local Hugging Face folder or a hub id org/name (required); eval must use the same
OUT_DIR = ""  # the memory directory to create or resume (required)
LIMIT = 0  # use the first LIMIT training problems (0 = all)
MEMORY_SOURCE = "gold"  # memorybank / awm: gold (the task's solutions) | self (the model's own correct attempts)
ATTEMPTS = 4  # sampled attempts per training problem (expel always; memorybank / awm with memory_source=self)
TEMPERATURE = 1.0  # sampling temperature of the attempts
TOP_P = 1.0  # nucleus of the attempts
MAX_NEW_TOKENS = 512  # per attempt
INDUCE_MAX_NEW_TOKENS = 384  # per insight-extraction / workflow-induction response (greedy)
SHOWN_TOKENS = 384  # each trajectory shown in an insight / induction prompt is cut to this many tokens
SUCCESS_GROUP = 8  # expel: successes per all-success critique, as ExpeL (0 = only failure/success comparisons)
MAX_RULES = 20  # expel: the rule list counts as full from here (ExpeL's max_num_rules)
WORKFLOW_GROUP = 4  # awm: trajectories per induction prompt
BATCH_SIZE = 16  # prompts per generate call; texts per embedding batch
CHUNK = 64  # problems per resumable part file
SEED = 0  # seeds the attempts (chunk c, call j: SEED + 1000 c + j) and the grouping of successes
DTYPE = "auto"  # auto | float32 | bfloat16 | float16
DEVICE = "auto"  # auto (cuda when a GPU is visible) | cpu | cuda | cuda:N
PROGRESS = True  # show progress bars
# -----------------------------------------------------------------------------
_PROG = "build_memory.py"


def check(cfg, given):
    """The settings, each checked with one line naming it (before anything is loaded)."""
    if not cfg["kind"]:
        raise settings.SettingsError(f"--kind is required: {', '.join(memory.KINDS)}")
    settings.one_of(cfg, "kind", memory.KINDS)
    for key in ("model", "out_dir"):
        if not cfg[key]:
            raise settings.SettingsError(f"--{key} is required; see --help")
    settings.one_of(cfg, "memory_source", ("gold", "self"))
    if cfg["kind"] == "expel" and "memory_source" in given:
        raise settings.SettingsError("--memory_source does not apply to expel: ExpeL learns from the model's own "
                                     "attempts")
    settings.at_least(cfg, 0, "limit", "success_group")
    settings.at_least(cfg, 1, "attempts", "max_new_tokens", "induce_max_new_tokens", "shown_tokens", "max_rules",
                      "workflow_group", "batch_size", "chunk")
    if cfg["kind"] == "expel" and cfg["attempts"] < 2:
        raise settings.SettingsError("--attempts must be >= 2 for expel: it compares a failure with a success of "
                                     "one problem")
    if cfg["success_group"] == 1:
        raise settings.SettingsError("--success_group must be 0 (off) or >= 2: a critique of successes compares "
                                     "several")
    if cfg["temperature"] < 0 or not 0 < cfg["top_p"] <= 1:
        raise settings.SettingsError("--temperature must be >= 0 and --top_p in (0, 1]")


def main(argv=None):
    """Build (or resume) the memory directory; returns its meta."""
    with errors.one_line_errors(_PROG):
        try:
            cfg, given = settings.parse(sys.argv[1:] if argv is None else list(argv), globals(), _PROG)
            check(cfg, given)
            t0 = time.time()
            # what names the directory's content: the model by absolute path (./m and /abs/m are one), the dtype
            # resolved; an existing directory must match before anything is loaded
            device = loading.resolve_device(cfg["device"])
            cfg["dtype"] = str(pick_dtype(cfg["dtype"], device)).replace("torch.", "")
            if os.path.isdir(cfg["model"]):
                cfg["model"] = os.path.abspath(cfg["model"])
            done = memory.check_dir(cfg["out_dir"], cfg)
            if done and done.get("complete"):
                print(f"{_PROG}: {cfg['out_dir']} is already complete; nothing to do", file=sys.stderr)
                return done
            task = data.get_task(cfg["data"])
            rows = task.load("train")
            rows = rows[:cfg["limit"]] if cfg["limit"] else rows
            if not rows:
                raise memory.MemError(f"task {cfg['data']} has no training problems")
            model, tok = loading.load_base(cfg["model"], cfg["dtype"], device)
            print(f"{_PROG}: {cfg['kind']} from {len(rows)} {task.NAME} training problems, model {cfg['model']} "
                  f"({model.dtype} on {model.device}) -> {cfg['out_dir']}", file=sys.stderr)
            meta = memory.build(cfg["out_dir"], task, rows, model, tok, cfg, progress=cfg["progress"])
        except memory.MemError as e:
            settings.die(_PROG, str(e))
    counts = ", ".join(f"{k} {v}" for k, v in meta.get("counts", {}).items())
    print(f"{_PROG}: {cfg['out_dir']} complete ({counts}) in {time.time() - t0:.1f} s", file=sys.stderr)
    return meta


if __name__ == "__main__":
    main()
