"""Tasks as plug-ins: the registry, gsm8k/qa's interface, choice and fever formats, HumanEval (data, prompt,
sandboxed grading, download)."""

import gzip
import hashlib
import importlib
import json
import sys
import time
import types
from pathlib import Path

import pytest

import data
from data import choice, fever, get_task, grade_all, gsm8k, humaneval, qa
from data.download import DownloadError, cache_dir
from data.gsm8k import DataError

FIXTURES = Path(__file__).resolve().parent / "fixtures"
HUMANEVAL5 = FIXTURES / "humaneval5.jsonl"
CHOICE = FIXTURES / "choice.jsonl"
FEVER = FIXTURES / "fever.jsonl"
SHARED_HUMANEVAL = Path(__file__).resolve().parents[1].parent / "shared/data/humaneval"
needs_humaneval = pytest.mark.skipif(not (SHARED_HUMANEVAL / "HumanEval.jsonl.gz").is_file(),
                                     reason=f"{SHARED_HUMANEVAL} is absent")


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def qa_file(tmp_path):
    return write_jsonl(tmp_path / "mini.jsonl", [{"question": f"What is {i} + {i}?", "answer": str(2 * i)}
                                                 for i in range(10)])


# -----------------------------------------------------------------------------
# registry

def test_registry_names_give_the_modules():
    assert get_task("gsm8k") is gsm8k and get_task("humaneval") is humaneval
    for name, module_name in {**data.TASKS, **data.FORMATS}.items():
        module = importlib.import_module(module_name)
        assert module.NAME == name
        assert all(callable(getattr(module, f)) for f in ("load", "messages", "grade"))


def test_format_and_path_specs(qa_file):
    for spec in (f"qa:{qa_file}", str(qa_file)):  # a bare .jsonl path means qa:
        task = get_task(spec)
        assert task.NAME == "qa" and task.path == str(qa_file)
        assert task.load("test") == gsm8k.load_jsonl_task(qa_file)
    task = get_task(f"choice:{CHOICE}")
    assert task.NAME == "choice" and [r["answer"] for r in task.load("test")] == ["B", "A", "D", "B"]
    assert get_task(f"fever:{FEVER}").load("test")[2]["answer"] == "NOT ENOUGH INFO"
    task = get_task(f"humaneval:{HUMANEVAL5}")  # any task reads a local file in its own format
    assert len(task.load("test")) == 5 and task.grade_many is humaneval.grade_many


@pytest.mark.parametrize("spec, message", [
    ("mmlu", r"^unknown task 'mmlu'; use one of: gsm8k, humaneval, scienceworld, qa:FILE\.jsonl, choice:FILE\.jsonl, "
             r"fever:FILE\.jsonl, FILE\.jsonl \(= qa:FILE\.jsonl\)$"),
    ("mmlu:x.jsonl", r"^unknown task 'mmlu'; use one of: gsm8k, humaneval"),
    ("../x.txt", r"^unknown task '\.\./x\.txt'; use one of"),
    ("", r"^a task must be a name or FORMAT:PATH, got ''"),
    (None, r"^a task must be a name or FORMAT:PATH, got None"),
    ("choice", r"^the choice format reads a local file: use choice:path/to/file\.jsonl$"),
    ("qa:missing.jsonl", r"^task file missing\.jsonl \(from 'qa:missing\.jsonl'\) does not exist$"),
    ("missing.jsonl", r"^task file missing\.jsonl \(from 'missing\.jsonl'\) does not exist$"),
    ("download", r"^data\.download is not a task module: it lacks NAME, load, messages, grade"),
])
def test_bad_specs(spec, message):
    with pytest.raises(DataError, match=message):
        get_task(spec)


