"""data/humaneval.py: HumanEval (openai/human-eval, MIT licence), 164 Python functions to complete, graded by
running each problem's own tests on the completion in sandbox.py.

A row: {"id": "HumanEval/0", "prompt": signature + docstring, "entry_point": the function's name,
        "answer": the test code (it defines check(candidate)), "target": prompt + canonical solution in a
        ```python block}
There is only a test split. The prompt asks for the completed function in a ```python block; the instruction
follows the idea of the official MemGen code-task prompt (KANABOON1/MemGen data/kodcode/builder.py: write a
correct and efficient Python function), in our own words.

Grading (grade / grade_many): take the first ```python block that defines the entry point (else the first
python block, else the raw completion), put the problem's prompt in front of it (the prompt holds imports and
helper functions that solutions and tests use; a completion that defines the function itself replaces the
prompt's docstring-only stub, one that does not continues its body), then the tests, `check(entry_point)`,
and a print of a random marker. Right means: exit code 0, no timeout, and the marker as the last line of stdout,
so a program that exits early with status 0 (sys.exit(0) before the tests) is wrong.
"""

import os
import re
import secrets
from pathlib import Path

import sandbox
from data.download import DownloadError, cache_dir, download
from data.gsm8k import TASK_SPLITS, DataError, _read_jsonl

# -----------------------------------------------------------------------------
NAME = "humaneval"
URL = "https://github.com/openai/human-eval/raw/master/data/HumanEval.jsonl.gz"
FILE = "HumanEval.jsonl.gz"
SHA256 = "b796127e635a67f93fb35c04f4cb03cf06f38c8072ee7cee8833d7bee06979ef"
N_PROBLEMS = 164
FIELDS = ("task_id", "prompt", "entry_point", "canonical_solution", "test")
PROMPT = ("Complete the Python function below so that it is correct and efficient. Reply with the whole "
          "function, signature included, inside a ```python code block.\n\n```python\n{prompt}\n```\n")
PYTHON_FENCES = ("python", "python3", "py", "")  # ``` with no language counts as python too


# -----------------------------------------------------------------------------
# data

def fetch(source=None, sha256=SHA256):
    """Local path of HumanEval.jsonl.gz, downloaded once into cache_dir()/humaneval and sha256-checked.

    source (or env MEMGEN_HUMANEVAL_URL) replaces the GitHub location: a URL of the .gz file, a URL prefix
    (folder) holding it, a local file, or a local folder holding HumanEval.jsonl.gz.
    """
    src = str(source or os.environ.get("MEMGEN_HUMANEVAL_URL") or URL)
    if os.path.isdir(src):
        src = os.path.join(src, FILE)
    if os.path.isfile(src):
        src = Path(src).resolve().as_uri()
    elif "://" not in src:
        raise DataError(f"HumanEval source {src!r} is neither a URL nor an existing file or folder; "
                        f"set MEMGEN_HUMANEVAL_URL to a folder or URL holding {FILE}")
    elif not src.endswith(".gz"):
        src = src.rstrip("/") + "/" + FILE  # a folder URL, like MEMGEN_GSM8K_URL
    try:
        return download(src, cache_dir() / "humaneval" / FILE, sha256=sha256, desc=f"humaneval {FILE}")
    except DownloadError as e:
        raise DownloadError(f"{e}; set MEMGEN_HUMANEVAL_URL to a folder or URL holding the official {FILE}") from None


def read_problems(path):
    """The problems of a HumanEval-format .jsonl or .jsonl.gz file, each checked for the fields we use."""
    path = str(path)
    if not os.path.isfile(path):
        raise DataError(f"HumanEval file {path} does not exist")
    problems = []
    for lineno, obj in _read_jsonl(path, "HumanEval file"):
        bad = [k for k in FIELDS if not isinstance(obj.get(k), str)]
        if bad:
            raise DataError(f"{path}, line {lineno}: missing or non-string field(s) {bad}; each problem needs {list(FIELDS)}")
        if not obj["entry_point"].isidentifier():
            raise DataError(f"{path}, line {lineno}: entry_point {obj['entry_point']!r} is not a Python name")
        problems.append(obj)
    if not problems:
        raise DataError(f"HumanEval file {path} has no problems")
    return problems


