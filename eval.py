"""
eval.py: batched, resumable evaluation of the reasoner, a LoRA baseline or MemGen on a task (GSM8K by default).

    python eval.py --model=/path/to/model                                    # greedy pass@1 of the base model
    python eval.py --model=M --mode=lora --adapter=out/sft-lora-gsm8k-M/final    # the LoRA-SFT baseline
    python eval.py --model=M --mode=memgen --adapter=out/trigger-gsm8k-M/final --trigger_mode=learned
    python eval.py --model=M --samples=8 --temperature=1.0                   # pass@1/2/4/8
    python eval.py --model=M --data=gsm8k,humaneval --limit=100             # cross-domain: out/crossdomain.md

Outputs go to --out_dir (default out/eval/<data>-<mode>-<model>[-<adapter>][-<each result-changing setting that is
not its default>], so two different evaluations never share a folder):
    results.jsonl  one row per problem, appended batch by batch (a killed run resumes where it stopped); a problem
                   whose prompt does not fit the model is a row with "skipped": the reason, and counts as unsolved
    run.json       the settings the rows were made with, written once the model has loaded (a restart with other
                   settings is refused)
    summary.json   the metrics over all requested problems (skipped ones counted), the settings, wall time
and one markdown row is appended to RESULTS_MD so that runs line up like the paper's tables.
"""
import json
import os
import sys
import time

import data
import errors
import evaluation
import loading
import memgen
import official
import sandbox
import settings
from model import pick_dtype, set_graphs

DATA = "gsm8k"  # the task(s), comma-separated (data.get_task): gsm8k, humaneval, or FORMAT:FILE.jsonl (qa|choice|fever)
SPLIT = "test"  # which of the task's splits to evaluate: test | val | train
MODEL = "Qwen/Qwen2.5-1.5B-Instruct"  # a hub id org/name (downloaded once) or a local Hugging Face model folder
MODE = "vanilla"  # vanilla | lora (an sft adapter) | memgen (weaver, trigger if learned) | memorybank | expel | awm
ADAPTER = ""  # the trained adapters: a training run's final/ (sft.* for lora; weaver.*, trigger.* for memgen)
TRIGGER_MODE = "always"  # memgen only, when to insert memory: always | learned (needs a trained trigger) | random | off
SAMPLES = 1  # completions per problem; pass@k is reported for every k in 1, 2, 4, ... up to this
TEMPERATURE = 0.0  # sampling temperature; 0 = greedy
TOP_P = 1.0  # nucleus sampling: keep the smallest set of tokens with this much probability (1 = all)
LIMIT = 0  # evaluate the first LIMIT problems (0 = all)
BATCH_SIZE = 16  # rows (problems x samples) per generate call
MAX_NEW_TOKENS = 512  # longest completion in tokens
SEED = 0  # sampling seed (batch i is sampled with SEED + i, so a resumed run matches an uninterrupted one)
DTYPE = "auto"  # auto (bfloat16 on GPUs and on CPUs with native bf16, else float32) | float32 | bfloat16 | float16
DEVICE = "auto"  # auto (cuda when a GPU is visible) | cpu | cuda | cuda:N
GRAPHS = "auto"  # decode steps replayed as CUDA graphs: auto (on with CUDA, off on a CPU) | true | false
OUT_DIR = ""  # the output folder; "" = out/eval/ + a name made of the data, mode, model, adapter and settings
TABLE = "out/crossdomain"  # pass@1 per task goes to TABLE.jsonl, gathered in TABLE.md and TABLE.png: with several --data tasks, or one and --table given ("" = none)
RESULTS_MD = "out/results.md"  # the markdown table every run appends its row to; "" = none
MEMORY = ""  # --mode=memorybank|expel|awm: the memory directory build_memory.py made
MEMORY_BUDGET = 768  # most tokens of memory text put in front of each problem's prompt
MEMORY_TOP_K = 3  # retrieved experiences per problem (memorybank, expel)
MAX_TURNS = 30  # multi-turn tasks (scienceworld): the agent's replies per episode, wasted ones included
TURN_TOKENS = 128  # multi-turn tasks: the longest reply of one turn (MAX_NEW_TOKENS is for one-completion tasks)
MAX_CONTEXT = 4096  # multi-turn tasks: slots of an episode's history (tokens + latents); full = the episode ends
ALLOW_OTHER_BASE = False  # load an --adapter trained on another base model anyway (same shapes required)
PROGRESS = True  # show a progress bar
# -----------------------------------------------------------------------------
_PROG = "eval.py"
_MEMORIES = ("memorybank", "expel", "awm")  # retrieval-memory baselines: the base model with memory in its prompt
_AGENT_KEYS = ("max_turns", "turn_tokens", "max_context")  # the episode settings of a multi-turn task (agent.py)