def test_adding_a_task_is_adding_one_module(monkeypatch):
    # stands in for a new file data/mytask.py: get_task finds it by name, no registry edit needed
    mytask = types.ModuleType("data.mytask")
    mytask.NAME = "mytask"
    mytask.load = lambda split, path=None: [{"id": "1", "answer": "x", "target": None}]
    mytask.messages = lambda row: [{"role": "user", "content": "say x"}]
    mytask.grade = lambda row, completion: completion == row["answer"]
    monkeypatch.setitem(sys.modules, "data.mytask", mytask)
    task = get_task("mytask")
    rows = task.load("test")
    assert grade_all(task, rows, ["x"]) == [True] and grade_all(task, rows, ["y"]) == [False]


def test_grade_all_uses_grade_many_when_present():
    calls = []
    task = types.SimpleNamespace(grade=lambda row, c: 1 / 0,  # never called
                                 grade_many=lambda rows, cs, workers: calls.append(workers) or [True] * len(rows))
    assert grade_all(task, [{}, {}], ["a", "b"], workers=3) == [True, True] and calls == [3]
    with pytest.raises(DataError, match="grade_all got 2 rows but 1 completions"):
        grade_all(task, [{}, {}], ["a"])


# -----------------------------------------------------------------------------
# gsm8k and qa: the interface over the existing functions

def test_gsm8k_interface(qa_file):
    rows = gsm8k.load("test", path=qa_file)
    row = rows[3]
    assert gsm8k.messages(row) == gsm8k.messages(row["question"]) == [{
        "role": "user", "content": "Solve the math problem with proper reasoning, and make sure to put the FINAL "
                                   "ANSWER inside \\boxed{}.Question: What is 3 + 3?\n"}]
    assert gsm8k.grade(row, "3 + 3 = 6, so \\boxed{6}.") and not gsm8k.grade(row, "\\boxed{7}")
    assert not gsm8k.grade(row, None) and not gsm8k.grade(row, "\\boxed{6")
    train, val = gsm8k.load("train", path=qa_file), gsm8k.load("val", path=qa_file)
    assert (train, val) == gsm8k.train_val_split(rows) and len(val) == 1
    with pytest.raises(DataError, match="needs a question string or a row with a 'question' string, got int"):
        gsm8k.messages(7)
    with pytest.raises(DataError, match=r"unknown split 'dev'; use one of \['train', 'val', 'test'\]"):
        gsm8k.load("dev", path=qa_file)


def test_qa_needs_a_path(qa_file):
    assert qa.load("test", qa_file) == gsm8k.load("test", qa_file) and qa.grade is gsm8k.grade
    with pytest.raises(DataError, match="the qa format reads a local file: name the task qa:path/to/file.jsonl"):
        qa.load("test")


# -----------------------------------------------------------------------------
# choice

def test_choice_rows_prompt_and_target():
    rows = choice.load("test", CHOICE)
    assert [r["id"] for r in rows] == ["arc-1", "choice-1", "17", "arc-4"]
    assert rows[0]["target"] == "Plants take in carbon dioxide and give off oxygen.\n\n\\boxed{B}"
    assert rows[1]["target"] == "\\boxed{A}" and rows[3]["target"] == "\\boxed{B}"  # empty explanation: no gap
    assert choice.messages(rows[0]) == [{"role": "user", "content": (
        "Answer the following multiple-choice question. Reason step by step, then write the letter of the "
        "correct option inside \\boxed{}.\n\nQuestion: Which gas do plants take in for photosynthesis?\n\n"
        "Options:\nA. Oxygen\nB. Carbon dioxide\nC. Nitrogen\nD. Helium\n")}]
    assert all(choice.grade(r, r["target"]) for r in rows)
    train, val = choice.load("train", CHOICE), choice.load("val", CHOICE)
    assert sorted(r["id"] for r in train + val) == sorted(r["id"] for r in rows)


