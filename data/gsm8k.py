r"""data/gsm8k.py: GSM8K (and generic question/answer jsonl) tasks, prompts and the \boxed{} grader.

A row is a dict {"id", "question", "answer", "target"}:
    answer  the gold final answer used for grading (GSM8K: text after '####', commas removed)
    target  the SFT completion: the rationale followed by \boxed{final answer}

Prompt and target follow the official MemGen code, KANABOON1/MemGen
data/gsm8k/builder.py, GSM8KBuilder._preprocess (read at commit a1b7397):

    user   = "Solve the math problem with proper reasoning, and make sure to put the FINAL "
             "ANSWER inside \boxed{}." + "Question: " + question.strip() + "\n"
    parts  = answer.strip().split("\n####")
    target = (parts[0] + "\boxed{" + parts[-1].strip() + "}").strip()

So the rationale is glued to \boxed{...} with NO space or newline ("...in April and
May.\boxed{72}"), the boxed final answer keeps GSM8K's own spelling (e.g. "1,080"),
and the calculator annotations <<48/2=24>> stay in the rationale (the official code
never removes them). The grader mirrors the official data/utils/math_utils.py
compute_score (first \boxed{} of the completion, Hendrycks-MATH normalisation) but is
a bit more lenient: thousands commas, units in \text{}, and numerically equal forms
(0.5 = 1/2 = \frac{1}{2}) all count.
"""

import gzip
import json
import os
import random
import re
import unicodedata
from fractions import Fraction
from pathlib import Path

from data.download import DownloadError, cache_dir, download

# -----------------------------------------------------------------------------
GSM8K_URL = "https://raw.githubusercontent.com/openai/grade-school-math/master/grade_school_math/data/"
# split -> (file name, pinned sha256, number of rows)
GSM8K_FILES = {
    "train": ("train.jsonl", "17f347dc51477c50d4efb83959dbb7c56297aba886e5544ee2aaed3024813465", 7473),
    "test": ("test.jsonl", "3730d312f6e3440559ace48831e51066acaca737f6eabec99bccb9e4b3c39d14", 1319),
}
# the official template, doubled braces because it goes through str.format
PROMPT = ("Solve the math problem with proper reasoning, and make sure to put the FINAL ANSWER "
          "inside \\boxed{{}}.Question: {question}\n")
ANSWER_SEP = "\n####"
VAL_FRAC = 0.1
SPLIT_SEED = 1234
TASK_SPLITS = ("train", "val", "test")
BOX_COMMANDS = ("\\boxed", "\\fbox")
TEXT_COMMANDS = re.compile(r"\\(?:text|textbf|textrm|textnormal|mbox|mathrm)\s*(?=\{)")
NUMBER = r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)"
MAX_NUMBER_CHARS = 64  # longer "numbers" are compared as strings (keeps Fraction cheap)
# unicode look-alikes that NFKC leaves alone
UNICODE_FIXES = str.maketrans({"\u2212": "-", "\u2013": "-", "\u2044": "/", "\u00b0": "", "\u00a0": " "})


class DataError(ValueError):
    """Bad task data or arguments; the message names the file/line or the bad value."""


# -----------------------------------------------------------------------------
# prompts and targets

def messages(question):
    """The chat for one question (a string, or a row dict holding it): a single user turn (ChatML, no system
    message). Taking a row too makes this module's messages() the task interface's (see data/__init__.py)."""
    if isinstance(question, dict):
        question = question.get("question")
    if not isinstance(question, str):
        raise DataError(f"messages() needs a question string or a row with a 'question' string, "
                        f"got {type(question).__name__}")
    return [{"role": "user", "content": PROMPT.format(question=question.strip())}]


def _split_gsm8k_answer(answer):
    """GSM8K answer text -> (target, gold), exactly like the official builder (see top)."""
    answer = answer.strip()
    sep = ANSWER_SEP if ANSWER_SEP in answer else "####"  # lenient for hand-made jsonl
    parts = answer.split(sep)
    rationale, final = parts[0], parts[-1].strip()
    target = (rationale + "\\boxed{" + final + "}").strip()
    return target, final.replace(",", "")


