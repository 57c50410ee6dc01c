"""
passk.py: pass@k against k for eval.py runs that sampled several completions per problem - one table, one plot.
Greedy runs (one completion per problem) get pass@1 and, against the first run, the paired counts of problems lost
and gained with an exact McNemar p. MemGen runs also get how often they inserted memory and, with a learned
trigger, its mean p(insert) at the prompt end and at the boundaries inside completions.

    python eval.py --model=M --limit=50 --samples=16 --temperature=1.0 --out_dir=out/passk/vanilla
    python eval.py --model=M --mode=lora --adapter=A --limit=50 --samples=16 --temperature=1.0 --out_dir=out/passk/lora
    python passk.py --runs=vanilla=out/passk/vanilla,lora-sft=out/passk/lora --out=out/passk/curve

Multi-turn runs (eval.py on an agent task such as scienceworld: one episode per row, scored 0-100) get, beside
pass@1 (= success, score 100), the mean score with its standard error, turns and insertions per turn, and against the
first run the mean score difference with a paired bootstrap 95 % interval over the episodes, the episodes scored
higher, lower and the same, and an exact sign test of higher against lower.

Every k from 1 to the completions drawn per problem, with the unbiased estimator (evaluation.pass_curve; a problem
whose prompt did not fit counts as unsolved). The runs must hold the same problems and the same number of samples.
The first run is the baseline: for each other run the table also gives its difference to the baseline at each k
with a paired bootstrap 95 % interval over problems (the same resampled problems for every k). Writes OUT.md (the
tables), OUT.json (the figures, the runs' settings) and OUT.png (the plot; needs matplotlib).
"""
import json
import os
import sys

import errors
import evaluation
import settings
from files import pyplot, save_figure, write_atomic, write_json

RUNS = ""  # label=FOLDER pairs, comma-separated: eval.py output folders (results.jsonl + run.json); the first is the baseline
OUT = "out/passk"  # the outputs: OUT.md, OUT.json, OUT.png
BOOTSTRAP = 2000  # paired bootstrap resamples of the problems for the difference intervals (0 = none)
SEED = 0  # seeds the bootstrap
PLOTS = True  # draw OUT.png (needs matplotlib)
# -----------------------------------------------------------------------------
_PROG = "passk.py"


def parse_runs(spec):
    """"a=DIR,b=DIR" -> [(label, folder)], each label once."""
    runs = []
    for part in [p.strip() for p in spec.split(",") if p.strip()]:
        label, eq, folder = part.partition("=")
        if not eq or not label.strip() or not folder.strip():
            raise settings.SettingsError(f"--runs: {part!r} is not LABEL=FOLDER (e.g. vanilla=out/passk/vanilla)")
        runs.append((label.strip(), folder.strip()))
    labels = [r[0] for r in runs]
    if len(set(labels)) != len(labels):
        raise settings.SettingsError(f"--runs: the label {next(x for x in labels if labels.count(x) > 1)!r} is "
                                     "given twice")
    if not runs:
        raise settings.SettingsError("--runs is required: LABEL=FOLDER,... (eval.py output folders)")
    return runs


def load_run(label, folder):
    """(run settings, {problem id: result row}) of one eval.py output folder."""
    run_path, rows_path = os.path.join(folder, "run.json"), os.path.join(folder, "results.jsonl")
    if not os.path.isfile(run_path) or not os.path.isfile(rows_path):
        raise evaluation.EvalError(f"{label}: {folder} holds no eval.py results (run.json and results.jsonl); "
                                   "give the --out_dir of an eval.py run")
    with open(run_path) as f:
        run = json.load(f)
    rows = {str(r["id"]): r for r in evaluation.read_results(rows_path)}
    return run, rows


