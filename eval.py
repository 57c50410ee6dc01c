"""
eval.py: batched, resumable evaluation of the reasoner, a LoRA baseline or MemGen on GSM8K-style tasks.

    python eval.py --data gsm8k --model /path/to/model                                   # greedy pass@1, base model
    python eval.py --data gsm8k --model M --mode lora --adapter out/sft                  # the LoRA-SFT baseline
    python eval.py --data gsm8k --model M --mode memgen --adapter out/weaver --trigger learned
    python eval.py --data gsm8k --model M --samples 8 --temperature 1.0                  # pass@1/2/4/8

Every module-level constant below is a default that a flag overrides (--key value or --key=value; dashes or
underscores). Outputs go to --out (default out/eval/<data>-<mode>-<model folder name>):
    results.jsonl  one row per problem, appended batch by batch (a killed run resumes where it stopped)
    run.json       the settings the rows were made with (a restart with other settings is refused)
    summary.json   the metrics over all requested problems, the settings, wall time
and one markdown row is appended to out/results.md so that runs line up like the paper's tables.

Library use (training scripts): evaluate(model_or_mg, tokenizer, rows, mode, ...) -> summary dict, and
summarize(records, samples).
"""
import datetime
import json
import math
import operator
import os
import sys
import time
from pathlib import Path

# -----------------------------------------------------------------------------
DATA = "gsm8k"  # "gsm8k" or a .jsonl file with "question" and "answer" fields
SPLIT = "test"
MODEL = ""  # a local Hugging Face model folder or a hub id org/name (required)
ADAPTER = ""  # folder with sft.* (mode lora) or weaver.* / trigger.* (mode memgen)
MODE = "vanilla"  # vanilla | lora | memgen
TRIGGER = "always"  # memgen only: always | learned | random | off (see memgen.TRIGGER_MODES)
SAMPLES = 1  # completions per problem; pass@k is reported for k in PASS_KS up to this
TEMPERATURE = 0.0  # 0 = greedy
TOP_P = 1.0
LIMIT = 0  # evaluate the first LIMIT problems (0 = all)
BATCH_SIZE = 16  # rows (problems x samples) per generate call
MAX_NEW_TOKENS = 512
SEED = 0
DTYPE = "auto"  # auto | float32 | bfloat16 | float16
DEVICE = "auto"
OUT = ""  # "" -> out/eval/<data>-<mode>-<model folder name>
RESULTS_MD = "out/results.md"  # the cross-run table; "" disables it
# -----------------------------------------------------------------------------
MODES = ("vanilla", "lora", "memgen")
PASS_KS = (1, 2, 4, 8, 16, 32)
CALL_SEED_STRIDE = 1_000_003  # when one batch needs several generate calls (samples > batch size)
# the settings that change what a row holds: a resumed run must match them all (batch size and limit may change)
RUN_KEYS = ("data", "split", "mode", "trigger", "model", "adapter", "samples", "temperature", "top_p",
            "max_new_tokens", "seed", "dtype")
FLAGS = {  # flag -> type; the defaults are the constants above
    "data": str, "split": str, "model": str, "adapter": str, "mode": str, "trigger": str, "samples": int,
    "temperature": float, "top_p": float, "limit": int, "batch_size": int, "max_new_tokens": int, "seed": int,
    "dtype": str, "device": str, "out": str, "results_md": str,
}


class EvalError(ValueError):
    """A bad argument or an output folder that does not fit this run; the message says what to do."""


# -----------------------------------------------------------------------------
# pass@k


def _as_int(name, value):
    try:
        if isinstance(value, bool):
            raise TypeError
        return operator.index(value)  # ints and numpy ints, not floats
    except TypeError:
        raise ValueError(f"pass_at_k: {name} must be an integer, got {value!r}") from None


