"""eval.py end to end on a tiny random model and real GSM8K test problems (the 20-row fixture in tests/fixtures;
the numbers are meaningless), and its bad inputs as one clear line (issue 11)."""
import json
from pathlib import Path

import pytest
import torch

import eval as ev
import evaluation
import lora
import memgen
from model import load_model
from tokenizer import load_tokenizer

FAST = ["--max-new-tokens", "8", "--dtype", "float32", "--progress=false"]


@pytest.fixture(scope="module")
def folder(long_folder):
    return long_folder


@pytest.fixture(autouse=True)
def env(monkeypatch, tmp_path, gsm8k_fixture):
    monkeypatch.chdir(tmp_path)  # the default out/ folders land in tmp, never in the repo


def run(folder, tmp_path, *args):
    return ev.main(["--model", folder, "--results-md", str(tmp_path / "results.md"), *FAST, *args])


def rows_of(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def count_calls(monkeypatch):
    """Wrap evaluation.generate_batch: the number of completions generated per call."""
    calls = []
    real = evaluation.generate_batch

    def counting(policy, tokenizer, mode, prompts, *a, **kw):
        calls.append(len(prompts))
        return real(policy, tokenizer, mode, prompts, *a, **kw)

    monkeypatch.setattr(evaluation, "generate_batch", counting)
    return calls


# ---- the three modes


def test_vanilla_eval_writes_one_graded_row_per_problem_a_summary_and_a_table_row(folder, tmp_path):
    s = run(folder, tmp_path, "--limit", "5", "--batch_size=2")  # both flag spellings
    out = tmp_path / "out/eval" / f"gsm8k-vanilla-{Path(folder).name}-max_new_tokens8-dtypefloat32"
    rows = rows_of(out / "results.jsonl")
    assert [r["id"] for r in rows] == [f"gsm8k-test-{i}" for i in range(5)]
    for r in rows:
        assert set(r) == {"id", "question", "gold", "completions", "correct", "lengths"}
        assert len(r["completions"]) == len(r["correct"]) == len(r["lengths"]) == 1
        assert 0 <= r["lengths"][0] <= 8 and isinstance(r["correct"][0], bool)
    assert rows[0]["gold"] == "647.5"  # conftest.gsm8k_row(18)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n"] == 5 and summary["samples"] == 1 and "pass@1" in summary and "pass@2" not in summary
    assert summary["skipped"] == 0 and summary["pass@1"] == sum(r["correct"][0] for r in rows) / 5
    assert summary["run"]["mode"] == "vanilla" and summary["args"]["batch_size"] == 2
    assert summary["mean_length"] == pytest.approx(sum(r["lengths"][0] for r in rows) / 5)
    assert s["pass@1"] == summary["pass@1"]
    table = (tmp_path / "results.md").read_text().splitlines()
    assert table[0].startswith("| date | data | mode | model | adapter | samples | pass@1 |")
    assert len(table) == 3 and "| vanilla |" in table[2] and table[2].endswith("| 5 | 0 |")


def test_memgen_eval_takes_k_and_n_from_the_adapter_and_records_insertions(folder, tmp_path, capsys):
    model, tok = load_model(folder, dtype="float32"), load_tokenizer(folder)
    torch.manual_seed(0)
    memgen.save(memgen.MemGen(model, tok, k=2, n=1), str(tmp_path / "mg"))  # K, N must come from weaver.json
    s = run(folder, tmp_path, "--limit", "3", "--mode", "memgen", "--adapter", str(tmp_path / "mg"),
            "--trigger_mode", "learned", "--out_dir", str(tmp_path / "o"))
    rows = rows_of(tmp_path / "o/results.jsonl")
    assert len(rows) == 3
    for r in rows:
        for ins in r["insertions"]:
            assert len(ins) <= 1 + 1 and all(0 < t <= 8 for t in ins if t != ins[0])
    n_inf = [sum(t > 0 for t in ins) for r in rows for ins in r["insertions"]]
    assert s["mean_inference_insertions"] == pytest.approx(sum(n_inf) / len(n_inf))
    assert s["mean_insertions"] == pytest.approx(sum(len(i) for r in rows for i in r["insertions"]) / len(n_inf))
    assert json.loads((tmp_path / "o/summary.json").read_text())["run"]["trigger_mode"] == "learned"
    # the learned trigger's decisions, one list per completion, its first at the prompt end; their means summarized
    dec = [x for r in rows for x in r["decisions"]]
    assert len(dec) == len(n_inf) and all(x[0][0] == 0 for x in dec)
    for x, ins in zip(dec, [i for r in rows for i in r["insertions"]]):
        assert [t for t, _, f in x if f] == ins and all(0.0 <= p <= 1.0 for _, p, _ in x)
    assert s["mean_p_insert_prompt"] == pytest.approx(sum(x[0][1] for x in dec) / len(dec))
    assert s["prompt_insertion_rate"] == pytest.approx(sum(bool(i) and i[0] == 0 for i in
                                                           (i for r in rows for i in r["insertions"])) / len(dec))
    assert s["trigger_asked_per_completion"] == pytest.approx(sum(map(len, dec)) / len(dec))
    # an untrained MemGen is allowed, with a warning
    run(folder, tmp_path, "--limit", "1", "--mode", "memgen", "--out_dir", str(tmp_path / "o2"))
    assert "UNTRAINED" in capsys.readouterr().err
    assert rows_of(tmp_path / "o2/results.jsonl")[0]["insertions"][0][0] == 0  # mode always: the prompt one
    always = json.loads((tmp_path / "o2/summary.json").read_text())
    assert "decisions" not in rows_of(tmp_path / "o2/results.jsonl")[0] and "mean_p_insert_prompt" not in always
    assert always["prompt_insertion_rate"] == 1.0


def test_lora_eval_applies_the_adapter(folder, tmp_path):
    model = load_model(folder, dtype="float32")
    lora.inject(model, ["sft"])
    with torch.no_grad():  # a non-zero B so the adapter changes the outputs
        for k, p in lora.parameters(model, "sft").items():
            p.normal_(0, 0.5)
    lora.save_adapter(model, "sft", str(tmp_path / "sft"))
    run(folder, tmp_path, "--limit", "2", "--mode", "lora", "--adapter", str(tmp_path / "sft"),
        "--out_dir", str(tmp_path / "o"))
    run(folder, tmp_path, "--limit", "2", "--out_dir", str(tmp_path / "v"))
    with_lora, plain = rows_of(tmp_path / "o/results.jsonl"), rows_of(tmp_path / "v/results.jsonl")
    assert len(with_lora) == 2 and "insertions" not in with_lora[0]
    assert [r["completions"] for r in with_lora] != [r["completions"] for r in plain]


# ---- resuming


def test_resume_generates_only_missing_problems_and_a_cut_off_line_again(folder, tmp_path, monkeypatch):
    calls = count_calls(monkeypatch)
    args = ["--batch-size", "2", "--out_dir", str(tmp_path / "o")]
    run(folder, tmp_path, "--limit", "3", *args)
    assert sum(calls) == 3
    path = tmp_path / "o/results.jsonl"
    first = path.read_text().splitlines()
    calls.clear()
    s = run(folder, tmp_path, "--limit", "5", *args)
    lines = path.read_text().splitlines()
    assert sum(calls) == 2 and s["n"] == 5 and s["generated_problems"] == 2
    assert lines[:3] == first  # untouched, not regenerated
    assert sorted(json.loads(x)["id"] for x in lines) == [f"gsm8k-test-{i}" for i in range(5)]
    # a run killed mid-write: the cut-off last line is dropped and that problem generated again
    text = path.read_text()
    path.write_text(text[:len(text) - len(lines[-1]) // 2 - 1])
    calls.clear()
    s = run(folder, tmp_path, "--limit", "5", *args)
    assert sum(calls) == 1 and s["n"] == 5
    assert path.read_text().splitlines() == lines  # greedy, same batch: the very same row comes back
    # the same folder with other settings is refused
    with pytest.raises(SystemExit) as e:
        run(folder, tmp_path, "--limit", "5", "--samples", "2", "--temperature", "1", *args)
    assert e.value.code == 2


def test_sampled_pass_at_k_is_the_unbiased_estimate_over_the_rows(folder, tmp_path, monkeypatch):
    import data.gsm8k

    # random weights never box an answer: grade by a checksum of the text so that c varies
    monkeypatch.setattr(data.gsm8k, "is_correct", lambda text, gold: sum(map(ord, text)) % 3 == 0)
    s = run(folder, tmp_path, "--limit", "3", "--samples", "4", "--temperature", "1.0", "--top-p", "0.9",
            "--batch-size", "8", "--seed", "3", "--out_dir", str(tmp_path / "o"))
    assert {"pass@1", "pass@2", "pass@4"} <= set(s) and "pass@8" not in s
    rows = rows_of(tmp_path / "o/results.jsonl")
    assert all(len(r["completions"]) == 4 for r in rows)
    for k in (1, 2, 4):
        want = sum(evaluation.pass_at_k(4, sum(r["correct"]), k) for r in rows) / len(rows)
        assert s[f"pass@{k}"] == pytest.approx(want)
    assert s["pass@1"] == pytest.approx(sum(sum(r["correct"]) / 4 for r in rows) / 3)
    summary = json.loads((tmp_path / "o/summary.json").read_text())
    assert summary["pass@4"] == s["pass@4"]


def test_summary_metrics_by_hand_with_a_skipped_problem_counted_unsolved():
    recs = [{"id": "a", "correct": [True, False], "lengths": [3, 5], "insertions": [[0, 2], [0]]},
            {"id": "b", "correct": [False, False], "lengths": [4, 4], "insertions": [[0, 1, 3], []]}]
    s = evaluation.summarize(recs, 2)
    assert s["n"] == 2 and s["pass@1"] == pytest.approx(0.25) and s["pass@2"] == pytest.approx(0.5)
    assert s["mean_length"] == 4 and s["mean_insertions"] == 1.5 and s["mean_inference_insertions"] == 0.75
    s = evaluation.summarize(recs + [{"id": "c", "skipped": "too long"}], 2)
    assert s["n"] == 3 and s["skipped"] == 1 and s["pass@2"] == pytest.approx(1 / 3) and s["mean_length"] == 4
    with pytest.raises(evaluation.EvalError, match="expected 4"):
        evaluation.summarize(recs, 4)


# ---- bad inputs: one clear line on stderr, exit status 2


@pytest.mark.parametrize("args, message", [
    (["--bogus", "1"], "unknown setting --bogus; see --help for the list"),
    (["--mode", "lora"], "--mode=lora needs --adapter=DIR"),
    (["--mode", "lora", "--adapter", "no/such/dir"], "adapter folder no/such/dir does not exist"),
    (["--samples", "4"], "--samples=4 with --temperature=0"),
    (["--samples", "two"], "--samples='two': expected int"),
    (["--mode", "memgen", "--trigger_mode", "learned"], "--trigger_mode=learned needs a trained trigger"),
    (["--trigger_mode", "random"], "--trigger_mode only applies to --mode=memgen"),
    (["--device=cuda"], "CUDA was asked for (--device=cuda) but this torch has no CUDA (or no GPU is visible)"),
])
def test_bad_inputs_are_one_clear_line(folder, tmp_path, capsys, monkeypatch, args, message):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as e:
        run(folder, tmp_path, *args)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "results.md").exists() and not (tmp_path / "out").exists()


def test_a_mistyped_model_path_claims_no_folder_so_the_corrected_run_proceeds(folder, tmp_path, capsys):
    out = tmp_path / "o"
    with pytest.raises(SystemExit):
        run("/no/such/model", tmp_path, "--limit", "1", "--out_dir", str(out))
    assert "model folder '/no/such/model' does not exist" in capsys.readouterr().err
    assert not (out / "run.json").exists()
    assert run(folder, tmp_path, "--limit", "1", "--out_dir", str(out))["n"] == 1


def test_default_out_dir_names_the_adapter_so_a_second_adapter_is_a_new_folder(folder, tmp_path):
    model, tok = load_model(folder, dtype="float32"), load_tokenizer(folder)
    torch.manual_seed(0)
    mg = memgen.MemGen(model, tok, k=2, n=1)
    for name in ("sft-a/final", "sft-b/final"):
        memgen.save(mg, str(tmp_path / name))
        run(folder, tmp_path, "--limit", "1", "--mode=memgen", f"--adapter={tmp_path / name}")
    names = sorted(p.name for p in (tmp_path / "out/eval").iterdir())
    tail = "-max_new_tokens8-dtypefloat32"
    assert names == [f"gsm8k-memgen-{Path(folder).name}-sft-{x}-final{tail}" for x in "ab"]


def test_an_adapter_from_another_base_model_is_refused_unless_allowed(folder, tmp_path, capsys):
    model = load_model(folder, dtype="float32")
    lora.inject(model, ["sft"])
    lora.save_adapter(model, "sft", str(tmp_path / "sft"))
    info = json.loads((tmp_path / "sft/sft.json").read_text())
    (tmp_path / "sft/sft.json").write_text(json.dumps(dict(info, base_model="Qwen--Qwen2.5-1.5B-Instruct")))
    args = ["--limit", "1", "--mode=lora", f"--adapter={tmp_path / 'sft'}", "--out_dir", str(tmp_path / "o")]
    with pytest.raises(SystemExit):
        run(folder, tmp_path, *args)
    err = capsys.readouterr().err
    assert (f"was trained on base model Qwen--Qwen2.5-1.5B-Instruct, this run loads {Path(folder).name}: pass that "
            "--model, or --allow_other_base=true to load it anyway") in err
    assert run(folder, tmp_path, *args, "--allow_other_base=true")["n"] == 1


def test_a_prompt_longer_than_the_context_is_skipped_with_its_reason_and_the_run_goes_on(folder, tmp_path):
    task = tmp_path / "long.jsonl"
    questions = ["What is 1 + 1?", " ".join(["apples and pears"] * 800) + " How many?", "What is 2 + 2?"]
    task.write_text("".join(json.dumps({"question": q, "answer": str(i)}) + "\n" for i, q in enumerate(questions)))
    s = run(folder, tmp_path, "--data", str(task), "--out_dir", str(tmp_path / "o"))
    rows = rows_of(tmp_path / "o/results.jsonl")
    assert [("skipped" in r) for r in rows] == [False, True, False]
    reason = rows[1]["skipped"]
    assert reason.startswith("the prompt has ") and "more than the 1023 this model can read" in reason
    assert len(rows[0]["completions"]) == len(rows[2]["completions"]) == 1
    assert s["n"] == 3 and s["skipped"] == 1
    assert s["pass@1"] == pytest.approx((rows[0]["correct"][0] + rows[2]["correct"][0]) / 3)


def test_local_jsonl_task_is_prompted_and_graded_like_gsm8k(folder, tmp_path, monkeypatch):
    """--data path.jsonl: the same prompt frame and grading on the user's own problems."""
    import data.gsm8k

    monkeypatch.setattr(data.gsm8k, "is_correct", lambda text, gold: gold == "2")  # rigged: only problem 1 passes
    task = tmp_path / "mine.jsonl"
    task.write_text("".join(json.dumps({"question": f"What is {i} + {i}?", "answer": str(2 * i)}) + "\n"
                            for i in range(4)))
    s = run(folder, tmp_path, "--data", str(task), "--out_dir", str(tmp_path / "o"))
    assert s["n"] == 4 and s["pass@1"] == 0.25
    rows = rows_of(tmp_path / "o" / "results.jsonl")
    assert [r["gold"] for r in rows] == ["0", "2", "4", "6"] and [r["correct"] for r in rows] == [[False], [True],
                                                                                                 [False], [False]]
    assert "| mine | vanilla |" in (tmp_path / "results.md").read_text()


def test_several_tasks_in_one_run_fill_the_cross_domain_table(folder, tmp_path):
    """--data=A,B evaluates each task into its own folder; the table gets one row per evaluated policy and one
    column per task, each cell the pass@1 of that task's summary; a later run of another mode adds a row."""
    qa = tmp_path / "sums.jsonl"
    qa.write_text("".join(json.dumps({"question": f"What is {a} plus 1?", "answer": str(a + 1)}) + "\n"
                          for a in range(4)))
    table = str(tmp_path / "cross")
    both = run(folder, tmp_path, f"--data=gsm8k,{qa}", "--limit=3", f"--table={table}",
               f"--out_dir={tmp_path / 'v'}")
    assert list(both) == ["gsm8k", str(qa)] and [s["n"] for s in both.values()] == [3, 3]
    assert (tmp_path / "v" / "gsm8k" / "summary.json").exists() and (tmp_path / "v" / "sums" / "summary.json").exists()
    run(folder, tmp_path, f"--data=gsm8k,{qa}", "--limit=2", f"--table={table}", "--mode=memgen",
        f"--out_dir={tmp_path / 'm'}")
    md = Path(table + ".md").read_text().splitlines()
    assert md[0] == "| row | gsm8k pass@1 | sums pass@1 |" and len(md) == 4
    assert md[2].startswith("| vanilla ") and md[3].startswith("| memgen ")
    assert md[2].endswith(f"| {100 * both['gsm8k']['pass@1']:.1f} (n=3) | {100 * both[str(qa)]['pass@1']:.1f} (n=3) |")
    assert "(n=2)" in md[3]
    pytest.importorskip("matplotlib")
    assert Path(table + ".png").stat().st_size > 3000


def test_one_task_per_run_fills_one_row_when_the_table_is_named(folder, tmp_path, monkeypatch):
    """Tasks with different limits (GSM8K's first 100, all of HumanEval) are separate runs; each adds its cell to the
    same policy's row when --table is given, and a one-task run without --table leaves the default table alone."""
    qa = tmp_path / "sums.jsonl"
    qa.write_text("".join(json.dumps({"question": f"What is {a} plus 1?", "answer": str(a + 1)}) + "\n"
                          for a in range(4)))
    table = str(tmp_path / "cross")
    run(folder, tmp_path, "--data=gsm8k", "--limit=2", f"--table={table}", f"--out_dir={tmp_path / 'g'}")
    run(folder, tmp_path, f"--data={qa}", "--limit=3", f"--table={table}", f"--out_dir={tmp_path / 'q'}")
    md = Path(table + ".md").read_text().splitlines()
    assert md[0] == "| row | gsm8k pass@1 | sums pass@1 |" and len(md) == 3
    assert md[2].startswith("| vanilla ") and "(n=2)" in md[2] and "(n=3)" in md[2]
    monkeypatch.chdir(tmp_path)  # where the default table out/crossdomain would go
    run(folder, tmp_path, "--data=gsm8k", "--limit=1", f"--out_dir={tmp_path / 'x'}")
    assert Path(table + ".md").read_text().splitlines() == md and not (tmp_path / "out" / "crossdomain.md").exists()