def _read_jsonl(path, what="task file"):
    """Yield (line number, dict) for each non-blank line of a .jsonl (or .jsonl.gz) file; bad JSON -> DataError
    naming the line, an unreadable file -> DataError naming it (`what` says what it should have been)."""
    try:
        f = gzip.open(path, "rt", encoding="utf-8") if str(path).endswith(".gz") else open(path, encoding="utf-8")
    except OSError as e:
        raise DataError(f"cannot read {what} {path}: {e.strerror or e}") from None
    with f:
        try:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}, line {lineno}: not valid JSON ({e.msg})") from None
                if not isinstance(obj, dict):
                    raise DataError(f"{path}, line {lineno}: expected a JSON object, got {type(obj).__name__}")
                yield lineno, obj
        except UnicodeDecodeError:
            raise DataError(f"{path}: not UTF-8 text (is it really a .jsonl file?)") from None
        except (OSError, EOFError) as e:  # a damaged .gz (gzip.BadGzipFile is an OSError)
            raise DataError(f"cannot read {what} {path} ({e}); expected a jsonl or jsonl.gz file") from None


def _field(obj, key, path, lineno):
    value = obj.get(key)
    if not isinstance(value, str) or not value.strip():
        what = "missing" if value is None else "not a non-empty string"
        raise DataError(f"{path}, line {lineno}: field {key!r} is {what}; each row needs "
                        "'question' and 'answer' strings")
    return value


def _gsm8k_rows(path, prefix):
    rows = []
    for lineno, obj in _read_jsonl(path):
        question, answer = _field(obj, "question", path, lineno), _field(obj, "answer", path, lineno)
        if "####" not in answer:
            raise DataError(f"{path}, line {lineno}: answer has no '#### <final answer>' line")
        target, gold = _split_gsm8k_answer(answer)
        if not gold:
            raise DataError(f"{path}, line {lineno}: empty final answer after '####'")
        rows.append({"id": f"{prefix}-{len(rows)}", "question": question.strip(), "answer": gold, "target": target})
    return rows


# -----------------------------------------------------------------------------
# loading

def load_split(split, base_url=None):
    """GSM8K "train" or "test" as rows, downloading (and sha256-checking) the file once.

    base_url (or env MEMGEN_GSM8K_URL) replaces the GitHub location: any URL prefix
    ending in the folder that holds train.jsonl/test.jsonl, or a local folder path.
    """
    if split not in GSM8K_FILES:
        raise DataError(f"unknown GSM8K split {split!r}; use one of {sorted(GSM8K_FILES)}")
    fname, sha, _ = GSM8K_FILES[split]
    base = base_url or os.environ.get("MEMGEN_GSM8K_URL") or GSM8K_URL
    if os.path.isdir(base):
        base = Path(base).resolve().as_uri()
    url = base.rstrip("/") + "/" + fname
    try:
        path = download(url, cache_dir() / "gsm8k" / fname, sha256=sha, desc=f"gsm8k {fname}")
    except DownloadError as e:
        raise DownloadError(f"{e}; set MEMGEN_GSM8K_URL to a folder or URL holding the official "
                            "train.jsonl/test.jsonl") from None
    return _gsm8k_rows(path, f"gsm8k-{split}")


def train_val_split(rows, val_frac=VAL_FRAC, seed=SPLIT_SEED):
    """Fixed-seed shuffle, then the first int(len * val_frac) rows are validation."""
    if not 0.0 <= val_frac < 1.0:
        raise DataError(f"val_frac must be in [0, 1), got {val_frac}")
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n_val = int(len(rows) * val_frac)  # same rounding as the official builder
    val = [rows[i] for i in order[:n_val]]
    train = [rows[i] for i in order[n_val:]]
    return train, val


def load_jsonl_task(path):
    """Rows from any jsonl with "question" and "answer" fields (an optional "id" is kept).

    An answer containing '####' is read GSM8K-style (rationale + final answer);
    otherwise the whole answer is the gold string and the target is \\boxed{answer}.
    """
    path = str(path)
    if not os.path.isfile(path):
        raise DataError(f"task file {path} does not exist")
    stem = Path(path).stem
    rows = []
    for lineno, obj in _read_jsonl(path):
        question, answer = _field(obj, "question", path, lineno), _field(obj, "answer", path, lineno)
        if "####" in answer:
            target, gold = _split_gsm8k_answer(answer)
            if not gold:
                raise DataError(f"{path}, line {lineno}: empty final answer after '####'")
        else:
            gold = answer.strip()
            target = "\\boxed{" + gold + "}"
        row_id = str(obj["id"]) if obj.get("id") is not None else f"{stem}-{len(rows)}"
        rows.append({"id": row_id, "question": question.strip(), "answer": gold, "target": target})
    if not rows:
        raise DataError(f"task file {path} has no rows")
    return rows