def pass_at_k(n, c, k):
    """Unbiased pass@k of Chen et al. 2021: 1 - C(n-c, k) / C(n, k).

    n samples were drawn for a problem and c of them are correct; the result is the
    chance that at least one of k samples (drawn without replacement) is correct.
    The binomial ratio is computed as prod_{i=n-c+1..n} (1 - k/i), which never builds
    the huge binomials and so stays exact-ish for large n.
    """
    n, c, k = _as_int("n", n), _as_int("c", c), _as_int("k", k)
    if not 0 <= c <= n:
        raise ValueError(f"pass_at_k: need 0 <= c <= n, got c={c}, n={n}")
    if not 1 <= k <= n:
        raise ValueError(f"pass_at_k: need 1 <= k <= n, got k={k}, n={n}")
    if n - c < k:  # every k-subset must contain a correct sample
        return 1.0
    prob_all_wrong = math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))
    return 1.0 - prob_all_wrong


# -----------------------------------------------------------------------------
# metrics


def summarize(records, samples):
    """Metrics over result rows (as written to results.jsonl). Every row must hold `samples` completions.

    pass@1 is the mean over problems of c/n (= the unbiased pass@1); pass@k for every k in PASS_KS up to
    `samples`; mean completion length in tokens (EOS not counted); for MemGen rows the mean number of
    insertions per completion, with and without the one at the end of the prompt.
    """
    records = list(records)
    for r in records:
        if len(r["correct"]) != samples:
            raise EvalError(f"problem {r['id']} has {len(r['correct'])} completions, expected {samples}")
    out = {"n": len(records), "samples": samples}
    for k in PASS_KS:
        if k <= samples:
            out[f"pass@{k}"] = (sum(pass_at_k(samples, sum(r["correct"]), k) for r in records) / len(records)
                                if records else 0.0)
    lengths = [x for r in records for x in r["lengths"]]
    out["mean_length"] = sum(lengths) / len(lengths) if lengths else 0.0
    if records and all("insertions" in r for r in records):
        ins = [x for r in records for x in r["insertions"]]
        out["mean_inference_insertions"] = sum(sum(1 for t in x if t > 0) for x in ins) / len(ins)
        out["mean_insertions"] = sum(len(x) for x in ins) / len(ins)
    return out


# -----------------------------------------------------------------------------
# results.jsonl: append per batch, resume, survive a truncated last line


def read_results(path):
    """The complete rows of a results.jsonl. A last line cut off by a kill is dropped and the file is
    rewritten without it (atomically), so that later appends start on a clean line."""
    if not os.path.isfile(path):
        return []
    with open(path, "rb") as f:
        data = f.read()
    lines = data.split(b"\n")
    rows, good_bytes = [], 0
    for i, line in enumerate(lines):
        last = i == len(lines) - 1
        if not line.strip():
            if not last:
                good_bytes += len(line) + 1
            continue
        try:
            row = json.loads(line)
            if not isinstance(row, dict) or "id" not in row or "correct" not in row:
                raise ValueError
        except ValueError:
            if last or all(not x.strip() for x in lines[i + 1:]):
                break  # the tail a killed run left: dropped below
            raise EvalError(f"{path}, line {i + 1}: not a complete result row; delete the file (or that line) "
                            "or pick another --out") from None
        if last:  # valid JSON but no newline: a kill right before the '\n'; drop it too, it is rewritten
            break
        rows.append(row)
        good_bytes += len(line) + 1
    if good_bytes != len(data):
        print(f"eval.py: dropping an incomplete last line of {path} (an interrupted run); it is regenerated",
              file=sys.stderr)
        tmp = path + ".tmp"
        with open(tmp, "wb") as f:
            f.write(data[:good_bytes])
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    return rows


def append_results(path, rows):
    """Append whole rows at once, then flush + fsync: a kill leaves at most one cut-off last line."""
    with open(path, "a", encoding="utf-8") as f:
        f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        f.flush()
        os.fsync(f.fileno())


def write_json(path, obj):
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, ensure_ascii=False)
        f.write("\n")
    os.replace(tmp, path)


# -----------------------------------------------------------------------------
# generation