def check(cfg, given):
    """The settings, each checked with one line naming it (before anything is loaded)."""
    settings.one_of(cfg, "mode", evaluation.MODES + _MEMORIES)
    settings.at_least(cfg, 0, "memory_budget")
    settings.at_least(cfg, 1, "memory_top_k")
    if (cfg["mode"] in _MEMORIES) != bool(cfg["memory"]):
        raise settings.SettingsError(f"--mode={cfg['mode']} needs --memory=DIR (a build_memory.py directory)"
                                     if cfg["mode"] in _MEMORIES else
                                     f"--memory is read by --mode={'|'.join(_MEMORIES)} only, not --mode={cfg['mode']}")
    settings.one_of(cfg, "trigger_mode", memgen.TRIGGER_MODES)
    settings.at_least(cfg, 0, "limit")
    settings.at_least(cfg, 1, *_AGENT_KEYS)
    if "trigger_mode" in given and cfg["mode"] != "memgen":
        raise settings.SettingsError(f"--trigger_mode only applies to --mode=memgen (this run is --mode={cfg['mode']})")
    if cfg["mode"] == "lora" and not cfg["adapter"]:
        raise settings.SettingsError("--mode=lora needs --adapter=DIR: a folder holding sft.safetensors + sft.json "
                                     "(train_weaver.py --method=sft-lora saves it in final/)")
    if cfg["adapter"] and cfg["mode"] == "vanilla":
        raise settings.SettingsError("--adapter is not used by --mode=vanilla; use --mode=lora or --mode=memgen")
    cfg["adapter"] = official.resolve_adapter(cfg["adapter"])  # an official MemGen checkpoint: converted once
    if cfg["adapter"] and not os.path.isdir(cfg["adapter"]):
        raise settings.SettingsError(f"adapter folder {cfg['adapter']} does not exist; pass the folder a training "
                                     "run saved to")
    if cfg["mode"] == "memgen" and cfg["trigger_mode"] == "learned" and not (
            cfg["adapter"] and os.path.isfile(os.path.join(cfg["adapter"], "trigger.safetensors"))):
        where = cfg["adapter"] or "(no --adapter)"
        raise settings.SettingsError(f"--trigger_mode=learned needs a trained trigger: {where} holds no "
                                     "trigger.safetensors; pass the final/ of a train_trigger.py run, or use "
                                     "--trigger_mode=always")
    pick_dtype(cfg["dtype"])
    evaluation.check_sampling(cfg["samples"], cfg["temperature"], cfg["top_p"], cfg["batch_size"],
                              cfg["max_new_tokens"])


def main(argv=None):
    """Evaluate on each task of --data (comma-separated); returns the summary dict (also written to summary.json),
    or {data: summary} for several tasks, whose pass@1 also go to the cross-domain table (--table)."""
    with errors.one_line_errors(_PROG):
        cfg, given = settings.parse(sys.argv[1:] if argv is None else list(argv), globals(), _PROG)
        check(cfg, given)
        set_graphs(cfg["graphs"])  # every decode loop of this evaluation
        specs = [d.strip() for d in cfg["data"].split(",") if d.strip()]
        tasks = [data.get_task(spec) for spec in specs]  # a bad task name fails before the model loads
        model, tok = loading.load_base(cfg["model"], cfg["dtype"], loading.resolve_device(cfg["device"]))
        gen_mode = "vanilla" if cfg["mode"] in _MEMORIES else cfg["mode"]  # a memory only changes the prompt
        policy = loading.load_policy(gen_mode, model, tok, cfg["adapter"], cfg["trigger_mode"],
                                     cfg["allow_other_base"])
        if cfg["mode"] == "memgen" and not cfg["adapter"]:
            print(f"{_PROG}: warning: --mode=memgen without --adapter evaluates an UNTRAINED weaver (random queries "
                  "and maps); the numbers say nothing about MemGen", file=sys.stderr)
        summaries = {}
        for spec, task in zip(specs, tasks):
            one = dict(cfg, data=spec)
            if cfg["out_dir"] and len(specs) > 1:
                one["out_dir"] = os.path.join(cfg["out_dir"], evaluation.data_label(spec))
            summaries[spec] = evaluate_task(one, task, model, tok, policy, gen_mode)
        if cfg["table"] and (len(specs) > 1 or "table" in given):
            paths = evaluation.cross_domain_table(cfg["table"], cfg, summaries)
            print(f"{_PROG}: cross-domain table -> {', '.join(paths)}", file=sys.stderr)
        return summaries[specs[0]] if len(specs) == 1 else summaries


