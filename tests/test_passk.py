"""passk.py and evaluation.pass_curve: pass@k at every k equals counting k-subsets by hand, the table and plot come
from eval.py's own result folders, and runs that cannot be compared are refused with one line (issue 24 item 3)."""
import itertools
import json
import math
from pathlib import Path

import pytest

import eval as ev
import evaluation
import passk


def by_subsets(correct, k):
    """The chance that k of the completions, drawn without replacement, hold a correct one: counted, not computed."""
    subsets = list(itertools.combinations(correct, k))
    return sum(any(s) for s in subsets) / len(subsets)


def records(pattern):
    """Result rows from per-problem correct lists; None = a skipped problem."""
    return [{"id": f"p{i}", "skipped": "too long"} if c is None else
            {"id": f"p{i}", "correct": c, "lengths": [1] * len(c)} for i, c in enumerate(pattern)]


PATTERN = [[True, False, False, False, False], [False] * 5, [True] * 5, [False, True, False, True, False], None]


def test_pass_curve_counts_k_subsets_and_agrees_with_summarize():
    recs = records(PATTERN)
    curve = evaluation.pass_curve(recs, 5)
    want = [sum(by_subsets(c, k) for c in PATTERN if c is not None) / len(PATTERN) for k in range(1, 6)]
    assert curve == pytest.approx(want)
    assert all(a <= b for a, b in zip(curve, curve[1:]))  # more draws never lower the chance
    s = evaluation.summarize(recs, 5)
    assert [s["pass@1"], s["pass@2"], s["pass@4"]] == pytest.approx([curve[0], curve[1], curve[3]])