def _generate(target, tokenizer, mode, prompts, max_new_tokens, temperature, top_p, seed, trigger):
    """One generate call -> per row (completion ids without EOS, text, insertions or None)."""
    import lora
    import memgen
    from model import generate

    if mode == "memgen":
        outs = memgen.generate(target, tokenizer, prompts, max_new_tokens=max_new_tokens, temperature=temperature,
                               top_p=top_p, seed=seed, mode=trigger)
        eos = set(tokenizer.eos_ids)
        res = []
        for o in outs:
            ids = o["ids"][:-1] if o["ids"] and o["ids"][-1] in eos else o["ids"]
            res.append((ids, o["text"], list(o["insertions"])))
        return res
    with lora.use(target, "sft" if mode == "lora" else None):
        seqs, texts = generate(target, tokenizer, prompts, max_new_tokens=max_new_tokens, temperature=temperature,
                               top_p=top_p, seed=seed)
    return [(s, t, None) for s, t in zip(seqs, texts)]


def _check_settings(samples, temperature, top_p, batch_size, max_new_tokens):
    if not isinstance(samples, int) or samples < 1:
        raise EvalError(f"--samples must be >= 1, got {samples}")
    if temperature < 0 or not math.isfinite(temperature):
        raise EvalError(f"--temperature must be >= 0, got {temperature}")
    if samples > 1 and temperature == 0:
        raise EvalError(f"--samples {samples} with --temperature 0: greedy decoding gives {samples} identical "
                        "completions; use --samples 1, or sample with e.g. --temperature 1.0")
    if not 0 < top_p <= 1:
        raise EvalError(f"--top-p must be in (0, 1], got {top_p}")
    if batch_size < 1:
        raise EvalError(f"--batch-size must be >= 1, got {batch_size}")
    if max_new_tokens < 1:
        raise EvalError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")