def curves(runs):
    """{label: {"run": settings, "n": problems, "samples": S, "pass@k": [pass@1..pass@S], "per_problem": [[...]]}};
    the runs must agree on their problems and samples."""
    out, ids = {}, None
    for label, folder in runs:
        run, rows = load_run(label, folder)
        samples = run.get("samples")
        if ids is None:
            ids, first, want = sorted(rows), label, samples
        elif sorted(rows) != ids:
            raise evaluation.EvalError(f"{label} holds {len(rows)} problems, {first} {len(ids)}, not the same ones: "
                                       "evaluate every run on the same problems (same --data, --split and --limit)")
        elif samples != want:
            raise evaluation.EvalError(f"{label} drew {samples} completions per problem, {first} {want}: give every "
                                       "run the same --samples")
        if not isinstance(samples, int) or samples < 1:
            raise evaluation.EvalError(f"{label}: run.json says {samples!r} completions per problem; give the "
                                       "--out_dir of a finished eval.py run")
        recs = [rows[i] for i in ids]
        if all("turns" in r for r in recs):  # multi-turn episodes (agent.py): a score 0-100 each, success at 100
            out[label] = episodes(label, run, recs)
            continue
        summary = evaluation.summarize(recs, samples)  # (also checks every row holds `samples` completions)
        per = [[0.0] * samples if "skipped" in r else
               [evaluation.pass_at_k(samples, sum(r["correct"]), k) for k in range(1, samples + 1)] for r in recs]
        out[label] = {"run": run, "n": len(recs), "samples": samples, "pass@k": evaluation.pass_curve(recs, samples),
                      "per_problem": per, "memory": {k: summary[k] for k in MEMORY_KEYS if k in summary}}
    return out


def episodes(label, run, recs):
    """curves()'s entry for a multi-turn run: its one "sample" per row is the episode, solved when it scored 100."""
    import agent

    if any(not isinstance(r.get("score"), (int, float)) for r in recs):
        raise evaluation.EvalError(f"{label}: its rows hold turns but not every one a score; give the --out_dir of "
                                   "an eval.py run on an agent task")
    s = agent.summarize(recs, memgen_rows=run.get("mode") == "memgen")
    return {"run": run, "n": len(recs), "samples": 1, "pass@k": [s["success_rate"]],
            "per_problem": [[1.0 if r["success"] else 0.0] for r in recs], "memory": {},
            "episodes": {k: s[k] for k in EPISODE_KEYS if k in s}, "scores": [r["score"] for r in recs]}


# multi-turn runs: agent.summarize's names
EPISODE_KEYS = ("mean_score", "score_stderr", "success_rate", "turns_per_episode", "wasted_turn_rate",
                "repeated_action_rate", "revisited_action_rate", "insertions_per_turn", "inference_insertions_per_turn",
                "end_done", "end_turn_limit", "end_context")


# MemGen runs: how often memory was inserted, and a learned trigger's p(insert) (evaluation.summarize's names)
MEMORY_KEYS = ("mean_insertions", "mean_inference_insertions", "prompt_insertion_rate", "mean_p_insert_prompt",
               "mean_p_insert_boundary")


def paired_bootstrap(a, b, resamples, seed):
    """95 % intervals of mean(b) - mean(a) at every k: a, b are (problems, K) per-problem pass@k of two runs over
    the same problems; each resample draws problems with replacement, the same draw for both runs and every k."""
    import numpy as np

    d = np.asarray(b) - np.asarray(a)
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, len(d), size=(resamples, len(d)))].mean(1)  # (resamples, K)
    return np.percentile(means, 2.5, axis=0).tolist(), np.percentile(means, 97.5, axis=0).tolist()


