"""
evaluation.py: batched, resumable evaluation with pass@k - what eval.py and the trainers' validation and final eval
share.

    evaluate(policy, tokenizer, task, rows, mode, ...) -> summary dict
      policy: a model.Transformer (mode "vanilla", or "lora" with an "sft" adapter on it) or a memgen.MemGen
      (mode "memgen"); task: a task of the data registry (data.get_task); rows: its rows (task.load).

Each problem's prompt is the task's chat messages rendered by the tokenizer; its completions are graded by the
task's grader. A problem whose prompt does not fit the model's context is not generated: it is recorded as skipped,
with the reason, and counts as unsolved. With out_path, one row per problem is appended to a results.jsonl batch by
batch; a killed run resumes where it stopped.
"""
import contextlib
import datetime
import json
import math
import operator
import os
import sys
import time
from pathlib import Path

import data
from files import pyplot, save_figure, write_atomic, write_json

MODES = ("vanilla", "lora", "memgen")
PASS_KS = (1, 2, 4, 8, 16, 32)
CALL_SEED_STRIDE = 1_000_003  # when one batch needs several generate calls (samples > batch size)
# the settings that change what a result row holds: a resumed run must match them all (batch size and limit may
# change); the default output folder names those that differ from their defaults
RUN_KEYS = ("data", "split", "mode", "trigger_mode", "model", "adapter", "samples", "temperature", "top_p",
            "max_new_tokens", "seed", "dtype")


class EvalError(ValueError):
    """A bad argument or an output folder that does not fit this run; the message says what to do."""


# -----------------------------------------------------------------------------
# tasks (data.get_task)


def data_label(spec):
    """A --data spec as it appears in folder names and tables: "gsm8k", or the stem of its jsonl file."""
    path = spec.partition(":")[2] if ":" in spec else spec
    return Path(path).stem if path.endswith(".jsonl") else spec


# -----------------------------------------------------------------------------
# pass@k and summaries


def _as_int(name, value):
    try:
        if isinstance(value, bool):
            raise TypeError
        return operator.index(value)  # ints and numpy ints, not floats
    except TypeError:
        raise ValueError(f"pass_at_k: {name} must be an integer, got {value!r}") from None


