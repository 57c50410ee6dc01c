r"""data/fever.py: claim verification (FEVER style) from a local jsonl ("fever:file.jsonl").

Each line: {"claim": str, "label": "SUPPORTS" | "REFUTES" | "NOT ENOUGH INFO", "evidence"?: str or [str, ...],
            "id"?: ...}
A row:     {"id", "claim", "evidence": str or None, "answer": the label, "target": "\boxed{LABEL}"}

The prompt shows the claim (and the evidence when the row has some) and asks for one of the three labels
inside \boxed{}. Labels are compared after normalising case, underscores, hyphens and spaces, so
"NOT_ENOUGH_INFO", "not enough info" and "\text{Not Enough Info}" all mean NOT ENOUGH INFO.
"""

import re
from pathlib import Path

from data.gsm8k import DataError, extract_boxed, read_jsonl, split_rows

# -----------------------------------------------------------------------------
NAME = "fever"
LABELS = ("SUPPORTS", "REFUTES", "NOT ENOUGH INFO")
PROMPT = ("Decide whether the claim below is supported or refuted{by_evidence}, or whether there is not enough "
          "information to tell. Reason briefly, then write exactly one of SUPPORTS, REFUTES or NOT ENOUGH INFO "
          "inside \\boxed{{}}.\n\nClaim: {claim}\n")
TEXT_WRAPPER = re.compile(r"\\(?:text|textbf|textrm|mathrm|mathbf|mbox)\s*\{([^{}]*)\}")


def normalize_label(s):
    """'not_enough-info' -> 'NOT ENOUGH INFO': upper case, runs of spaces/underscores/hyphens -> one space."""
    while (unwrapped := TEXT_WRAPPER.sub(r"\1", s)) != s:
        s = unwrapped
    return re.sub(r"[\s_\-]+", " ", s).strip(" .$\"'*").upper()


def _evidence(value, where):
    """The evidence as one string (a list's items one per line), or None."""
    if value is None:
        return None
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        value = "\n".join(v.strip() for v in value if v.strip())
    if not isinstance(value, str):
        raise DataError(f"{where}: field 'evidence' must be a string or a list of strings when given")
    return value.strip() or None


def load(split, path=None):
    """Rows of `split` of a local FEVER-style jsonl: "test" is the whole file, train/val a fixed split."""
    if path is None:
        raise DataError("the fever format reads a local file: name the task fever:path/to/file.jsonl")
    stem = Path(path).stem
    rows = []
    for lineno, obj in read_jsonl(path):
        where = f"{path}, line {lineno}"
        claim, label = obj.get("claim"), obj.get("label")
        if not isinstance(claim, str) or not claim.strip():
            raise DataError(f"{where}: field 'claim' is missing or not a non-empty string")
        gold = normalize_label(label) if isinstance(label, str) else None
        if gold not in LABELS:
            raise DataError(f"{where}: label {label!r} is not one of {', '.join(LABELS)}")
        row_id = str(obj["id"]) if obj.get("id") is not None else f"{stem}-{len(rows)}"
        rows.append({"id": row_id, "claim": claim.strip(), "evidence": _evidence(obj.get("evidence"), where),
                     "answer": gold, "target": "\\boxed{" + gold + "}"})
    return split_rows(rows, split)


def messages(row):
    evidence = row.get("evidence")
    content = PROMPT.format(by_evidence=" by the evidence" if evidence else "", claim=row["claim"])
    if evidence:
        content += f"\nEvidence:\n{evidence}\n"
    return [{"role": "user", "content": content}]


def grade(row, completion):
    """True when the first \\boxed{} of the completion holds the gold label (normalised). Never raises."""
    try:
        box = extract_boxed(completion)
        return box is not None and normalize_label(box) == row["answer"]
    except Exception:  # a grader must never crash an eval run; unparsable means wrong
        return False
