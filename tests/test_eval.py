"""eval.py end to end on a tiny random model and 5 real GSM8K test problems (the numbers are meaningless)."""
import json
from pathlib import Path

import pytest
import torch

import eval as ev
import lora
import memgen
from model import load_model
from tokenizer import load_tokenizer

GSM8K = Path(__file__).resolve().parents[1].parent / "shared/data/gsm8k"
needs_gsm8k = pytest.mark.skipif(not (GSM8K / "test.jsonl").is_file(),
                                 reason=f"the GSM8K files are not at {GSM8K} (tests serve them from there)")
FAST = ["--max-new-tokens", "8", "--dtype", "float32"]


@pytest.fixture(scope="module")
def folder(long_folder):
    return long_folder


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(autouse=True)
def env(monkeypatch, tmp_path, cache):
    monkeypatch.setenv("MEMGEN_GSM8K_URL", str(GSM8K))
    monkeypatch.setenv("MEMGEN_CACHE", cache)
    monkeypatch.chdir(tmp_path)  # the default out/ folders land in tmp, never in the repo


def run(folder, tmp_path, *args):
    return ev.main(["--model", folder, "--results-md", str(tmp_path / "results.md"), *FAST, *args])


def rows_of(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def count_calls(monkeypatch):
    """Wrap eval._generate: the number of completions generated per call."""
    calls = []
    real = ev._generate

    def counting(target, tokenizer, mode, prompts, *a):
        calls.append(len(prompts))
        return real(target, tokenizer, mode, prompts, *a)

    monkeypatch.setattr(ev, "_generate", counting)
    return calls


# ---- the three modes


@needs_gsm8k
def test_vanilla(folder, tmp_path):
    s = run(folder, tmp_path, "--limit", "5", "--batch_size=2")  # both flag spellings
    out = tmp_path / "out/eval" / f"gsm8k-vanilla-{Path(folder).name}"
    rows = rows_of(out / "results.jsonl")
    assert [r["id"] for r in rows] == [f"gsm8k-test-{i}" for i in range(5)]
    for r in rows:
        assert set(r) == {"id", "question", "gold", "completions", "extracted", "correct", "lengths"}
        assert len(r["completions"]) == len(r["correct"]) == len(r["lengths"]) == len(r["extracted"]) == 1
        assert 0 <= r["lengths"][0] <= 8 and isinstance(r["correct"][0], bool)
    assert rows[0]["gold"] == "18"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n"] == 5 and summary["samples"] == 1 and "pass@1" in summary and "pass@2" not in summary
    assert summary["run"]["mode"] == "vanilla" and summary["args"]["batch_size"] == 2
    assert summary["mean_length"] == pytest.approx(sum(r["lengths"][0] for r in rows) / 5)
    assert s["pass@1"] == summary["pass@1"]
    table = (tmp_path / "results.md").read_text().splitlines()
    assert table[0].startswith("| date | data | mode | model | adapter | samples | pass@1 |")
    assert len(table) == 3 and "| vanilla |" in table[2] and table[2].endswith("| 5 |")


@needs_gsm8k
def test_memgen(folder, tmp_path, capsys):
    model, tok = load_model(folder, dtype="float32"), load_tokenizer(folder)
    torch.manual_seed(0)
    memgen.save(memgen.MemGen(model, tok, k=2, n=1), str(tmp_path / "mg"))  # K, N must come from weaver.json
    s = run(folder, tmp_path, "--limit", "3", "--mode", "memgen", "--adapter", str(tmp_path / "mg"),
            "--trigger", "learned", "--out", str(tmp_path / "o"))
    rows = rows_of(tmp_path / "o/results.jsonl")
    assert len(rows) == 3
    for r in rows:
        for ins in r["insertions"]:
            assert len(ins) <= 1 + 1 and all(0 < t <= 8 for t in ins if t != ins[0])
    n_inf = [sum(t > 0 for t in ins) for r in rows for ins in r["insertions"]]
    assert s["mean_inference_insertions"] == pytest.approx(sum(n_inf) / len(n_inf))
    assert s["mean_insertions"] == pytest.approx(sum(len(i) for r in rows for i in r["insertions"]) / len(n_inf))
    assert json.loads((tmp_path / "o/summary.json").read_text())["run"]["trigger"] == "learned"
    # an untrained MemGen is allowed, with a warning
    run(folder, tmp_path, "--limit", "1", "--mode", "memgen", "--out", str(tmp_path / "o2"))
    assert "UNTRAINED" in capsys.readouterr().err
    assert rows_of(tmp_path / "o2/results.jsonl")[0]["insertions"][0][0] == 0  # mode always: the prompt one


@needs_gsm8k
def test_lora(folder, tmp_path):
    model = load_model(folder, dtype="float32")
    lora.inject(model, ["sft"])
    with torch.no_grad():  # a non-zero B so the adapter changes the outputs
        for k, p in lora.parameters(model, "sft").items():
            p.normal_(0, 0.5)
    lora.save_adapter(model, "sft", str(tmp_path / "sft"))
    run(folder, tmp_path, "--limit", "2", "--mode", "lora", "--adapter", str(tmp_path / "sft"),
        "--out", str(tmp_path / "o"))
    run(folder, tmp_path, "--limit", "2", "--out", str(tmp_path / "v"))
    with_lora, plain = rows_of(tmp_path / "o/results.jsonl"), rows_of(tmp_path / "v/results.jsonl")
    assert len(with_lora) == 2 and "insertions" not in with_lora[0]
    assert [r["completions"] for r in with_lora] != [r["completions"] for r in plain]


# ---- resuming


@needs_gsm8k
def test_resume_and_truncated_line(folder, tmp_path, monkeypatch):
    calls = count_calls(monkeypatch)
    args = ["--batch-size", "2", "--out", str(tmp_path / "o")]
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


@needs_gsm8k
def test_sampling_pass_at_k(folder, tmp_path, monkeypatch):
    import data.gsm8k

    # random weights never box an answer: grade by a checksum of the text so that c varies
    monkeypatch.setattr(data.gsm8k, "is_correct", lambda text, gold: sum(map(ord, text)) % 3 == 0)
    s = run(folder, tmp_path, "--limit", "3", "--samples", "4", "--temperature", "1.0", "--top-p", "0.9",
            "--batch-size", "8", "--seed", "3", "--out", str(tmp_path / "o"))
    assert {"pass@1", "pass@2", "pass@4"} <= set(s) and "pass@8" not in s
    rows = rows_of(tmp_path / "o/results.jsonl")
    assert all(len(r["completions"]) == 4 for r in rows)
    for k in (1, 2, 4):
        want = sum(ev.pass_at_k(4, sum(r["correct"]), k) for r in rows) / len(rows)
        assert s[f"pass@{k}"] == pytest.approx(want)
    assert s["pass@1"] == pytest.approx(sum(sum(r["correct"]) / 4 for r in rows) / 3)
    summary = json.loads((tmp_path / "o/summary.json").read_text())
    assert summary["pass@4"] == s["pass@4"]


def test_summarize():
    recs = [{"id": "a", "correct": [True, False], "lengths": [3, 5], "insertions": [[0, 2], [0]]},
            {"id": "b", "correct": [False, False], "lengths": [4, 4], "insertions": [[0, 1, 3], []]}]
    s = ev.summarize(recs, 2)
    assert s["n"] == 2 and s["pass@1"] == pytest.approx(0.25) and s["pass@2"] == pytest.approx(0.5)
    assert s["mean_length"] == 4 and s["mean_insertions"] == 1.5 and s["mean_inference_insertions"] == 0.75
    with pytest.raises(ev.EvalError, match="expected 4"):
        ev.summarize(recs, 4)


# ---- bad inputs: one clear line on stderr, exit status 2


@pytest.mark.parametrize("args, message", [
    (["--bogus", "1"], "unknown flag --bogus; valid flags: --data"),
    (["--mode", "lora"], "--mode lora needs --adapter"),
    (["--mode", "lora", "--adapter", "no/such/dir"], "adapter folder no/such/dir does not exist"),
    (["--samples", "4"], "--samples 4 with --temperature 0"),
    (["--samples", "two"], "--samples needs an integer"),
    (["--mode", "memgen", "--trigger", "learned"], "--trigger learned needs a trained trigger"),
    (["--trigger", "random"], "--trigger only applies to --mode memgen"),
])
def test_bad_inputs(folder, tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as e:
        run(folder, tmp_path, *args)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "results.md").exists()


def test_local_jsonl_task(folder, tmp_path):
    """--data path.jsonl: the same prompt frame and grading on the user's own problems (no GSM8K files needed)."""
    task = tmp_path / "mine.jsonl"
    task.write_text("".join(json.dumps({"question": f"What is {i} + {i}?", "answer": str(2 * i)}) + "\n"
                            for i in range(4)))
    s = run(folder, tmp_path, "--data", str(task), "--out", str(tmp_path / "o"))
    assert s["n"] == 4 and 0.0 <= s["pass@1"] <= 1.0
    rows = rows_of(tmp_path / "o" / "results.jsonl")
    assert [r["gold"] for r in rows] == ["0", "2", "4", "6"]
    assert all(len(r["completions"]) == 1 and len(r["correct"]) == 1 for r in rows)
    assert "| mine | vanilla |" in (tmp_path / "results.md").read_text()