def pass_at_k(n, c, k):
    """Unbiased pass@k of Chen et al. 2021: 1 - C(n-c, k) / C(n, k).

    n samples were drawn for a problem and c of them are correct; the result is the chance that at least one of k
    samples (drawn without replacement) is correct. The binomial ratio is computed as prod_{i=n-c+1..n} (1 - k/i),
    which never builds the huge binomials and so stays exact-ish for large n.
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


def mcnemar(a, b):
    """Two runs' paired outcomes on the same problems (bools, a[i] and b[i] for problem i) -> (lost, gained, p):
    problems a solves and b does not, the reverse, and the exact two-sided McNemar p (the binomial test of the
    discordant pairs against an even split; 1.0 when there are none)."""
    lost = sum(bool(x) and not y for x, y in zip(a, b))
    gained = sum(bool(y) and not x for x, y in zip(a, b))
    return lost, gained, sign_test(lost, gained)


def sign_test(lower, higher):
    """The exact two-sided sign test: the chance, under an even split, of counts at least as uneven as `lower` cases
    against `higher` (ties left out before counting); 1.0 when there are none."""
    n = lower + higher
    tail = sum(math.comb(n, i) for i in range(min(lower, higher) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def summarize(records, samples):
    """Metrics over result rows (as written to results.jsonl). Every generated row holds `samples` completions.

    n counts every problem, skipped ones included; skipped counts those whose prompt did not fit the model, and
    they count as unsolved in pass@k (a model that cannot read the problem does not solve it). pass@1 is the mean
    over problems of c/n (= the unbiased pass@1); pass@k for every k in PASS_KS up to `samples`; mean completion
    length in tokens (EOS not counted); for MemGen rows the mean number of insertions per completion, with and
    without the one at the end of the prompt, and the share of completions that inserted at the prompt end; with a
    learned trigger also its mean p(insert) at the prompt end and at the boundaries inside completions, and how
    often it was asked per completion.
    """
    records = list(records)
    done = [r for r in records if "skipped" not in r]
    for r in done:
        if len(r["correct"]) != samples:
            raise EvalError(f"problem {r['id']} has {len(r['correct'])} completions, expected {samples}")
    out = {"n": len(records), "skipped": len(records) - len(done), "samples": samples}
    for k in PASS_KS:
        if k <= samples:
            solved = sum(pass_at_k(samples, sum(r["correct"]), k) for r in done)
            out[f"pass@{k}"] = solved / len(records) if records else 0.0
    lengths = [x for r in done for x in r["lengths"]]
    out["mean_length"] = sum(lengths) / len(lengths) if lengths else 0.0
    if done and all("insertions" in r for r in done):
        ins = [x for r in done for x in r["insertions"]]
        out["mean_inference_insertions"] = sum(sum(1 for t in x if t > 0) for x in ins) / len(ins)
        out["mean_insertions"] = sum(len(x) for x in ins) / len(ins)
        out["prompt_insertion_rate"] = sum(bool(x) and x[0] == 0 for x in ins) / len(ins)
    if done and all("decisions" in r for r in done):  # a learned trigger: its mean p(insert) where it was asked
        dec = [d for r in done for x in r["decisions"] for d in x]
        at_prompt, inside = [p for t, p, _ in dec if t == 0], [p for t, p, _ in dec if t > 0]
        out["mean_p_insert_prompt"] = sum(at_prompt) / len(at_prompt) if at_prompt else None
        out["mean_p_insert_boundary"] = sum(inside) / len(inside) if inside else None
        out["trigger_asked_per_completion"] = len(dec) / sum(len(r["decisions"]) for r in done)
    return out


def pass_curve(records, samples):
    """[pass@1, pass@2, ..., pass@samples]: the unbiased pass@k at every k up to the completions drawn per problem
    (the curve of a pass@k-against-k plot), over all records, a skipped problem counted unsolved as in summarize."""
    return [sum(pass_at_k(samples, sum(r["correct"]), k) for r in records if "skipped" not in r) / len(records)
            if records else 0.0 for k in range(1, samples + 1)]


# -----------------------------------------------------------------------------
# results.jsonl: append per batch, resume, survive a truncated last line


def read_results(path):
    """The complete rows of a results.jsonl. A last line cut off by a kill is dropped and the file is rewritten
    without it (atomically), so that later appends start on a clean line."""
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
            if not isinstance(row, dict) or "id" not in row or not ("correct" in row or "skipped" in row):
                raise ValueError
        except ValueError:
            if last or all(not x.strip() for x in lines[i + 1:]):
                break  # the tail a killed run left: dropped below
            raise EvalError(f"{path}, line {i + 1}: not a complete result row; delete the file (or that line) "
                            "or pick another --out_dir") from None
        if last:  # valid JSON but no newline: a kill right before the '\n'; drop it too, it is rewritten
            break
        rows.append(row)
        good_bytes += len(line) + 1
    if good_bytes != len(data):
        print(f"evaluation: dropping an incomplete last line of {path} (an interrupted run); it is regenerated",
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


# -----------------------------------------------------------------------------
# generation and grading


def generate_batch(policy, tokenizer, mode, prompts, max_new_tokens, temperature=0.0, top_p=1.0, seed=0,
                   trigger_mode=None):
    """One generate call -> per row (completion ids without EOS, text, insertions or None, the trigger's decisions
    [completion index, p(insert) to 4 places, 0/1] where it was asked, or None)."""
    import lora
    import memgen
    from model import generate

    if mode == "memgen":
        outs = memgen.generate(policy, tokenizer, prompts, max_new_tokens=max_new_tokens, temperature=temperature,
                               top_p=top_p, seed=seed, mode=trigger_mode)
        eos = set(tokenizer.eos_ids)
        return [(o["ids"][:-1] if o["ids"] and o["ids"][-1] in eos else o["ids"], o["text"], list(o["insertions"]),
                 [[t, round(p, 4), f] for t, p, f in o["decisions"]]) for o in outs]
    with lora.use(policy, "sft" if mode == "lora" else None):
        seqs, texts = generate(policy, tokenizer, prompts, max_new_tokens=max_new_tokens, temperature=temperature,
                               top_p=top_p, seed=seed)
    return [(s, t, None, None) for s, t in zip(seqs, texts)]


def check_sampling(samples, temperature, top_p, batch_size, max_new_tokens):
    """The sampling settings of an evaluation, each checked with a one-line message naming the setting."""
    if not isinstance(samples, int) or samples < 1:
        raise EvalError(f"--samples must be >= 1, got {samples}")
    if temperature < 0 or not math.isfinite(temperature):
        raise EvalError(f"--temperature must be >= 0, got {temperature}")
    if samples > 1 and temperature == 0:
        raise EvalError(f"--samples={samples} with --temperature=0: greedy decoding gives {samples} identical "
                        "completions; use --samples=1, or sample with e.g. --temperature=1.0")
    if not 0 < top_p <= 1:
        raise EvalError(f"--top_p must be in (0, 1], got {top_p}")
    if batch_size < 1:
        raise EvalError(f"--batch_size must be >= 1, got {batch_size}")
    if max_new_tokens < 1:
        raise EvalError(f"--max_new_tokens must be >= 1, got {max_new_tokens}")


def prompt_room(policy, mode):
    """The longest prompt (in tokens) the policy can read and still write one token: the model's context, less
    the latents MemGen may insert (K at the prompt's end and after each of up to N sentences)."""
    if mode == "memgen":
        return policy.model.cfg.max_positions - policy.k * (policy.n + 1) - 1
    return policy.cfg.max_positions - 1


def _policy_for(policy, mode, trigger_mode):
    """(the object to generate with, trigger mode) for a mode, or EvalError."""
    import memgen

    is_mg = isinstance(policy, memgen.MemGen)
    if mode not in MODES:
        raise EvalError(f"unknown mode {mode!r}: use one of {', '.join(MODES)}")
    if mode == "memgen":
        if not is_mg:
            raise EvalError("mode memgen needs a memgen.MemGen, got a plain model")
        trigger_mode = policy.mode if trigger_mode is None else trigger_mode
        if trigger_mode not in memgen.TRIGGER_MODES:
            raise EvalError(f"unknown trigger mode {trigger_mode!r}: use one of {', '.join(memgen.TRIGGER_MODES)}")
        return policy, trigger_mode
    model = policy.model if is_mg else policy
    if mode == "lora" and "sft" not in getattr(model, "lora_meta", {}):
        raise EvalError("mode lora needs an 'sft' adapter on the model (lora.inject or lora.load_adapter)")
    return model, None


def evaluate(policy, tokenizer, task, rows, mode, samples=1, temperature=0.0, top_p=1.0, batch_size=16,
             max_new_tokens=512, seed=0, trigger_mode=None, out_path=None, progress=True):
    """
    Generate `samples` completions per problem, grade them with the task's grader, return summarize() plus timing.

    out_path: a results.jsonl to append to, batch by batch; problems whose id is already in it are not generated
    again, and the summary covers all of `rows`. Batches are fixed by the problems' positions in `rows` (batch i =
    problems i*P..(i+1)*P-1 with P = max(1, batch_size // samples)), and batch i is sampled with seed + i, so an
    interrupted run that is resumed with the same rows and batch size gives the same completions as an
    uninterrupted one. A prompt longer than prompt_room() is recorded as skipped, with the reason. Modules are put
    in eval mode (no adapter dropout) and restored afterwards.
    """
    from tqdm import tqdm

    check_sampling(samples, temperature, top_p, batch_size, max_new_tokens)
    gen_policy, trigger_mode = _policy_for(policy, mode, trigger_mode)
    ids = [str(r["id"]) for r in rows]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise EvalError(f"problem id {dup!r} appears twice in the task rows; ids must be unique to resume")
    done = _done_rows(out_path, samples)
    per_batch = max(1, batch_size // samples)  # problems per batch (one problem may need several calls)
    pending = {}  # batch index -> positions of problems still to do, in order
    for pos, i in enumerate(ids):
        if i not in done:
            pending.setdefault(pos // per_batch, []).append(pos)
    todo, new_tokens, gen_s, t0 = sum(len(v) for v in pending.values()), 0, 0.0, time.time()
    sampling = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, trigger_mode=trigger_mode)
    with _eval_mode(policy), tqdm(total=len(rows), initial=len(rows) - todo, desc=f"eval {mode}", unit="problem",
                                  disable=not progress or None) as bar:
        for b, positions in pending.items():
            records, dt = _batch_records(gen_policy, tokenizer, task, [rows[p] for p in positions], mode, samples,
                                         batch_size, seed + b, prompt_room(policy, mode), sampling)
            gen_s += dt
            new_tokens += sum(sum(rec.get("lengths", [])) for rec in records)
            if out_path is not None:
                append_results(out_path, records)
            done.update((rec["id"], rec) for rec in records)
            bar.update(len(positions))
    summary = summarize([done[i] for i in ids], samples)
    summary.update(wall_s=round(time.time() - t0, 3), generated_problems=todo, generated_tokens=new_tokens,
                   tokens_per_s=round(new_tokens / gen_s, 2) if gen_s > 0 else None)
    return summary


def _done_rows(out_path, samples):
    """{id: row} of the problems a results.jsonl already holds (none without one)."""
    done = {}
    for rec in read_results(out_path) if out_path is not None else []:
        if "correct" in rec and len(rec["correct"]) != samples:
            raise EvalError(f"{out_path} holds rows with {len(rec['correct'])} completions per problem, this run "
                            f"asks for {samples}: pick another --out_dir (or delete that file)")
        done[str(rec["id"])] = rec
    return done


def _batch_records(policy, tokenizer, task, rows, mode, samples, batch_size, seed, room, sampling):
    """One batch of problems generated (in calls of batch_size rows) and graded -> (their result rows, generation
    seconds). A prompt over `room` tokens is not generated: its row says why it was skipped."""
    prompts = [tokenizer.chat(task.messages(r)) for r in rows]
    fits = [j for j, p in enumerate(prompts) if len(p) <= room]
    flat = [prompts[j] for j in fits for _ in range(samples)]
    outs, t0 = [], time.time()
    for c, start in enumerate(range(0, len(flat), batch_size)):
        outs += generate_batch(policy, tokenizer, mode, flat[start:start + batch_size],
                               seed=seed + CALL_SEED_STRIDE * c, **sampling)
    dt = time.time() - t0
    graded = data.grade_all(task, [rows[j] for j in fits for _ in range(samples)], [o[1] for o in outs])
    records = []
    for j, row in enumerate(rows):
        rec = {"id": str(row["id"]), **({"question": row["question"]} if "question" in row else {}),
               "gold": row["answer"]}
        if j not in fits:
            rec["skipped"] = (f"the prompt has {len(prompts[j])} tokens, more than the {room} this model can read "
                              f"here ({mode}); the problem counts as unsolved")
        else:
            at = fits.index(j) * samples
            mine = outs[at:at + samples]
            rec.update(completions=[o[1] for o in mine], correct=graded[at:at + samples],
                       lengths=[len(o[0]) for o in mine])
            if mode == "memgen":
                rec["insertions"] = [o[2] for o in mine]
                if any(o[3] for o in mine):  # a learned trigger was asked: what it said, point by point
                    rec["decisions"] = [o[3] for o in mine]
        records.append(rec)
    return records, dt


@contextlib.contextmanager
def _eval_mode(policy):
    """The policy in eval mode (no adapter dropout) inside the block, each module's mode restored after it."""
    training = {m: m.training for m in policy.modules()}
    policy.eval()
    try:
        yield
    finally:
        for m, was in training.items():
            m.train(was)


def estimate_seconds(policy, tokenizer, task, rows, mode, batch_size, max_new_tokens, probe_tokens=4):
    """About how long a greedy evaluate() of `rows` takes at most (every completion at full length), from one
    batch decoding probe_tokens tokens, timed now."""
    gen_policy, trigger_mode = _policy_for(policy, mode, None)
    room = prompt_room(policy, mode)
    prompts = [p for p in (tokenizer.chat(task.messages(r)) for r in rows[:batch_size]) if len(p) <= room]
    if not prompts:
        return 0.0
    with _eval_mode(policy):
        t = time.time()
        generate_batch(gen_policy, tokenizer, mode, prompts, probe_tokens, trigger_mode=trigger_mode)
        per_token = (time.time() - t) / probe_tokens
    return math.ceil(len(rows) / batch_size) * max_new_tokens * per_token


# -----------------------------------------------------------------------------
# output folders and the cross-run table


def run_label(mode, trigger_mode):
    """The mode as shown in folder names and the results table: memgen runs name their trigger unless "always"."""
    return f"memgen-{trigger_mode}" if mode == "memgen" and trigger_mode != "always" else mode


def adapter_label(folder):
    """An adapter folder in a name: out/sft-gsm8k-M/final -> sft-gsm8k-M-final (a bare final/ says nothing)."""
    parts = Path(os.path.abspath(folder)).parts
    last = parts[-1]
    return f"{parts[-2]}-{last}" if (last == "final" or last.startswith("step-")) and len(parts) > 1 else last


def default_out_dir(cfg, defaults):
    """out/eval/<data>[-<split>]-<mode>-<model>[-<adapter>][-<setting><value> ...]: every setting that changes the
    results and differs from its default is in the name, so two different evaluations never share a folder."""
    name = [data_label(cfg["data"])]
    if cfg["split"] != defaults["split"]:
        name.append(cfg["split"])
    name += [run_label(cfg["mode"], cfg["trigger_mode"]), Path(cfg["model"].rstrip("/")).name]
    if cfg["adapter"]:
        name.append(adapter_label(cfg["adapter"]))
    if cfg.get("memory"):
        name.append(Path(cfg["memory"].rstrip("/")).name)
    name += [f"{k}{cfg[k]}" for k in RUN_KEYS if k not in ("data", "split", "mode", "trigger_mode", "model", "adapter")
             and cfg[k] != defaults[k]]
    return os.path.join("out", "eval", "-".join(name))


def claim_out_dir(out_dir, run):
    """Make out_dir this run's: refuse it when it holds results made with other settings (run.json), else write
    run.json. Called once the model has loaded, so a typo in the model path never claims a folder."""
    old = None
    for name in ("run.json", "summary.json"):
        p = os.path.join(out_dir, name)
        if os.path.isfile(p):
            try:
                with open(p) as f:
                    obj = json.load(f)
                old = obj if name == "run.json" else obj.get("run")
            except (OSError, ValueError, AttributeError):
                old = None
            if old:
                break
    diff = [k for k in RUN_KEYS if old and old.get(k) != run[k]]
    if diff:
        said = ", ".join(f"{k}: {old.get(k)!r} there, {run[k]!r} now" for k in diff)
        raise EvalError(f"{out_dir} holds results made with other settings ({said}); pass a different --out_dir to "
                        "keep both, or delete that folder")
    os.makedirs(out_dir, exist_ok=True)
    write_json(os.path.join(out_dir, "run.json"), run)


def append_markdown(path, cfg, summary):
    """One row per run in a table shared by all runs (created with its header)."""
    header = ("| date | data | mode | model | adapter | samples | "
              + " | ".join(f"pass@{k}" for k in PASS_KS) + " | n | skipped |\n"
              + "|" + " --- |" * (8 + len(PASS_KS)) + "\n")
    cells = [datetime.datetime.now().strftime("%Y-%m-%d %H:%M"), data_label(cfg["data"]),
             run_label(cfg["mode"], cfg["trigger_mode"]), Path(cfg["model"].rstrip("/")).name,
             adapter_label(cfg["adapter"]) if cfg["adapter"] else "-", str(cfg["samples"])]
    cells += [f"{100 * summary[f'pass@{k}']:.1f}" if f"pass@{k}" in summary else "-" for k in PASS_KS]
    cells += [str(summary["n"]), str(summary["skipped"])]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if not os.path.isfile(path):
        write_atomic(path, header)
    with open(path, "a") as f:
        f.write("| " + " | ".join(cells) + " |\n")


# -----------------------------------------------------------------------------
# the cross-domain table: rows = what was evaluated (mode, adapter, model), columns = tasks, cells = pass@1


def cross_domain_table(base, cfg, summaries):
    """Append this run's pass@1 per task to base.jsonl, then rewrite base.md (and base.png when matplotlib is
    installed) from every run recorded there; the latest run of a (row, task) pair wins. Returns the files."""
    row = " ".join([run_label(cfg["mode"], cfg["trigger_mode"])]
                   + ([adapter_label(cfg["adapter"])] if cfg["adapter"] else [])
                   + ([Path(cfg["memory"].rstrip("/")).name] if cfg.get("memory") else [])
                   + [Path(cfg["model"].rstrip("/")).name])
    os.makedirs(os.path.dirname(os.path.abspath(base)), exist_ok=True)
    with open(base + ".jsonl", "a") as f:
        for spec, s in summaries.items():
            score = {k: s[k] for k in ("mean_score", "score_stderr") if k in s}  # an agent task's episodes
            f.write(json.dumps({"row": row, "data": data_label(spec), "pass@1": s["pass@1"], "n": s["n"], **score,
                                "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M")}) + "\n")
    cells = {}
    with open(base + ".jsonl") as f:
        for line in f:
            if line.strip():
                r = json.loads(line)
                cells[(r["row"], r["data"])] = r
    rows = list(dict.fromkeys(r for r, _ in cells))
    cols = list(dict.fromkeys(d for _, d in cells))
    # an agent task's column: success rate (its pass@1) and the mean score 0-100 with its standard error
    scored = {d for (_, d), c in cells.items() if "mean_score" in c}

    def cell(c):
        return f"{100 * c['pass@1']:.1f} (n={c['n']})" + (
            f", score {c['mean_score']:.1f} ± {c['score_stderr']:.1f}" if "mean_score" in c else "")

    lines = ["| row | " + " | ".join(f"{d} success, mean score" if d in scored else f"{d} pass@1" for d in cols)
             + " |", "|---" * (len(cols) + 1) + "|"]
    for r in rows:
        lines.append(f"| {r} | " + " | ".join(cell(cells[r, d]) if (r, d) in cells else "" for d in cols) + " |")
    write_atomic(base + ".md", "\n".join(lines) + "\n")
    paths = [base + ".md"]
    plt = pyplot("evaluation")
    if plt is None:
        return paths
    fig, ax = plt.subplots(figsize=(1.5 + 1.6 * len(cols), 4))
    width = 0.8 / max(len(rows), 1)
    for i, r in enumerate(rows):
        xs = [j + i * width for j, d in enumerate(cols) if (r, d) in cells]
        ax.bar(xs, [100 * cells[r, d]["pass@1"] for d in cols if (r, d) in cells], width, label=r)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(cols))], cols)
    ax.set_ylabel("pass@1 (%)")
    ax.legend(fontsize=7)
    return paths + [save_figure(fig, base + ".png")]