@pytest.mark.parametrize("completion, right", [
    ("\\boxed{B}", True), ("so \\boxed{b}", True), ("\\boxed{(B)}", True), ("\\boxed{B.}", True),
    ("\\boxed{B)}", True), ("\\boxed{\\text{B}}", True), ("\\boxed{\\textbf{(B)}}", True),
    ("\\boxed{ B }", True), ("$\\boxed{B}$", True), ("\\boxed{B. Carbon dioxide}", True),
    ("\\boxed{(B) Carbon dioxide}", True), ("\\boxed{B} and later \\boxed{A}", True),
    ("\\boxed{A} and later \\boxed{B}", False),  # only the first box counts
    ("\\boxed{A}", False), ("\\boxed{BC}", False), ("\\boxed{B, C}", False), ("\\boxed{Carbon dioxide}", False),
    ("\\boxed{A cat}", False), ("\\boxed{}", False), ("The answer is B", False), ("\\boxed{B", False),
    ("", False), (None, False), (42, False),
])
def test_choice_grader(completion, right):
    row = choice.load("test", CHOICE)[0]
    assert choice.grade(row, completion) is right


@pytest.mark.parametrize("line, message", [
    ({"question": "q", "choices": ["a", "b"], "answer": "C"}, "answer 'C' is not a letter A-B nor a 0-based index below 2"),
    ({"question": "q", "choices": ["a", "b"], "answer": 2}, "answer 2 is not a letter A-B"),
    ({"question": "q", "choices": ["a", "b"], "answer": "AB"}, "answer 'AB' is not a letter"),
    ({"question": "q", "choices": ["a", "b"], "answer": True}, "answer True is not a letter"),
    ({"question": "q", "choices": ["a", "b"]}, "answer None is not a letter"),
    ({"question": "q", "choices": ["a"], "answer": "A"}, "field 'choices' must be a list of 2 to 26 non-empty strings"),
    ({"question": "q", "choices": "ab", "answer": "A"}, "field 'choices' must be a list"),
    ({"question": "q", "choices": ["a", ""], "answer": "A"}, "field 'choices' must be a list"),
    ({"choices": ["a", "b"], "answer": "A"}, "field 'question' is missing"),
    ({"question": "q", "choices": ["a", "b"], "answer": "A", "explanation": 3}, "field 'explanation' must be a string"),
])
def test_choice_bad_lines(tmp_path, line, message):
    f = write_jsonl(tmp_path / "bad.jsonl", [{"question": "ok", "choices": ["a", "b"], "answer": "A"}, line])
    with pytest.raises(DataError, match=f"^{f}, line 2: {message}"):
        choice.load("test", f)