def write_run(folder, pattern, samples=5, reverse=False, **run):
    folder.mkdir(parents=True)
    rows = records(pattern)[::-1 if reverse else 1]
    (folder / "run.json").write_text(json.dumps(dict(dict(data="gsm8k", mode="vanilla", temperature=1.0, top_p=1.0),
                                                     samples=samples, **run)))
    (folder / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(folder)


def test_table_json_and_plot_from_result_folders(tmp_path, capsys):
    a = write_run(tmp_path / "a", PATTERN)
    better = [[True, True, False, False, False], [False, False, False, False, True], [True] * 5,
              [True, True, False, True, False], None]
    b = write_run(tmp_path / "b", better, mode="memgen")
    same = write_run(tmp_path / "c", PATTERN, reverse=True)  # the same rows in another order: ids decide
    out = str(tmp_path / "o" / "curve")
    body = passk.main([f"--runs=vanilla={a},memgen={b},again={same}", f"--out={out}", "--bootstrap=500"])
    assert body["k"] == [1, 2, 3, 4, 5] and body["baseline"] == "vanilla"
    va, mg = body["runs"]["vanilla"], body["runs"]["memgen"]
    assert va["pass@k"] == pytest.approx(evaluation.pass_curve(records(PATTERN), 5))
    assert mg["pass@k"] == pytest.approx(evaluation.pass_curve(records(better), 5))
    d = mg["minus_baseline"]
    assert d["diff"] == pytest.approx([y - x for x, y in zip(va["pass@k"], mg["pass@k"])])
    assert all(lo <= x <= hi for x, lo, hi in zip(d["diff"], d["lo"], d["hi"]))
    assert max(h - lo for lo, h in zip(d["lo"], d["hi"])) > 0  # the problems disagree, so the interval has width
    again = body["runs"]["again"]["minus_baseline"]
    # the same rows in another order (ids match): no difference, and no width
    assert again["diff"] == pytest.approx([0] * 5) and again["lo"] == pytest.approx([0] * 5) == again["hi"]
    md = Path(out + ".md").read_text()
    assert "| vanilla | gsm8k | vanilla | 1.0 | 1.0 | 5 | 32.0 |" in md and "| memgen | " in md and "Minus vanilla" in md
    assert json.loads(Path(out + ".json").read_text())["runs"]["memgen"]["n"] == 5
    pytest.importorskip("matplotlib")
    assert Path(out + ".png").stat().st_size > 5000


@pytest.mark.parametrize("case,message", [
    ("other-problems", "not the same ones"),
    ("other-samples", "the same --samples"),
    ("no-samples", "completions per problem"),
    ("missing", "holds no eval.py results"),
    ("bad-spec", "is not LABEL=FOLDER"),
    ("twice", "given twice"),
])
def test_runs_that_cannot_be_compared_are_one_clear_line(tmp_path, capsys, case, message):
    a = write_run(tmp_path / "a", PATTERN)
    runs = {"other-problems": lambda: f"a={a},b={write_run(tmp_path / 'b', PATTERN[:3])}",
            "other-samples": lambda: f"a={a},b={write_run(tmp_path / 'b', [c and c[:4] for c in PATTERN], samples=4)}",
            "no-samples": lambda: f"a={write_run(tmp_path / 'b', [[True], [False]], samples=None)}",
            "missing": lambda: f"a={a},b={tmp_path / 'nowhere'}",
            "bad-spec": lambda: f"a={a},{tmp_path}",
            "twice": lambda: f"a={a},a={a}"}[case]()
    with pytest.raises(SystemExit):
        passk.main([f"--runs={runs}", f"--out={tmp_path / 'o'}"])
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and err.startswith("passk.py: error:")
    assert not (tmp_path / "o.md").exists()


def test_the_curve_of_real_eval_runs_matches_their_summaries(long_folder, gsm8k_fixture, tmp_path, monkeypatch):
    import data.gsm8k

    monkeypatch.chdir(tmp_path)
    # random weights never box an answer: grade by a checksum of the text so that c varies
    monkeypatch.setattr(data.gsm8k, "is_correct", lambda text, gold: sum(map(ord, text)) % 3 == 0)
    runs = []
    for seed in (0, 1):
        out = tmp_path / f"s{seed}"
        ev.main(["--model", long_folder, "--limit", "4", "--samples", "4", "--temperature", "1.0", "--seed", str(seed),
                 "--max-new-tokens", "6", "--dtype", "float32", "--progress=false", "--results-md=", "--table=",
                 f"--out_dir={out}"])
        runs.append(f"seed{seed}={out}")
    body = passk.main([f"--runs={','.join(runs)}", f"--out={tmp_path / 'curve'}", "--plots=false"])
    for seed in (0, 1):
        s = json.loads((tmp_path / f"s{seed}" / "summary.json").read_text())
        curve = body["runs"][f"seed{seed}"]["pass@k"]
        assert [curve[0], curve[1], curve[3]] == pytest.approx([s["pass@1"], s["pass@2"], s["pass@4"]])
    assert body["runs"]["seed0"]["pass@k"] != body["runs"]["seed1"]["pass@k"]  # c varied with the sampled text


def test_mcnemar_counts_the_discordant_pairs_and_its_p_is_the_exact_binomial_one():
    a = [True] * 40 + [False] * 15 + [True] * 10 + [False] * 35
    b = [False] * 35 + [True] * 5 + [True] * 13 + [False] * 2 + [True] * 10 + [False] * 35
    lost, gained, p = evaluation.mcnemar(a, b)
    assert (lost, gained) == (35, 13)
    # two-sided: twice the chance of 13 or fewer of 48 fair coin flips (the findings' 56.7 -> 43.3, p = 0.002)
    assert p == pytest.approx(2 * sum(math.comb(48, i) for i in range(14)) / 2 ** 48) and round(p, 3) == 0.002
    assert evaluation.mcnemar([True] * 5, [False] * 5)[2] == pytest.approx(0.0625)
    assert evaluation.mcnemar([True, False], [True, False]) == (0, 0, 1.0)
    assert evaluation.mcnemar([True] * 3 + [False] * 3, [False] * 3 + [True] * 3) == (3, 3, 1.0)


def test_greedy_runs_get_pass_at_1_and_a_paired_mcnemar_table(tmp_path, capsys):
    base = [[True], [True], [False], [True], [False], None]
    other = [[False], [True], [True], [False], [False], None]
    a = write_run(tmp_path / "a", base, samples=1, temperature=0.0)
    b = write_run(tmp_path / "b", other, samples=1, temperature=0.0, mode="memgen")
    body = passk.main([f"--runs=always={a},learned={b}", f"--out={tmp_path / 'o'}", "--plots=false"])
    assert body["k"] == [1] and body["runs"]["always"]["pass@k"] == pytest.approx([3 / 6])
    assert body["runs"]["learned"]["mcnemar"] == {"lost": 2, "gained": 1, "p": 1.0}
    assert "| learned | 33.3 | 2 | 1 | 1 |" in (tmp_path / "o.md").read_text()


def test_memgen_runs_get_their_insertions_and_the_trigger_p_insert(tmp_path):
    """The insertion table: per completion, insertions (t = 0 is the prompt end), and the mean p(insert) of a learned
    trigger where it was asked, split at the prompt end and inside; a run without a learned trigger shows "-"."""
    rows = records([[True], [False]])
    rows[0].update(insertions=[[0, 5, 9]], decisions=[[(0, 0.8, True), (5, 0.6, True), (9, 0.7, True)]])
    rows[1].update(insertions=[[4]], decisions=[[(0, 0.2, False), (4, 0.9, True)]])
    always = records([[True], [True]])
    always[0].update(insertions=[[0, 3]])
    always[1].update(insertions=[[0]])
    for name, rs in (("a", always), ("l", rows)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "run.json").write_text(json.dumps(dict(data="gsm8k", mode="memgen", temperature=0.0,
                                                                  top_p=1.0, samples=1)))
        (tmp_path / name / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rs))
    body = passk.main([f"--runs=always={tmp_path / 'a'},learned={tmp_path / 'l'}", f"--out={tmp_path / 'o'}",
                       "--plots=false"])
    m = body["runs"]["learned"]["memory"]
    assert m["mean_insertions"] == 2.0 and m["mean_inference_insertions"] == 1.5
    assert m["prompt_insertion_rate"] == 0.5
    assert m["mean_p_insert_prompt"] == pytest.approx(0.5) and m["mean_p_insert_boundary"] == pytest.approx(2.2 / 3)
    md = (tmp_path / "o.md").read_text()
    assert md.startswith("# pass@1, paired problem by problem")
    assert "| always | 1.50 | 0.50 | 1.00 | - | - |" in md
    assert "| learned | 2.00 | 1.50 | 0.50 | 0.500 | 0.733 |" in md