def evaluate(model_or_mg, tokenizer, rows, mode, samples=1, temperature=0.0, top_p=1.0, batch_size=16,
             max_new_tokens=512, seed=0, trigger=None, out_path=None, progress=True):
    """
    Generate `samples` completions per problem, grade them, return summarize() plus timing.

    model_or_mg: a model.Transformer (modes vanilla/lora; lora needs an "sft" adapter on it) or a memgen.MemGen
    (mode memgen; trigger = a trigger mode, default the MemGen's own). rows: task rows {"id", "question",
    "answer"}. out_path: a results.jsonl to append to, batch by batch; problems whose id is already in it are
    not generated again, and the summary covers all of `rows`.
    Batches are fixed by the problems' positions in `rows` (batch i = problems i*P..(i+1)*P-1 with
    P = max(1, batch_size // samples)), and batch i is sampled with seed + i, so an interrupted run that is
    resumed with the same rows and batch size gives the same completions as an uninterrupted one.
    Modules are put in eval mode (no adapter dropout) and restored afterwards.
    """
    import memgen
    from data.gsm8k import extract_boxed, is_correct, messages
    from tqdm import tqdm

    if mode not in MODES:
        raise EvalError(f"unknown mode {mode!r}: use one of {', '.join(MODES)}")
    _check_settings(samples, temperature, top_p, batch_size, max_new_tokens)
    is_mg = isinstance(model_or_mg, memgen.MemGen)
    if mode == "memgen":
        if not is_mg:
            raise EvalError("mode memgen needs a memgen.MemGen, got a plain model")
        trigger = model_or_mg.mode if trigger is None else trigger
        if trigger not in memgen.TRIGGER_MODES:
            raise EvalError(f"unknown trigger mode {trigger!r}: use one of {', '.join(memgen.TRIGGER_MODES)}")
        target = model_or_mg
    else:
        target = model_or_mg.model if is_mg else model_or_mg
        if mode == "lora" and "sft" not in getattr(target, "lora_meta", {}):
            raise EvalError("mode lora needs an 'sft' adapter on the model (lora.inject or lora.load_adapter)")
    ids = [str(r["id"]) for r in rows]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise EvalError(f"problem id {dup!r} appears twice in the task rows; ids must be unique to resume")

    done = {}
    if out_path is not None:
        for rec in read_results(out_path):
            if len(rec["correct"]) != samples:
                raise EvalError(f"{out_path} holds rows with {len(rec['correct'])} completions per problem, this "
                                f"run asks for {samples}: pick another --out (or delete that file)")
            done[str(rec["id"])] = rec
    per_batch = max(1, batch_size // samples)  # problems per batch (one problem may need several calls)
    pending = {}  # batch index -> positions of problems still to do, in order
    for pos, i in enumerate(ids):
        if i not in done:
            pending.setdefault(pos // per_batch, []).append(pos)

    training = {m: m.training for m in model_or_mg.modules()}
    model_or_mg.eval()
    new_tokens, gen_s, t0 = 0, 0.0, time.time()
    todo = sum(len(v) for v in pending.values())
    bar = tqdm(total=len(rows), initial=len(rows) - todo, desc=f"eval {mode}", unit="problem",
               disable=not progress or None)
    try:
        for b, positions in pending.items():
            prompts = [tokenizer.chat(messages(rows[p]["question"])) for p in positions]
            flat = [prompts[j] for j in range(len(positions)) for _ in range(samples)]
            outs = []
            t1 = time.time()
            for c, start in enumerate(range(0, len(flat), batch_size)):
                outs += _generate(target, tokenizer, mode, flat[start:start + batch_size], max_new_tokens,
                                  temperature, top_p, seed + b + CALL_SEED_STRIDE * c, trigger)
            gen_s += time.time() - t1
            records = []
            for j, p in enumerate(positions):
                mine = outs[j * samples:(j + 1) * samples]
                gold = rows[p]["answer"]
                rec = {"id": ids[p], "question": rows[p]["question"], "gold": gold,
                       "completions": [t for _, t, _ in mine],
                       "extracted": [extract_boxed(t) for _, t, _ in mine],
                       "correct": [bool(is_correct(t, gold)) for _, t, _ in mine],
                       "lengths": [len(s) for s, _, _ in mine]}
                if mode == "memgen":
                    rec["insertions"] = [ins for _, _, ins in mine]
                records.append(rec)
                new_tokens += sum(rec["lengths"])
            if out_path is not None:
                append_results(out_path, records)
            for rec in records:
                done[rec["id"]] = rec
            bar.update(len(positions))
    finally:
        bar.close()
        for m, was in training.items():
            m.train(was)
    summary = summarize([done[i] for i in ids], samples)
    summary.update(wall_s=round(time.time() - t0, 3), generated_problems=todo, generated_tokens=new_tokens,
                   tokens_per_s=round(new_tokens / gen_s, 2) if gen_s > 0 else None)
    return summary


# -----------------------------------------------------------------------------
# command line


def die(msg):
    """One clear line on stderr and exit status 2 (no stack trace)."""
    print(f"eval.py: error: {msg}", file=sys.stderr)
    raise SystemExit(2)


def parse_flags(argv):
    """--key value / --key=value, dashes or underscores -> (settings dict, names given on the command line)."""
    cfg = {k: globals()[k.upper()] for k in FLAGS}
    given = set()
    valid = ", ".join("--" + k.replace("_", "-") for k in FLAGS)
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--") or arg == "--":
            die(f"unexpected argument {arg!r}: every setting is a flag (--key value or --key=value); valid flags: "
                f"{valid}")
        if "=" in arg:
            key, value = arg[2:].split("=", 1)
            i += 1
        else:
            key = arg[2:]
            if i + 1 >= len(argv):
                die(f"flag --{key} needs a value (--{key} VALUE or --{key}=VALUE)")
            value = argv[i + 1]
            i += 2
        name = key.replace("-", "_")
        if name not in FLAGS:
            die(f"unknown flag --{key}; valid flags: {valid}")
        kind = FLAGS[name]
        try:
            cfg[name] = kind(value)
        except ValueError:
            die(f"--{key} needs {'an integer' if kind is int else 'a number'}, got {value!r}")
        given.add(name)
    return cfg, given


def check_flags(cfg, given):
    import memgen

    if not cfg["model"]:
        die("--model is required: a local Hugging Face model folder or a hub id like org/name")
    if cfg["mode"] not in MODES:
        die(f"unknown --mode {cfg['mode']!r}; use one of {', '.join(MODES)}")
    if cfg["trigger"] not in memgen.TRIGGER_MODES:
        die(f"unknown --trigger {cfg['trigger']!r}; use one of {', '.join(memgen.TRIGGER_MODES)}")
    if "trigger" in given and cfg["mode"] != "memgen":
        die(f"--trigger only applies to --mode memgen (this run is --mode {cfg['mode']})")
    if cfg["mode"] == "lora" and not cfg["adapter"]:
        die("--mode lora needs --adapter DIR: a folder holding sft.safetensors + sft.json (lora.save_adapter)")
    if cfg["adapter"] and cfg["mode"] == "vanilla":
        die("--adapter is not used by --mode vanilla; use --mode lora or --mode memgen")
    if cfg["adapter"] and not os.path.isdir(cfg["adapter"]):
        die(f"adapter folder {cfg['adapter']} does not exist; pass the folder a training run saved to")
    if cfg["mode"] == "memgen" and cfg["trigger"] == "learned":
        if not cfg["adapter"] or not os.path.isfile(os.path.join(cfg["adapter"], "trigger.safetensors")):
            where = cfg["adapter"] or "(no --adapter given)"
            die(f"--trigger learned needs a trained trigger: {where} holds no trigger.safetensors; pass the "
                "folder the trigger training saved to, or use --trigger always")
    from model import ModelError, pick_dtype

    try:
        pick_dtype(cfg["dtype"])
    except ModelError as e:
        die(str(e))
    if cfg["limit"] < 0:
        die(f"--limit must be >= 0 (0 = all problems), got {cfg['limit']}")
    try:
        _check_settings(cfg["samples"], cfg["temperature"], cfg["top_p"], cfg["batch_size"], cfg["max_new_tokens"])
    except EvalError as e:
        die(str(e))


def run_label(cfg):
    """mode as shown in folder names and the results table: memgen runs name their trigger unless "always"."""
    if cfg["mode"] == "memgen" and cfg["trigger"] != "always":
        return f"memgen-{cfg['trigger']}"
    return cfg["mode"]


def model_identity(name):
    """A local folder by its absolute path (so ./m and /abs/m match on resume), a hub id as given."""
    return os.path.abspath(name) if os.path.isdir(name) else name


def append_markdown(path, cfg, summary):
    """One row per run in a table shared by all runs (created with its header)."""
    header = ("| date | data | mode | model | adapter | samples | "
              + " | ".join(f"pass@{k}" for k in PASS_KS) + " | n |\n"
              + "|" + " --- |" * (7 + len(PASS_KS)) + "\n")
    cells = [datetime.datetime.now().strftime("%Y-%m-%d %H:%M"), Path(cfg["data"]).stem if cfg["data"] != "gsm8k"
             else "gsm8k", run_label(cfg), Path(cfg["model"].rstrip("/")).name,
             Path(cfg["adapter"].rstrip("/")).name if cfg["adapter"] else "-", str(cfg["samples"])]
    cells += [f"{100 * summary[f'pass@{k}']:.1f}" if f"pass@{k}" in summary else "-" for k in PASS_KS]
    cells.append(str(summary["n"]))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if not os.path.isfile(path):
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.write(header)
        os.replace(tmp, path)
    with open(path, "a") as f:
        f.write("| " + " | ".join(cells) + " |\n")


def load_for(cfg):
    """Model, tokenizer and the thing to evaluate (the model, or a MemGen around it), per the flags."""
    import lora
    import memgen
    from data.download import DownloadError, resolve_model
    from model import ModelError, load_model
    from tokenizer import load_tokenizer

    try:
        folder = resolve_model(cfg["model"])
        model = load_model(folder, dtype=cfg["dtype"], device=cfg["device"])
        tok = load_tokenizer(folder)
    except (DownloadError, ModelError, ValueError) as e:
        die(str(e))
    target = model
    try:
        if cfg["mode"] == "lora":
            lora.load_adapter(model, "sft", cfg["adapter"])
        elif cfg["mode"] == "memgen":
            opts = {}
            info_path = os.path.join(cfg["adapter"], "weaver.json") if cfg["adapter"] else ""
            if info_path and os.path.isfile(info_path):
                with open(info_path) as f:
                    info = json.load(f)
                opts = {key: info[key] for key in ("k", "n") if key in info}
                opts.update({o: info[key] for o, key in (("rank", "rank"), ("alpha", "alpha"), ("dropout", "dropout"),
                                                          ("targets", "targets")) if key in info})
            target = memgen.MemGen(model, tok, mode=cfg["trigger"], **opts)
            if cfg["adapter"]:
                parts = [p for p in ("weaver", "trigger")
                         if os.path.isfile(os.path.join(cfg["adapter"], f"{p}.safetensors"))]
                if "weaver" not in parts:
                    die(f"{cfg['adapter']} holds no weaver.safetensors: pass the folder memgen.save wrote")
                memgen.load(target, cfg["adapter"], parts)
            else:
                print("eval.py: warning: --mode memgen without --adapter evaluates an UNTRAINED weaver "
                      "(random queries and maps); the numbers say nothing about MemGen", file=sys.stderr)
    except (lora.AdapterError, ModelError, OSError, json.JSONDecodeError) as e:
        die(str(e))
    return model, tok, target


def main(argv=None):
    cfg, given = parse_flags(sys.argv[1:] if argv is None else list(argv))
    check_flags(cfg, given)
    from data.download import DownloadError
    from data.gsm8k import DataError, load_task

    t0 = time.time()
    try:
        rows = load_task(cfg["data"], cfg["split"])
    except (DataError, DownloadError) as e:
        die(str(e))
    if cfg["limit"]:
        rows = rows[:cfg["limit"]]
    data_name = "gsm8k" if cfg["data"] == "gsm8k" else Path(cfg["data"]).stem
    out = cfg["out"] or os.path.join("out", "eval", f"{data_name}-{run_label(cfg)}-{Path(cfg['model'].rstrip('/')).name}")

    # settings that decide what a row holds; an existing folder must have been made with the same ones
    from model import ModelError, pick_device, pick_dtype

    run = {k: cfg[k] for k in RUN_KEYS}
    run.update(model=model_identity(cfg["model"]), adapter=os.path.abspath(cfg["adapter"]) if cfg["adapter"] else "",
               trigger=cfg["trigger"] if cfg["mode"] == "memgen" else None,
               dtype=str(pick_dtype(cfg["dtype"], pick_device(cfg["device"]))).replace("torch.", ""))
    os.makedirs(out, exist_ok=True)
    old = None
    for name in ("run.json", "summary.json"):
        p = os.path.join(out, name)
        if os.path.isfile(p):
            try:
                with open(p) as f:
                    obj = json.load(f)
                old = obj if name == "run.json" else obj.get("run")
            except (OSError, ValueError, AttributeError):
                old = None
            if old:
                break
    if old:
        diff = [k for k in RUN_KEYS if old.get(k) != run[k]]
        if diff:
            die(f"{out} holds results made with other settings ({', '.join(f'{k}: {old.get(k)!r} there, {run[k]!r} now' for k in diff)}); "
                "pass a different --out to keep both, or delete that folder")
    write_json(os.path.join(out, "run.json"), run)

    model, tok, target = load_for(cfg)
    print(f"eval.py: {len(rows)} problems x {cfg['samples']} samples, mode {run_label(cfg)}, model {cfg['model']}, "
          f"{model.dtype} on {model.device} -> {out}", file=sys.stderr)
    try:
        summary = evaluate(target, tok, rows, cfg["mode"], samples=cfg["samples"], temperature=cfg["temperature"],
                           top_p=cfg["top_p"], batch_size=cfg["batch_size"], max_new_tokens=cfg["max_new_tokens"],
                           seed=cfg["seed"], trigger=cfg["trigger"] if cfg["mode"] == "memgen" else None,
                           out_path=os.path.join(out, "results.jsonl"))
    except (EvalError, ModelError) as e:  # ModelError: e.g. a prompt longer than the model's context
        die(str(e))
    summary["eval_s"] = summary.pop("wall_s")  # generation + grading only; wall_s below includes loading
    summary.update(data=cfg["data"], mode=cfg["mode"], model=cfg["model"], wall_s=round(time.time() - t0, 3),
                   run=run, args=cfg)
    write_json(os.path.join(out, "summary.json"), summary)
    if cfg["results_md"]:
        append_markdown(cfg["results_md"], cfg, summary)

    width = max(len(k) for k in summary)
    for k, v in summary.items():
        if k not in ("run", "args"):
            print(f"{k:<{width}}  {v:.4f}" if isinstance(v, float) else f"{k:<{width}}  {v}")
    print(json.dumps({k: v for k, v in summary.items() if k != "args"}))
    return summary


if __name__ == "__main__":
    main()