def test_choice_needs_a_path_and_a_real_file(tmp_path):
    with pytest.raises(DataError, match="the choice format reads a local file"):
        choice.load("test")
    with pytest.raises(DataError, match="does not exist"):
        choice.load("test", tmp_path / "nope.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match="has no rows"):
        choice.load("test", tmp_path / "empty.jsonl")


# -----------------------------------------------------------------------------
# fever

def test_fever_rows_and_prompts():
    rows = fever.load("test", FEVER)
    assert [(r["id"], r["answer"], r["target"]) for r in rows] == [
        ("f1", "SUPPORTS", "\\boxed{SUPPORTS}"), ("f2", "REFUTES", "\\boxed{REFUTES}"),
        ("fever-2", "NOT ENOUGH INFO", "\\boxed{NOT ENOUGH INFO}")]
    assert fever.messages(rows[0])[0]["content"] == (
        "Decide whether the claim below is supported or refuted by the evidence, or whether there is not enough "
        "information to tell. Reason briefly, then write exactly one of SUPPORTS, REFUTES or NOT ENOUGH INFO inside "
        "\\boxed{}.\n\nClaim: The Eiffel Tower is in Paris.\n\nEvidence:\n"
        "The Eiffel Tower is a wrought-iron lattice tower in Paris, France.\nIt was completed in 1889.\n")
    assert fever.messages(rows[2]) == [{"role": "user", "content": (
        "Decide whether the claim below is supported or refuted, or whether there is not enough information to "
        "tell. Reason briefly, then write exactly one of SUPPORTS, REFUTES or NOT ENOUGH INFO inside \\boxed{}."
        "\n\nClaim: Ada Lovelace owned a cat named Rex.\n")}]
    assert all(fever.grade(r, r["target"]) for r in rows)


@pytest.mark.parametrize("completion, right", [
    ("\\boxed{NOT ENOUGH INFO}", True), ("\\boxed{NOT_ENOUGH_INFO}", True), ("\\boxed{not enough info}", True),
    ("\\boxed{Not-Enough-Info.}", True), ("\\boxed{\\text{NOT ENOUGH INFO}}", True), ("\\boxed{ not  enough_info }", True),
    ("\\boxed{NOTENOUGHINFO}", False), ("\\boxed{NOT ENOUGH INFORMATION}", False), ("\\boxed{SUPPORTS}", False),
    ("\\boxed{REFUTES} or \\boxed{NOT ENOUGH INFO}", False), ("NOT ENOUGH INFO", False), ("\\boxed{}", False),
    (None, False),
])
def test_fever_grader(completion, right):
    row = fever.load("test", FEVER)[2]
    assert fever.grade(row, completion) is right


@pytest.mark.parametrize("line, message", [
    ({"claim": "c", "label": "TRUE"}, "label 'TRUE' is not one of SUPPORTS, REFUTES, NOT ENOUGH INFO"),
    ({"claim": "c"}, "label None is not one of"),
    ({"label": "SUPPORTS"}, "field 'claim' is missing"),
    ({"claim": "c", "label": "SUPPORTS", "evidence": 5}, "field 'evidence' must be a string or a list of strings"),
])
def test_fever_bad_lines(tmp_path, line, message):
    f = write_jsonl(tmp_path / "bad.jsonl", [line])
    with pytest.raises(DataError, match=f"^{f}, line 1: {message}"):
        fever.load("test", f)


# -----------------------------------------------------------------------------
# humaneval: data and prompt

@pytest.fixture(scope="module")
def he5():
    return humaneval.load("test", HUMANEVAL5)


def test_humaneval_fixture_rows_and_prompt(he5):
    assert [r["id"] for r in he5] == [f"HumanEval/{i}" for i in range(5)]
    r = he5[0]
    assert r["entry_point"] == "has_close_elements" and "def check(candidate):" in r["answer"]
    prompt = ('from typing import List\n\n\ndef has_close_elements(numbers: List[float], threshold: float) -> bool:\n'
              '    """ Check if in given list of numbers, are any two numbers closer to each other than\n'
              '    given threshold.\n    >>> has_close_elements([1.0, 2.0, 3.0], 0.5)\n    False\n'
              '    >>> has_close_elements([1.0, 2.8, 3.0, 4.0, 5.0, 2.0], 0.3)\n    True\n    """\n')
    assert r["prompt"] == prompt
    assert humaneval.messages(r) == [{"role": "user", "content": (
        "Complete the Python function below so that it is correct and efficient. Reply with the whole function, "
        "signature included, inside a ```python code block.\n\n```python\n" + prompt + "```\n")}]
    assert r["target"] == ("```python\n" + prompt + "    for idx, elem in enumerate(numbers):\n"
                           "        for idx2, elem2 in enumerate(numbers):\n            if idx != idx2:\n"
                           "                distance = abs(elem - elem2)\n                if distance < threshold:\n"
                           "                    return True\n\n    return False\n```")


@pytest.mark.parametrize("split", ["train", "val"])
def test_humaneval_has_only_a_test_split(split):
    with pytest.raises(DataError, match=f"^HumanEval has only a 'test' split \\(164 problems\\), no '{split}' split"):
        humaneval.load(split, HUMANEVAL5)
    with pytest.raises(DataError, match="unknown split 'dev'"):
        humaneval.load("dev", HUMANEVAL5)


def test_humaneval_bad_files(tmp_path):
    with pytest.raises(DataError, match="HumanEval file .*nope.jsonl does not exist"):
        humaneval.load("test", tmp_path / "nope.jsonl")
    (tmp_path / "bad.jsonl.gz").write_bytes(b"not gzip")
    with pytest.raises(DataError, match=r"cannot read HumanEval file .*bad\.jsonl\.gz \(.*\); expected a jsonl"):
        humaneval.load("test", tmp_path / "bad.jsonl.gz")
    line = json.loads(HUMANEVAL5.read_text().splitlines()[0])
    del line["test"]
    f = write_jsonl(tmp_path / "missing.jsonl", [line])
    with pytest.raises(DataError, match=r"line 1: missing or non-string field\(s\) \['test'\]"):
        humaneval.load("test", f)
    f = write_jsonl(tmp_path / "entry.jsonl", [{**json.loads(HUMANEVAL5.read_text().splitlines()[0]),
                                                 "entry_point": "os.system"}])
    with pytest.raises(DataError, match=r"line 1: entry_point 'os.system' is not a Python name"):
        humaneval.load("test", f)


# -----------------------------------------------------------------------------
# humaneval: grading

def test_fixture_canonical_right_and_bare_prompt_wrong(he5):
    assert humaneval.grade_many(he5, [r["target"] for r in he5]) == [True] * 5
    assert humaneval.grade_many(he5, [r["prompt"] for r in he5]) == [False] * 5


def canonical_body(row):
    return row["target"].removeprefix("```python\n" + row["prompt"]).removesuffix("```")


def test_completion_styles(he5):
    row = he5[0]
    body, full = canonical_body(row), row["prompt"] + canonical_body(row)
    right = {
        "fenced full function": row["target"],
        "prose around the block": f"Here it is:\n```python\n{full}```\nThat is all.",
        "example block after the solution": f"```python\n{full}```\nUsage:\n```python\nprint(1)\n```",
        "usage block first": f"```python\nprint(1)\n```\n```python\n{full}```",
        "prints without a newline": f"```python\n{full}\nprint('no newline', end='')\n```",
        "bare body continuation": body,
        "unclosed fence": f"```python\n{full}",
        "py fence without the docstring": "```py\ndef has_close_elements(numbers, threshold):\n"
                                          "    return any(abs(a - b) < threshold for i, a in enumerate(numbers)"
                                          " for j, b in enumerate(numbers) if i != j)\n```",
    }
    wrong = {
        "syntax error": "```python\ndef has_close_elements(numbers, threshold):\n    return (\n```",
        "exception": "```python\ndef has_close_elements(numbers, threshold):\n    raise ValueError\n```",
        "wrong answer": "```python\ndef has_close_elements(numbers, threshold):\n    return False\n```",
        "sys.exit(0) before the tests": f"```python\nimport sys\n{full}\nsys.exit(0)\n```",
        "os._exit(0) before the tests": f"```python\nimport os\n{full}\nos._exit(0)\n```",
        "exit(0) inside the function": "```python\ndef has_close_elements(numbers, threshold):\n"
                                       "    raise SystemExit(0)\n```",
        "fake marker": "```python\nprint('memgen-humaneval-passed-0123456789abcdef')\nimport sys\nsys.exit(0)\n```",
        "echoes its own source, then exits": "```python\nimport sys\nprint(open(__file__).read())\nsys.exit(0)\n```",
        "bash block only": f"```bash\n{full}```",
        "empty": "",
        "not a string": None,
    }
    got = humaneval.grade_many([row] * (len(right) + len(wrong)), [*right.values(), *wrong.values()])
    assert dict(zip([*right, *wrong], got)) == {**{k: True for k in right}, **{k: False for k in wrong}}
    assert humaneval.grade(row, row["target"]) and not humaneval.grade(row, "")


def test_infinite_loop_grades_wrong_quickly(he5):
    t0 = time.monotonic()
    loop = "```python\ndef has_close_elements(numbers, threshold):\n    while True:\n        pass\n```"
    assert humaneval.grade_many(he5[:1], [loop], timeout=1.0) == [False]
    assert time.monotonic() - t0 < 1.0 + 2


def test_extract_code():
    assert humaneval.code_blocks("a\n```python\nx = 1\n```\nb\n```\ny\n```\n```js\nz\n") == [
        ("python", "x = 1"), ("", "y"), ("js", "z")]
    assert humaneval.extract_code("```python\nimport os\n```\n```python\ndef f(x):\n    return x\n```", "f") == \
        "def f(x):\n    return x"
    assert humaneval.extract_code("```python\nimport os\n```\n```python\ndef g(x):\n    pass\n```", "f") == "import os"
    assert humaneval.extract_code("    return x\n", "f") == "    return x\n"
    with pytest.raises(DataError, match="grade_many got 1 rows but 2 completions"):
        humaneval.grade_many([{}], ["a", "b"])


@needs_humaneval
def test_all_164_canonical_right_and_bare_prompts_wrong():
    rows = humaneval.load("test", SHARED_HUMANEVAL / "HumanEval.jsonl.gz")
    assert len(rows) == 164
    right = humaneval.grade_many(rows, [r["target"] for r in rows], workers=2)
    assert [r["id"] for r, ok in zip(rows, right) if not ok] == []
    wrong = humaneval.grade_many(rows, [r["prompt"] for r in rows], workers=2)
    assert [r["id"] for r, ok in zip(rows, wrong) if ok] == []


# -----------------------------------------------------------------------------
# humaneval: download

@needs_humaneval
@pytest.mark.parametrize("source", ["folder", "file", "file URL of the folder"])
def test_humaneval_download_from_local_override(source, tmp_path, monkeypatch):
    monkeypatch.setenv("MEMGEN_CACHE", str(tmp_path / "cache"))
    gz = SHARED_HUMANEVAL / "HumanEval.jsonl.gz"
    override = {"folder": str(SHARED_HUMANEVAL), "file": str(gz), "file URL of the folder": SHARED_HUMANEVAL.as_uri()}
    monkeypatch.setenv("MEMGEN_HUMANEVAL_URL", override[source])
    rows = humaneval.load("test")
    assert len(rows) == 164 and rows[0]["id"] == "HumanEval/0"
    cached = cache_dir() / "humaneval" / "HumanEval.jsonl.gz"
    assert hashlib.sha256(cached.read_bytes()).hexdigest() == humaneval.SHA256
    monkeypatch.setenv("MEMGEN_HUMANEVAL_URL", "http://127.0.0.1:9/")  # cached: the source is not touched again
    assert len(humaneval.load("test")) == 164


def test_humaneval_wrong_sha_is_rejected(tmp_path, monkeypatch):
    monkeypatch.setenv("MEMGEN_CACHE", str(tmp_path / "cache"))
    gz = tmp_path / "src" / "HumanEval.jsonl.gz"
    gz.parent.mkdir()
    gz.write_bytes(gzip.compress(HUMANEVAL5.read_bytes(), mtime=0))
    monkeypatch.setenv("MEMGEN_HUMANEVAL_URL", str(gz.parent))
    with pytest.raises(DownloadError, match=f"sha256 mismatch .*expected {humaneval.SHA256}, got .*; set "
                                            "MEMGEN_HUMANEVAL_URL to a folder or URL holding the official"):
        humaneval.load("test")
    assert not (cache_dir() / "humaneval" / "HumanEval.jsonl.gz").exists()
    # the same file passes with its own sha: the check is what rejected it
    sha = hashlib.sha256(gz.read_bytes()).hexdigest()
    path = humaneval.fetch(str(gz), sha256=sha)
    assert [p["task_id"] for p in humaneval.read_problems(path)] == [f"HumanEval/{i}" for i in range(5)]


def test_humaneval_bad_override(tmp_path, monkeypatch):
    monkeypatch.setenv("MEMGEN_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("MEMGEN_HUMANEVAL_URL", str(tmp_path / "nowhere"))
    with pytest.raises(DataError, match="is neither a URL nor an existing file or folder; set MEMGEN_HUMANEVAL_URL"):
        humaneval.load("test")