def load_task(data, split, val_frac=VAL_FRAC, seed=SPLIT_SEED):
    """Rows of `split` ("train", "val" or "test") of a task.

    data="gsm8k": train/val are the fixed-seed split of GSM8K's train file (as the
    official builder carves its validation set), test is GSM8K's test file.
    data=path/to/file.jsonl: test is the whole file, train/val a fixed-seed split of it.
    """
    if split not in TASK_SPLITS:
        raise DataError(f"unknown split {split!r}; use one of {list(TASK_SPLITS)}")
    data = str(data)
    if data == "gsm8k":
        if split == "test":
            return load_split("test")
        rows = load_split("train")
    elif data.endswith(".jsonl"):
        rows = load_jsonl_task(data)
        if split == "test":
            return rows
    else:
        raise DataError(f"unknown data {data!r}; use 'gsm8k' or a path to a .jsonl file "
                        "with 'question' and 'answer' fields")
    train, val = train_val_split(rows, val_frac, seed)
    return train if split == "train" else val


# -----------------------------------------------------------------------------
# grading

def _braced(text, start):
    """Content of the {...} group opening at text[start], or None if never closed."""
    depth = 0
    i = start
    while i < len(text):
        ch = text[i]
        if ch == "\\":  # \{ and \} are literal braces, not grouping
            i += 2
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return text[start + 1:i]
        i += 1
    return None


def extract_boxed(text):
    """Content of the first \\boxed{...} / \\fbox{...} / "\\boxed 5" in text, else None.

    Braces nest (\\boxed{\\frac{1}{2}} -> \\frac{1}{2}); an unclosed first box gives None.
    """
    if not isinstance(text, str):
        return None
    pos = 0
    while True:
        hits = [(i, cmd) for cmd in BOX_COMMANDS if (i := text.find(cmd, pos)) >= 0]
        if not hits:
            return None
        i, cmd = min(hits)
        j = k = i + len(cmd)
        while k < len(text) and text[k] in " \t":
            k += 1
        if k < len(text) and text[k] == "{":
            return _braced(text, k)
        # TeX also boxes a single token: "\boxed 5" or "\boxed5"; take the run up to space or $
        if k < len(text) and (k > j or text[k].isdigit() or text[k] == "-"):
            token = re.match(r"[^\s$]*", text[k:]).group(0).rstrip(".,;:!?")
            if token:
                return token
        pos = j  # "\boxedfoo" or a lone "\boxed": some other text, keep looking


def _drop_text_groups(s):
    """\\text{...}/\\mbox{...}: drop them when something else is left (units), else unwrap."""
    outside, inside, pos = [], [], 0
    for m in TEXT_COMMANDS.finditer(s):
        if m.start() < pos:
            continue  # nested inside a group we already consumed
        content = _braced(s, m.end())
        if content is None:
            return s
        outside.append(s[pos:m.start()])
        inside.append(content)
        pos = m.end() + len(content) + 2
    if not inside:
        return s
    outside.append(s[pos:])
    rest = "".join(outside)
    return rest if rest.strip() else "".join(inside)