def write_episodes(folder, scores, mode="vanilla", ins=None):
    """An eval.py folder of a multi-turn run: one episode per row, scored 0-100, two turns each."""
    folder.mkdir()
    (folder / "run.json").write_text(json.dumps(dict(data="scienceworld", mode=mode, temperature=0.0, top_p=1.0,
                                                     samples=1)))
    rows = []
    for i, s in enumerate(scores):
        turn = {"reply": "x", "action": "look around" if i % 2 else None, "observation": "o", "score": s,
                "insertions": list(ins or []), "tokens": 3}
        rows.append({"id": f"task-{i}", "question": "q", "score": s, "success": s == 100, "correct": [s == 100],
                     "end": "done" if s == 100 else "turn_limit", "turns": [turn, turn]})
    (folder / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(folder)


def test_episode_runs_get_mean_score_and_a_paired_sign_test(tmp_path):
    """Multi-turn runs: mean score and its standard error as agent.summarize gives them, and against the first run the
    mean difference with its bootstrap interval, episodes higher / lower / the same, and the sign test's p."""
    import agent

    base = [0, 0, 57, 100, 10, 0, 33, 0]
    other = [0, 25, 57, 100, 0, 8, 100, 8]  # 4 higher, 1 lower, 3 the same
    a = write_episodes(tmp_path / "a", base)
    b = write_episodes(tmp_path / "b", other, mode="memgen", ins=[0, 4])
    body = passk.main([f"--runs=vanilla={a},memgen={b}", f"--out={tmp_path / 'o'}", "--plots=false",
                       "--bootstrap=500"])
    recs = [json.loads(x) for x in open(Path(b) / "results.jsonl")]
    e = body["runs"]["memgen"]["episodes"]
    want = agent.summarize(recs, memgen_rows=True)
    assert e["mean_score"] == pytest.approx(want["mean_score"]) and e["score_stderr"] == want["score_stderr"] > 0
    assert e["insertions_per_turn"] == 2 and e["inference_insertions_per_turn"] == 1
    assert e["repeated_action_rate"] == want["repeated_action_rate"] == 0.5  # odd episodes repeat "look around"
    assert e["revisited_action_rate"] == want["revisited_action_rate"] == 0.5  # two turns: a revisit is a repeat
    assert body["runs"]["memgen"]["pass@k"] == [2 / 8] and body["runs"]["vanilla"]["pass@k"] == [1 / 8]
    c = body["runs"]["memgen"]["score_minus_baseline"]
    assert c["diff"] == pytest.approx((sum(other) - sum(base)) / 8)
    assert (c["higher"], c["lower"], c["same"]) == (4, 1, 3)
    assert c["p"] == pytest.approx(evaluation.sign_test(1, 4)) == pytest.approx(2 * 6 / 32)
    assert c["lo"] <= c["diff"] <= c["hi"] and c["hi"] - c["lo"] > 0
    assert body["runs"]["memgen"]["mcnemar"] == {"lost": 0, "gained": 1, "p": 1.0}  # success, paired
    md = (tmp_path / "o.md").read_text()
    assert md.startswith("# episodes, paired episode by episode")
    assert "| vanilla | 8 | 25.0 |" in md and "| memgen | 37.2 | +12.2 [" in md and "| 4 | 1 | 3 | 0.375 |" in md
    assert "Success (score 100) against vanilla, episode by episode" in md
    assert "| 50 % | 50 % | 2.00 (1.00) |" in md and "| - |" in md  # vanilla has no insertions column value


def test_sign_test_is_the_exact_two_sided_binomial_and_symmetric():
    assert evaluation.sign_test(0, 0) == 1.0
    assert evaluation.sign_test(0, 5) == pytest.approx(2 / 32) == evaluation.sign_test(5, 0)
    assert evaluation.sign_test(3, 3) == 1.0
    assert evaluation.sign_test(2, 10) == pytest.approx(2 * sum(math.comb(12, i) for i in range(3)) / 2 ** 12)
