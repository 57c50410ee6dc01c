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

# -----------------------------------------------------------------------------
KIND = ""  # memorybank | expel | awm (required)
DATA = "gsm8k"  # a task of the registry (gsm8k) or a .jsonl file with "question" and "answer" fields
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
DEVICE = "auto"  # auto | cpu | cuda | cuda:N
# -----------------------------------------------------------------------------
_PROG = "build_memory.py"


def check(cfg, given):
    import memory
    from settings import SettingsError, at_least, one_of

    if not cfg["kind"]:
        raise SettingsError(f"--kind is required: {', '.join(memory.KINDS)}")
    one_of(cfg, "kind", memory.KINDS)
    for key in ("model", "out_dir"):
        if not cfg[key]:
            raise SettingsError(f"--{key} is required; see --help")
    one_of(cfg, "memory_source", ("gold", "self"))
    if cfg["kind"] == "expel" and "memory_source" in given:
        raise SettingsError("--memory_source does not apply to expel: ExpeL learns from the model's own attempts")
    at_least(cfg, 0, "limit", "success_group")
    at_least(cfg, 1, "attempts", "max_new_tokens", "induce_max_new_tokens", "shown_tokens", "max_rules",
             "workflow_group", "batch_size", "chunk")
    if cfg["kind"] == "expel" and cfg["attempts"] < 2:
        raise SettingsError("--attempts must be >= 2 for expel: it compares a failure with a success of one problem")
    if cfg["success_group"] == 1:
        raise SettingsError("--success_group must be 0 (off) or >= 2: a critique of successes compares several")
    if cfg["temperature"] < 0 or not 0 < cfg["top_p"] <= 1:
        raise SettingsError("--temperature must be >= 0 and --top_p in (0, 1]")


def main(argv=None):
    import settings

    try:
        cfg, given = settings.parse(sys.argv[1:] if argv is None else list(argv), globals(), _PROG)
        check(cfg, given)
    except settings.SettingsError as e:
        settings.die(_PROG, str(e))
    import memory
    from data import get_task
    from data.download import DownloadError, resolve_model
    from model import ModelError, load_model, pick_device, pick_dtype
    from tokenizer import load_tokenizer

    t0 = time.time()
    try:
        # the settings that name what the directory holds: the model by absolute path (./m and /abs/m are one),
        # the dtype resolved; an existing directory must match them before anything is loaded
        cfg["dtype"] = str(pick_dtype(cfg["dtype"], pick_device(cfg["device"]))).replace("torch.", "")
        if os.path.isdir(cfg["model"]):
            cfg["model"] = os.path.abspath(cfg["model"])
        memory.check_dir(cfg["out_dir"], cfg)
        folder = resolve_model(cfg["model"])
        task = get_task(cfg["data"])
        rows = task.load("train")
        if cfg["limit"]:
            rows = rows[:cfg["limit"]]
        if not rows:
            raise memory.MemError(f"task {cfg['data']} has no training problems")
        model = load_model(folder, dtype=cfg["dtype"], device=cfg["device"])
        tok = load_tokenizer(folder)
        print(f"{_PROG}: {cfg['kind']} from {len(rows)} {getattr(task, 'NAME', cfg['data'])} training problems, model "
              f"{cfg['model']} ({model.dtype} on {model.device}) -> {cfg['out_dir']}", file=sys.stderr)
        meta = memory.build(cfg["out_dir"], task, rows, model, tok, cfg)
    except (memory.MemError, ModelError, DownloadError, ValueError, OSError) as e:
        settings.die(_PROG, str(e))
    counts = ", ".join(f"{k} {v}" for k, v in meta.get("counts", {}).items())
    print(f"{_PROG}: {cfg['out_dir']} complete ({counts}) in {time.time() - t0:.1f} s", file=sys.stderr)
    return meta


if __name__ == "__main__":
    main()