def normalize(s):
    """Canonical string form of an answer (Hendrycks-MATH strip_string plus a few extras)."""
    s = unicodedata.normalize("NFKC", str(s)).translate(UNICODE_FIXES)
    s = s.replace("\n", " ").strip()
    for junk in ("\\!", "\\,", "\\;", "\\:", "\\displaystyle"):
        s = s.replace(junk, "")
    s = s.replace("\\ ", " ").replace("~", " ")
    s = s.replace("\\\\", "\\")
    s = re.sub(r"\\[dt]frac", r"\\frac", s)
    s = re.sub(r"\\(?:left|right)(?![A-Za-z])", "", s)
    s = re.sub(r"\^\s*\{\s*\\circ\s*\}|\^\s*\\circ", "", s)  # degrees
    s = s.replace("\\$", "").replace("$", "")
    s = _drop_text_groups(s)
    s = s.replace("\\%", "").replace("%", "")
    s = s.replace("{,}", "")  # LaTeX thousands separator 1{,}000
    s = re.sub(r"(?<=\d),(?=\d{3}(?!\d))", "", s)  # 1,000,000 -> 1000000
    s = s.strip()
    # "x = 5" / "k=5": a short left-hand side is just a name
    if s.count("=") == 1 and len(s.split("=")[0].strip()) <= 2:
        s = s.split("=")[1].strip()
    s = re.sub(r"\s+", "", s)
    s = re.sub(r"\\sqrt(?![{A-Za-z])(.)", r"\\sqrt{\1}", s)  # \sqrt3 -> \sqrt{3}
    s = re.sub(r"\\frac(?![{A-Za-z])(\w)", r"\\frac{\1}", s)  # \frac12 -> \frac{1}2
    s = re.sub(r"\\frac(\{[^{}]*\})(?!\{)(\w)", r"\\frac\1{\2}", s)  # \frac{1}2 -> \frac{1}{2}
    s = s.rstrip(".")  # sentence full stop: "5." -> "5"
    if s.startswith("+"):
        s = s[1:]
    # .5 -> 0.5, -.5 -> -0.5, 18.00 -> 18, 2.50 -> 2.5
    m = re.fullmatch(r"(-?)(\d*)\.(\d*?)0*", s)
    if m and (m.group(2) or m.group(3)):
        s = m.group(1) + (m.group(2) or "0") + ("." + m.group(3) if m.group(3) else "")
        if s == "-0":
            s = "0"
    m = re.fullmatch(r"(-?\d+)/(\d+)", s)  # 3/4 -> \frac{3}{4}, as the official grader
    if m:
        s = "\\frac{" + m.group(1) + "}{" + m.group(2) + "}"
    return s


def _to_number(s):
    """A normalised answer as an exact Fraction (decimals, a/b, \\frac{a}{b}), else None."""
    if len(s) > MAX_NUMBER_CHARS:
        return None
    if re.fullmatch(NUMBER, s):
        return Fraction(s)
    m = re.fullmatch(rf"(-?)\\frac\{{({NUMBER})\}}\{{({NUMBER})\}}", s) or re.fullmatch(rf"()({NUMBER})/({NUMBER})", s)
    if m:
        num, den = Fraction(m.group(2)), Fraction(m.group(3))
        if den == 0:
            return None
        return -num / den if m.group(1) else num / den
    return None


def is_correct(completion, gold):
    """True when the first \\boxed{} answer of `completion` matches `gold`. Never raises.

    `gold` is a plain answer ("72"); if it contains a \\boxed{} (e.g. a target string)
    the box content is used. Numbers compare exactly by value, everything else as
    normalised strings.
    """
    try:
        pred = extract_boxed(completion)
        if pred is None:
            return False
        gold = str(gold)
        if any(cmd in gold for cmd in BOX_COMMANDS):
            gold = extract_boxed(gold) or gold
        a, b = normalize(pred), normalize(gold)
        if not a or not b:
            return False
        x, y = _to_number(a), _to_number(b)
        if x is not None and y is not None:
            return x == y
        return a == b
    except Exception:  # a grader must never crash an eval run; unparsable means wrong
        return False


# -----------------------------------------------------------------------------
# the task interface (data/__init__.py): NAME, load, messages (above), grade; plus what the other
# local-jsonl formats (data/qa.py, data/choice.py, data/fever.py) share

NAME = "gsm8k"


def load(split, path=None):
    """Rows of `split`: GSM8K itself, or with `path` a local jsonl in the question/answer format."""
    if path is None:
        return load_task("gsm8k", split)
    return split_rows(load_jsonl_task(path), split)


def grade(row, completion):
    """True when the completion's first \\boxed{} answer matches row["answer"]; never raises (see is_correct)."""
    return is_correct(completion, row["answer"])


def split_rows(rows, split):
    """A local file's split: "test" is the whole file, "train"/"val" the fixed-seed split of train_val_split."""
    if split not in TASK_SPLITS:
        raise DataError(f"unknown split {split!r}; use one of {list(TASK_SPLITS)}")
    if split == "test":
        return rows
    train, val = train_val_split(rows)
    return train if split == "train" else val


def read_jsonl(path):
    """[(line number, dict)] of a local jsonl task file; a missing, unreadable or empty file -> DataError."""
    path = str(path)
    if not os.path.isfile(path):
        raise DataError(f"task file {path} does not exist")
    lines = list(_read_jsonl(path))
    if not lines:
        raise DataError(f"task file {path} has no rows")
    return lines