def report(res, resamples, seed):
    """The markdown tables and the JSON body."""
    labels = list(res)
    base = labels[0]
    S = res[base]["samples"]
    ks = list(range(1, S + 1))
    lines = ["| run | data | mode | temperature | top_p | n | " + " | ".join(f"pass@{k}" for k in ks) + " |",
             "|---" * (len(ks) + 6) + "|"]
    for label in labels:
        r, run = res[label], res[label]["run"]
        lines.append(f"| {label} | {run.get('data')} | {run.get('mode')} | {run.get('temperature')} | "
                     f"{run.get('top_p')} | {r['n']} | " + " | ".join(f"{100 * x:.1f}" for x in r["pass@k"]) + " |")
    body = {"k": ks, "runs": {label: {key: res[label][key] for key in ("run", "n", "samples", "pass@k", "memory")}
                              for label in labels}}
    with_memory = [label for label in labels if res[label]["memory"]]
    if with_memory:
        def cell(x, fmt):
            return "-" if x is None else format(x, fmt)

        lines += ["", "Memory insertions per completion (the one at the prompt end counted apart) and the learned "
                  "trigger's mean p(insert) where it was asked (- where the trigger was not learned):", "",
                  "| run | insertions | inside the completion | at the prompt end | p(insert) at the prompt end | "
                  "p(insert) at boundaries |", "|---|---|---|---|---|---|"]
        for label in with_memory:
            m = res[label]["memory"]
            lines.append(f"| {label} | {m['mean_insertions']:.2f} | {m['mean_inference_insertions']:.2f} | "
                         f"{m['prompt_insertion_rate']:.2f} | {cell(m.get('mean_p_insert_prompt'), '.3f')} | "
                         f"{cell(m.get('mean_p_insert_boundary'), '.3f')} |")
    if all("episodes" in res[label] for label in labels):
        lines += episode_tables(res, body, resamples, seed)
    elif resamples > 0 and len(labels) > 1:
        lines += ["", f"Minus {base}, in points, with a paired bootstrap 95 % interval over the {res[base]['n']} "
                  f"problems ({resamples} resamples):", "",
                  "| run | " + " | ".join(f"pass@{k}" for k in ks) + " |", "|---" * (len(ks) + 1) + "|"]
        for label in labels[1:]:
            lo, hi = paired_bootstrap(res[base]["per_problem"], res[label]["per_problem"], resamples, seed)
            diff = [b - a for a, b in zip(res[base]["pass@k"], res[label]["pass@k"])]
            body["runs"][label]["minus_baseline"] = {"diff": diff, "lo": lo, "hi": hi}
            lines.append(f"| {label} | " + " | ".join(f"{100 * d:+.1f} [{100 * a:+.1f}, {100 * b:+.1f}]"
                                                      for d, a, b in zip(diff, lo, hi)) + " |")
    if S == 1 and len(labels) > 1:  # greedy runs: each problem solved or not, paired with the baseline
        what = (f"Success (score 100) against {base}, episode by episode" if "episodes" in res[base] else
                f"Against {base}, problem by problem")
        lines += ["", f"{what} (exact two-sided McNemar test of the discordant pairs):", "",
                  "| run | pass@1 | lost | gained | p |", "|---|---|---|---|---|"]
        for label in labels[1:]:
            # with one sample a problem's pass@1 is 1 (solved) or 0 (not, or skipped)
            solved = {r: [x[0] == 1.0 for x in res[r]["per_problem"]] for r in (base, label)}
            lost, gained, p = evaluation.mcnemar(solved[base], solved[label])
            body["runs"][label]["mcnemar"] = {"lost": lost, "gained": gained, "p": p}
            lines.append(f"| {label} | {100 * res[label]['pass@k'][0]:.1f} | {lost} | {gained} | {p:.3g} |")
    body["baseline"], body["bootstrap"], body["seed"] = base, resamples, seed
    return "\n".join(lines) + "\n", body


