r"""data/choice.py: multiple-choice questions (GPQA / ARC style) from a local jsonl ("choice:file.jsonl").

Each line: {"question": str, "choices": [str, ...], "answer": "B" or 1 (a 0-based index),
            "id"?: ..., "explanation"?: str}
A row:     {"id", "question", "choices", "answer": "B", "target": explanation + "\n\n\boxed{B}"}

The prompt lists the options as "A. ...", "B. ..." and asks for the letter inside \boxed{}, like the official
MemGen GPQA builder (KANABOON1/MemGen data/gpqa/builder.py, which also puts the explanation before the boxed
letter in its SFT target); the wording here is our own. The grade is the first \boxed{} of the completion,
read as one letter: "B", "b", "(B)", "B.", "B)", "\text{B}" and "B. <option text>" all mean B.
"""

import re
from pathlib import Path

from data.gsm8k import DataError, extract_boxed, read_jsonl, split_rows

# -----------------------------------------------------------------------------
NAME = "choice"
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
PROMPT = ("Answer the following multiple-choice question. Reason step by step, then write the letter of the "
          "correct option inside \\boxed{{}}.\n\nQuestion: {question}\n\nOptions:\n{options}")
TEXT_WRAPPER = re.compile(r"\\(?:text|textbf|textrm|mathrm|mathbf|mbox)\s*\{([^{}]*)\}")
BARE_LETTER = re.compile(r"\(?\s*([A-Za-z])\s*\)?\s*[.:]?")       # B  (B)  B.  B:  ( b )
LETTER_AND_TEXT = re.compile(r"\(?([A-Za-z])(?:\)|[.:])\s")       # "B. Paris", "(B) Paris", "B) Paris"


def _gold_letter(answer, n_choices, where):
    last = LETTERS[n_choices - 1]
    if isinstance(answer, int) and not isinstance(answer, bool) and 0 <= answer < n_choices:
        return LETTERS[answer]
    letter = answer.strip().upper() if isinstance(answer, str) else None
    if letter and len(letter) == 1 and letter in LETTERS[:n_choices]:
        return letter
    raise DataError(f"{where}: answer {answer!r} is not a letter A-{last} nor a 0-based index below {n_choices}")


def _row(obj, where, row_id):
    question, choices = obj.get("question"), obj.get("choices")
    if not isinstance(question, str) or not question.strip():
        raise DataError(f"{where}: field 'question' is missing or not a non-empty string")
    if (not isinstance(choices, list) or not 2 <= len(choices) <= len(LETTERS)
            or not all(isinstance(c, str) and c.strip() for c in choices)):
        raise DataError(f"{where}: field 'choices' must be a list of 2 to {len(LETTERS)} non-empty strings")
    explanation = obj.get("explanation")
    if explanation is not None and not isinstance(explanation, str):
        raise DataError(f"{where}: field 'explanation' must be a string when given")
    gold = _gold_letter(obj.get("answer"), len(choices), where)
    box = "\\boxed{" + gold + "}"
    target = f"{explanation.strip()}\n\n{box}" if explanation and explanation.strip() else box
    return {"id": row_id, "question": question.strip(), "choices": [c.strip() for c in choices],
            "answer": gold, "target": target}


def load(split, path=None):
    """Rows of `split` of a local multiple-choice jsonl: "test" is the whole file, train/val a fixed split."""
    if path is None:
        raise DataError("the choice format reads a local file: name the task choice:path/to/file.jsonl")
    stem = Path(path).stem
    rows = []
    for lineno, obj in read_jsonl(path):
        row_id = str(obj["id"]) if obj.get("id") is not None else f"{stem}-{len(rows)}"
        rows.append(_row(obj, f"{path}, line {lineno}", row_id))
    return split_rows(rows, split)


def messages(row):
    options = "".join(f"{LETTERS[i]}. {choice}\n" for i, choice in enumerate(row["choices"]))
    return [{"role": "user", "content": PROMPT.format(question=row["question"], options=options)}]


def extract_letter(completion):
    """The option letter (upper case) in the first \\boxed{} of `completion`, else None."""
    box = extract_boxed(completion)
    if box is None:
        return None
    s = box
    while (unwrapped := TEXT_WRAPPER.sub(r"\1", s)) != s:  # \text{\textbf{B}} -> B
        s = unwrapped
    s = s.strip().strip("$").strip()
    m = BARE_LETTER.fullmatch(s) or LETTER_AND_TEXT.match(s)
    return m.group(1).upper() if m else None


def grade(row, completion):
    """True when the first \\boxed{} of the completion names the gold letter. Never raises."""
    try:
        return extract_letter(completion) == row["answer"]
    except Exception:  # a grader must never crash an eval run; unparsable means wrong
        return False