def evaluate_task(cfg, task, model, tok, policy, gen_mode):
    """One task: rows, the output folder (claimed for these settings), evaluate, summary.json and the table row."""
    t0 = time.time()
    rows = task.load(cfg["split"])
    rows = rows[:cfg["limit"]] if cfg["limit"] else rows
    memory_tokens = {}
    if cfg["mode"] in _MEMORIES:
        task = with_memory(task, cfg, model, tok, memory_tokens)
    out_dir = cfg["out_dir"] or evaluation.default_out_dir(cfg, settings.defaults(globals()))
    run = dict({k: cfg[k] for k in evaluation.RUN_KEYS}, dtype=str(model.dtype).replace("torch.", ""),
               model=os.path.abspath(cfg["model"]) if os.path.isdir(cfg["model"]) else cfg["model"],
               adapter=os.path.abspath(cfg["adapter"]) if cfg["adapter"] else "",
               trigger_mode=cfg["trigger_mode"] if cfg["mode"] == "memgen" else None)
    if isinstance(policy, memgen.MemGen):  # the rules it decodes under: the adapter's own (its weaver.json)
        run["rules"] = memgen.rules(policy)
    if cfg["mode"] in _MEMORIES:
        run.update(memory=os.path.abspath(cfg["memory"]), memory_budget=cfg["memory_budget"],
                   memory_top_k=cfg["memory_top_k"])
    is_agent = getattr(task, "AGENT", False)  # a multi-turn task: episodes in an environment (agent.py)
    if is_agent:
        if cfg["samples"] != 1:
            raise settings.SettingsError(f"--samples={cfg['samples']}: a multi-turn task runs one episode per row; "
                                         "use --samples=1")
        run.update({k: cfg[k] for k in _AGENT_KEYS})
        defaults = settings.defaults(globals())
        if not cfg["out_dir"]:
            out_dir += "".join(f"-{k}{cfg[k]}" for k in _AGENT_KEYS if cfg[k] != defaults[k])
    evaluation.claim_out_dir(out_dir, run)
    print(f"{_PROG}: {cfg['data']}: {len(rows)} problems x {cfg['samples']} samples, mode "
          f"{evaluation.run_label(cfg['mode'], cfg['trigger_mode'])}, model {cfg['model']}, {model.dtype} on "
          f"{model.device} -> {out_dir}", file=sys.stderr)
    isolation = sandbox.isolation() if hasattr(task, "grade_many") else None  # a task that runs model-written code
    if isolation:
        print(f"{_PROG}: sandbox: {', '.join(isolation['layers'])}"
              + "".join(f"; NOT {m}" for m in isolation["missing"]), file=sys.stderr)
    if is_agent:  # mean score, success rate (= pass@1 in the tables), turns, insertions per turn
        import agent

        summary = agent.evaluate(policy, tok, task, rows, gen_mode, batch_size=cfg["batch_size"],
                                 max_turns=cfg["max_turns"], turn_tokens=cfg["turn_tokens"],
                                 max_context=cfg["max_context"], temperature=cfg["temperature"], top_p=cfg["top_p"],
                                 seed=cfg["seed"], trigger_mode=run["trigger_mode"],
                                 out_path=os.path.join(out_dir, "results.jsonl"), progress=cfg["progress"])
    else:
        summary = evaluation.evaluate(policy, tok, task, rows, gen_mode, samples=cfg["samples"],
                                      temperature=cfg["temperature"], top_p=cfg["top_p"],
                                      batch_size=cfg["batch_size"], max_new_tokens=cfg["max_new_tokens"],
                                      seed=cfg["seed"], trigger_mode=run["trigger_mode"],
                                      out_path=os.path.join(out_dir, "results.jsonl"), progress=cfg["progress"])
    if memory_tokens:  # the problems generated in this run (a resumed run's earlier ones are not re-counted)
        summary["mean_memory_tokens"] = round(sum(memory_tokens.values()) / len(memory_tokens), 1)
    summary["eval_s"] = summary.pop("wall_s")  # generation + grading only; wall_s below includes loading
    summary.update(data=cfg["data"], mode=cfg["mode"], model=cfg["model"], wall_s=round(time.time() - t0, 3),
                   run=run, args=cfg)
    if isolation:
        summary["sandbox"] = isolation  # what contained the graded programs (docs/sandbox.md)
    evaluation.write_json(os.path.join(out_dir, "summary.json"), summary)
    if cfg["results_md"]:
        evaluation.append_markdown(cfg["results_md"], cfg, summary)
    width = max(len(k) for k in summary)
    for k, v in summary.items():
        if k not in ("run", "args", "sandbox"):
            print(f"{k:<{width}}  {v:.4f}" if isinstance(v, float) else f"{k:<{width}}  {v}")
    print(json.dumps({k: v for k, v in summary.items() if k != "args"}))
    return summary


def with_memory(task, cfg, model, tok, used):
    """The task with each problem's prompt led by the memory's text (memory.augment, cut to MEMORY_BUDGET tokens);
    used[id] records how many memory tokens each prompt received."""
    import types

    import memory

    try:
        mem = memory.load(cfg["memory"], model, tok, top_k=cfg["memory_top_k"])
    except memory.MemError as e:
        raise settings.SettingsError(str(e)) from None
    if mem.kind != cfg["mode"]:
        raise settings.SettingsError(f"--memory={cfg['memory']} holds a {mem.kind} memory; pass --mode={mem.kind}")

    def messages(row):
        msgs, n = memory.augment(mem, task, row, tok, cfg["memory_budget"])
        used[str(row["id"])] = n
        return msgs

    out = types.SimpleNamespace(NAME=task.NAME, load=task.load, grade=task.grade, messages=messages)
    for attr in ("grade_many", "AGENT", "make_env"):  # a multi-turn task keeps its environments
        if hasattr(task, attr):
            setattr(out, attr, getattr(task, attr))
    return out


if __name__ == "__main__":
    main()