def episode_tables(res, body, resamples, seed):
    """Multi-turn runs: each one's episodes in a row, then each against the first, episode by episode."""
    labels = list(res)
    base = labels[0]

    lines = ["", "Episodes (score 0-100 each; success = 100); insertions per turn with those inside replies in "
             "brackets; how the episodes ended:", "",
             "| run | episodes | mean score | s.e. | success | turns per episode | wasted turns | repeated actions | "
             "revisited actions | insertions per turn | done / turn limit / context |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for label in labels:
        e = res[label]["episodes"]
        body["runs"][label]["episodes"] = e
        ins = (f"{e['insertions_per_turn']:.2f} ({e['inference_insertions_per_turn']:.2f})"
               if "insertions_per_turn" in e else "-")  # MemGen runs only
        lines.append(f"| {label} | {res[label]['n']} | {e['mean_score']:.1f} | {e['score_stderr']:.1f} | "
                     f"{100 * e['success_rate']:.1f} % | {e['turns_per_episode']:.1f} | "
                     f"{100 * e['wasted_turn_rate']:.0f} % | {100 * e['repeated_action_rate']:.0f} % | "
                     f"{100 * e['revisited_action_rate']:.0f} % | {ins} | "
                     f"{e['end_done']} / {e['end_turn_limit']} / {e['end_context']} |")
    if len(labels) > 1:
        lines += ["", f"Against {base}, episode by episode: the mean score difference in points"
                  + (f" with a paired bootstrap 95 % interval over the episodes ({resamples} resamples)"
                     if resamples > 0 else "")
                  + ", the episodes scored higher, lower and the same, and the exact two-sided sign test of higher "
                  "against lower:", "", "| run | mean score | minus " + base + " | higher | lower | same | p |",
                  "|---|---|---|---|---|---|---|"]
        a = res[base]["scores"]
        for label in labels[1:]:
            b = res[label]["scores"]
            diff = res[label]["episodes"]["mean_score"] - res[base]["episodes"]["mean_score"]
            higher = sum(y > x for x, y in zip(a, b))
            lower = sum(y < x for x, y in zip(a, b))
            p = evaluation.sign_test(lower, higher)
            cmp = {"diff": diff, "higher": higher, "lower": lower, "same": len(a) - higher - lower, "p": p}
            ci = ""
            if resamples > 0:
                lo, hi = paired_bootstrap([[x] for x in a], [[y] for y in b], resamples, seed)
                cmp.update(lo=lo[0], hi=hi[0])
                ci = f" [{lo[0]:+.1f}, {hi[0]:+.1f}]"
            body["runs"][label]["score_minus_baseline"] = cmp
            lines.append(f"| {label} | {res[label]['episodes']['mean_score']:.1f} | {diff:+.1f}{ci} | {higher} | "
                         f"{lower} | {cmp['same']} | {p:.3g} |")
    return lines


def plot(res, path):
    plt = pyplot(_PROG)
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for label, r in res.items():
        ks = list(range(1, r["samples"] + 1))
        ax.plot(ks, [100 * x for x in r["pass@k"]], marker=".", label=label)
    ax.set_xscale("log", base=2)
    # labels at the powers of two (and the last k) only: on a log axis the high k crowd together
    major = [k for k in ks if k & (k - 1) == 0 or k == ks[-1]]
    ax.set_xticks(major, [str(k) for k in major])
    ax.set_xticks([k for k in ks if k not in major], minor=True)
    ax.tick_params(axis="x", which="minor", labelbottom=False)
    ax.set_xlabel("k (completions drawn per problem)")
    ax.set_ylabel("pass@k (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def main(argv=None):
    with errors.one_line_errors(_PROG):
        cfg, _ = settings.parse(sys.argv[1:] if argv is None else list(argv), globals(), _PROG)
        settings.at_least(cfg, 0, "bootstrap")
        runs = parse_runs(cfg["runs"])
        res = curves(runs)
        md, body = report(res, cfg["bootstrap"], cfg["seed"])
        body["runs_given"] = cfg["runs"]
        if os.path.dirname(cfg["out"]):
            os.makedirs(os.path.dirname(cfg["out"]), exist_ok=True)
        if body["k"] != [1]:
            title = "pass@k against k"
        elif any("episodes" in r for r in body["runs"].values()):
            title = "episodes, paired episode by episode"
        else:
            title = "pass@1, paired problem by problem"
        write_atomic(cfg["out"] + ".md", f"# {title}\n\n`python passk.py --runs={cfg['runs']}`\n\n" + md)
        write_json(cfg["out"] + ".json", body)
        png = plot(res, cfg["out"] + ".png") if cfg["plots"] else None
        print(md, end="")
        print(f"{_PROG}: wrote {cfg['out']}.md, {cfg['out']}.json" + (f", {png}" if png else ""), file=sys.stderr)
        return body


if __name__ == "__main__":
    main()