def load(split, path=None):
    """The test split: the 164 official problems, or with `path` a local HumanEval-format .jsonl(.gz) file
    (read as it is, no sha256 check: e.g. tests/fixtures/humaneval5.jsonl)."""
    if split not in TASK_SPLITS:
        raise DataError(f"unknown split {split!r}; use one of {list(TASK_SPLITS)}")
    if split != "test":
        raise DataError(f"HumanEval has only a 'test' split ({N_PROBLEMS} problems), no {split!r} split; "
                        "train on another task and evaluate on humaneval")
    problems = read_problems(path if path is not None else fetch())
    return [{"id": p["task_id"], "prompt": p["prompt"], "entry_point": p["entry_point"], "answer": p["test"],
             "target": "```python\n" + (p["prompt"] + p["canonical_solution"]).rstrip() + "\n```"}
            for p in problems]


def messages(row):
    return [{"role": "user", "content": PROMPT.format(prompt=row["prompt"].rstrip("\n"))}]


# -----------------------------------------------------------------------------
# grading

def code_blocks(text):
    """(language, code) of each ``` fenced block in order; an unclosed last block runs to the end."""
    blocks, lang, lines = [], None, None
    for line in text.splitlines():
        fence = line.strip().startswith("```")
        if lines is None and fence:
            lang, lines = line.strip()[3:].strip().lower(), []
        elif fence:
            blocks.append((lang, "\n".join(lines)))
            lines = None
        elif lines is not None:
            lines.append(line)
    if lines is not None:
        blocks.append((lang, "\n".join(lines)))
    return blocks


def extract_code(completion, entry_point):
    """The code to test: the first python block defining `entry_point`, else the first python block, else
    the whole completion (a bare continuation of the function body, as in the original HumanEval setup)."""
    blocks = [code for lang, code in code_blocks(completion) if lang in PYTHON_FENCES]
    defines = re.compile(rf"^\s*(?:async\s+)?def\s+{re.escape(entry_point)}\s*\(", re.MULTILINE)
    return next((code for code in blocks if defines.search(code)), blocks[0] if blocks else completion)


def program(row, completion, marker):
    """The whole test program for one completion (see the top of this file)."""
    code = extract_code(completion if isinstance(completion, str) else "", row["entry_point"])
    # '\n' first: the marker is a line of its own even after the program's own print(..., end="")
    return (f"{row['prompt']}\n{code}\n\n{row['answer']}\n\ncheck({row['entry_point']})\n"
            f"print('\\n' + {marker!r})\n")


def grade_many(rows, completions, workers=2, timeout=sandbox.TIMEOUT_S):
    """grade() for each (row, completion), `workers` sandboxed programs at a time."""
    if len(rows) != len(completions):
        raise DataError(f"grade_many got {len(rows)} rows but {len(completions)} completions")
    # a fresh random marker per program: the completion cannot know it, so cannot fake a pass by printing it
    markers = [f"memgen-humaneval-passed-{secrets.token_hex(8)}" for _ in rows]
    results = sandbox.run_many([program(r, c, m) for r, c, m in zip(rows, completions, markers)],
                               workers=workers, timeout=timeout)
    # the last line must be the marker: echoing the program's own source (which holds it) does not pass
    return [res["ok"] and res["stdout"].rstrip("\n").rsplit("\n", 1)[-1] == m for res, m in zip(results, markers)]


def grade(row, completion):
    """True when the completion passes the problem's tests in the sandbox. Never raises on a bad completion."""
    return grade_many([row], [completion], workers=1)[0]
