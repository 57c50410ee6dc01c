"""data/qa.py: the generic question/answer format, a local jsonl ("qa:file.jsonl", or just "file.jsonl").

Each line is {"question": str, "answer": str, "id"?: ...}; an answer with "#### final" is read GSM8K-style.
Prompt, target and grader are GSM8K's (data/gsm8k.py); "test" is the whole file, train/val a fixed-seed split.
"""

from data import gsm8k
from data.gsm8k import DataError, grade, messages  # noqa: F401  (the task interface, re-exported)

NAME = "qa"


def load(split, path=None):
    if path is None:
        raise DataError("the qa format reads a local file: name the task qa:path/to/file.jsonl "
                        "(one {\"question\": ..., \"answer\": ...} object per line)")
    return gsm8k.load(split, path)
