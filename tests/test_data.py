"""GSM8K rows, prompt/target golden strings, the \\boxed{} grader, and pass@k."""

import itertools
import json
import random

import pytest

from data import gsm8k
from data.gsm8k import DataError, extract_boxed, is_correct, normalize
from evaluation import pass_at_k

from conftest import SHARED_GSM8K


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MEMGEN_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def gsm(gsm8k_fixture):
    """Load a split of the 20-row fixture copy (conftest.gsm8k_fixture: a file:// download with its own pins)."""
    return gsm8k.load_split


@pytest.fixture
def full_gsm(cache):
    """Load a split of the full files in ../shared (tests marked shared)."""
    return lambda split: gsm8k.load_split(split, base_url=str(SHARED_GSM8K))


# -----------------------------------------------------------------------------
# grader

GRADER_CASES = [
    # (completion, gold, expected)
    (r"\boxed{72}", "72", True),
    (r"So she sold 72 clips.\boxed{72}", "72", True),
    (r"The answer is \boxed{73}.", "72", False),
    ("The answer is 72", "72", False),                      # no box
    (r"\boxed{72", "72", False),                            # unbalanced
    (r"\boxed{\frac{1}{2}", "0.5", False),                  # unbalanced, nested
    ("", "72", False),
    (None, "72", False),
    (r"\boxed{\frac{1}{2}}", "0.5", True),                  # nested braces
    (r"\boxed{\frac{1}{2}}", r"\frac{1}{2}", True),
    (r"\boxed{1/2}", "0.5", True),
    (r"\boxed{0.5}", "1/2", True),
    (r"\boxed{.5}", "0.5", True),
    (r"\boxed{\dfrac{3}{4}}", "0.75", True),
    (r"\boxed{\tfrac34}", "0.75", True),
    (r"\boxed{3/4}", r"\frac{3}{4}", True),
    (r"\boxed{\frac{-1}{2}}", "-0.5", True),
    (r"\boxed{-\frac{1}{2}}", "-1/2", True),
    (r"\boxed{\frac{1}{3}}", "0.33", False),
    (r"\boxed{1/0}", "1", False),                           # no ZeroDivisionError
    (r"\boxed{5} and later \boxed{7}", "5", True),          # first box counts
    (r"\boxed{5} and later \boxed{7}", "7", False),
    (r"\boxed{10\text{ dollars}} then \boxed{11}", "10", True),
    (r"\boxed{10 \text{ dollars}}", "10", True),            # units
    (r"\boxed{12 \mbox{ apples}}", "12", True),
    (r"\boxed{5 \text{ apples}}", "6", False),
    (r"\boxed{\text{12}}", "12", True),
    (r"\boxed{\$1,000}", "1000", True),
    (r"\boxed{\$18.00}", "18", True),
    (r"$\boxed{\$5}$", "5", True),
    (r"\boxed{1,000}", "1000", True),                       # thousands commas
    (r"\boxed{1000}", "1,000", True),
    (r"\boxed{1,000,000}", "1000000", True),
    (r"\boxed{12345}", "12,345", True),
    (r"\boxed{1{,}080}", "1080", True),
    (r"\boxed{1,23}", "123", False),                        # not a thousands comma
    (r"\boxed{-5}", "-5", True),                            # negatives
    (r"\boxed{-5}", "5", False),
    ("\\boxed{\u22125}", "-5", True),                       # unicode minus sign
    (r"\boxed{+7}", "7", True),
    (r"\boxed{18.00}", "18", True),                         # trailing zeros
    (r"\boxed{18.5}", "18.50", True),
    (r"\boxed{18.05}", "18.5", False),
    (r"\boxed{24}", "24.0", True),
    (r"\boxed{7.}", "7", True),
    (r"\fbox{42}", "42", True),                             # \fbox
    (r"\boxed 5", "5", True),                               # space form
    (r"$\boxed 5$.", "5", True),
    (r"\boxed {12}", "12", True),
    (r"\boxed{}", "0", False),                              # empty box
    (r"\boxed{ }", "5", False),
    (r"\boxed{50\%}", "50", True),                          # percent
    (r"\boxed{50%}", "50", True),
    (r"\boxed{90^\circ}", "90", True),                      # degrees
    ("\\boxed{90\u00b0}", "90", True),
    (r"\boxed{x = 12}", "12", True),
    (r"\boxed{\left( 1, 2 \right)}", "(1,2)", True),
    (r"\boxed{\{1,2\}}", r"\{1,2\}", True),                 # escaped braces are not grouping
    (r"\boxed{\sqrt{2}}", r"\sqrt2", True),
    (r"\boxed{\,24\,}", "24", True),
    ("\\boxed{\uff12\uff14}", "24", True),                  # full-width digits
    ("Réponse : \\boxed{72} \u2705", "72", True),           # unicode around the box
    (r"\boxed{Paris}", "Paris", True),
    (r"\boxed{\text{Paris}}", "Paris", True),
    (r"\boxed{5}", r"\boxed{5}", True),                     # gold given as a target string
    (r"a.\boxed{1,080}", "1080", True),
    (r"\boxedfoo \boxed{9}", "9", True),                    # other macros starting with \boxed
]


@pytest.mark.parametrize("completion,gold,expected", GRADER_CASES)
def test_grader_agrees_with_the_table_of_tricky_answers(completion, gold, expected):
    assert is_correct(completion, gold) is expected


def test_grader_table_keeps_at_least_45_cases():
    assert len(GRADER_CASES) >= 45


@pytest.mark.parametrize("text,box", [
    (r"\boxed{\frac{1}{2}}", r"\frac{1}{2}"),
    (r"x \boxed{1} \boxed{2}", "1"),
    (r"\fbox{a{b}c} \boxed{d}", "a{b}c"),
    (r"\boxed{a} \fbox{b}", "a"),
    (r"\boxed 5 apples", "5"),
    (r"\boxed{}", ""),
    (r"\boxed{", None),
    (r"\boxed{{}", None),
    (r"no box", None),
    (r"\boxed", None),
    (42, None),
])
def test_extract_boxed_takes_the_first_balanced_box(text, box):
    assert extract_boxed(text) == box


@pytest.mark.parametrize("raw,norm", [
    (r"\left(3\right)", "(3)"),
    (r"10\text{ dollars}", "10"),
    (r"\$1,000.50", "1000.5"),
    ("18.00", "18"),
    (".5", "0.5"),
    ("-.50", "-0.5"),
    (r"\dfrac12", r"\frac{1}{2}"),
    ("3/4", r"\frac{3}{4}"),
    (r"k = 5", "5"),
    (r"45^{\circ}", "45"),
    (r"5\%", "5"),
    ("  7 \n", "7"),
])
def test_normalize_maps_equivalent_spellings_to_one_form(raw, norm):
    assert normalize(raw) == norm


def test_grader_never_raises():
    rng = random.Random(0)
    pieces = ["{", "}", "{", "}", "\\", "\\\\", "\\boxed", "\\boxed{", "\\boxed ", "\\fbox", "\\frac", "\\dfrac",
              "\\text{", "\\mbox", "\\sqrt", "\\left", "\\right", "\\circ", "^", "$", "\\$", "%", "\\%", " ", "\n",
              ".", ",", "-", "+", "/", "=", "#### ", "{,}", "x", "é", "½", "\u2212", "\U0001d7d8", "\u0663", "\ud800",
              "\x00", "∞", "1e999", "0" * 80] + list("0123456789")
    for _ in range(2000):
        s = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 30)))
        g = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 8)))
        box = extract_boxed(s)
        assert box is None or isinstance(box, str)
        assert isinstance(normalize(s), str)
        if box is not None:
            normalize(box)
        assert isinstance(is_correct(s, g), bool)
        assert isinstance(is_correct(s, normalize(box or "")), bool)


# -----------------------------------------------------------------------------
# pass@k

def test_pass_at_k_matches_brute_force():
    for n in range(1, 9):
        for c in range(n + 1):
            samples = [True] * c + [False] * (n - c)
            for k in range(1, n + 1):
                subsets = list(itertools.combinations(samples, k))
                expected = sum(any(s) for s in subsets) / len(subsets)
                assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12), (n, c, k)


def test_pass_at_k_at_zero_all_and_certain_success():
    assert pass_at_k(10, 0, 5) == 0.0
    assert pass_at_k(10, 10, 1) == 1.0
    assert pass_at_k(10, 6, 5) == 1.0  # n - c < k
    assert pass_at_k(1000, 3, 1) == pytest.approx(0.003)


@pytest.mark.parametrize("n,c,k,match", [
    (5, 6, 1, "0 <= c <= n"), (5, -1, 1, "0 <= c <= n"), (5, 2, 0, "1 <= k <= n"),
    (5, 2, 6, "1 <= k <= n"), (5.0, 2, 1, "n must be an integer"), (5, 2, True, "k must be an integer"),
])
def test_pass_at_k_refuses_impossible_counts(n, c, k, match):
    with pytest.raises(ValueError, match=match):
        pass_at_k(n, c, k)


# -----------------------------------------------------------------------------
# GSM8K rows, prompts and targets

def test_messages_are_one_user_turn_in_the_official_frame():
    assert gsm8k.messages("  What is 1+1? \n") == [{
        "role": "user",
        "content": "Solve the math problem with proper reasoning, and make sure to put the FINAL ANSWER "
                   "inside \\boxed{}.Question: What is 1+1?\n",
    }]


def test_first_two_rows_give_the_official_prompt_and_target(gsm):
    rows = gsm("train")
    r0, r1 = rows[0], rows[1]
    assert r0["id"] == "gsm8k-train-0" and r1["id"] == "gsm8k-train-1"
    assert gsm8k.messages(r0["question"])[0]["content"] == (
        "Solve the math problem with proper reasoning, and make sure to put the FINAL ANSWER inside \\boxed{}."
        "Question: Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
        "How many clips did Natalia sell altogether in April and May?\n")
    assert r0["target"] == (
        "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
        "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\\boxed{72}")
    assert r0["answer"] == "72"
    assert gsm8k.messages(r1["question"])[0]["content"] == (
        "Solve the math problem with proper reasoning, and make sure to put the FINAL ANSWER inside \\boxed{}."
        "Question: Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of babysitting. "
        "How much did she earn?\n")
    assert r1["target"] == (
        "Weng earns 12/60 = $<<12/60=0.2>>0.2 per minute.\n"
        "Working 50 minutes, she earned 0.2 x 50 = $<<0.2*50=10>>10.\\boxed{10}")
    assert r1["answer"] == "10"


def test_every_target_grades_correct_against_its_own_answer(gsm):
    rows = gsm("train") + gsm("test")
    assert len(rows) == 20 + 20
    assert all(is_correct(r["target"], r["answer"]) for r in rows)
    assert all(r["target"].count("\\boxed{") == 1 and "####" not in r["target"] for r in rows)


def test_train_val_split_is_a_fixed_seed_partition(gsm):
    rows = gsm("train")
    train, val = gsm8k.train_val_split(rows)
    assert (len(train), len(val)) == (18, 2)  # int(20 * 0.1)
    assert sorted(r["id"] for r in train + val) == sorted(r["id"] for r in rows)
    assert gsm8k.train_val_split(rows) == (train, val)  # fixed seed
    assert gsm8k.train_val_split(rows, seed=1)[1] != val
    assert gsm8k.load_task("gsm8k", "val") == val and gsm8k.load_task("gsm8k", "train") == train


@pytest.mark.shared
def test_full_gsm8k_targets_grade_correct(full_gsm):
    rows = full_gsm("train") + full_gsm("test")
    assert len(rows) == 7473 + 1319
    assert all(is_correct(r["target"], r["answer"]) for r in rows)
    commas = [r for r in rows if "," in extract_boxed(r["target"])]
    assert commas and all("," not in r["answer"] for r in rows)  # gold drops commas, target keeps them
    assert all(r["target"].count("\\boxed{") == 1 and "####" not in r["target"] for r in rows)


@pytest.mark.shared
def test_full_gsm8k_splits_6726_train_747_val(full_gsm, monkeypatch):
    monkeypatch.setenv("MEMGEN_GSM8K_URL", str(SHARED_GSM8K))
    train, val = gsm8k.train_val_split(full_gsm("train"))
    assert (len(train), len(val)) == (6726, 747)
    assert {r["id"] for r in train}.isdisjoint(r["id"] for r in val)
    assert gsm8k.load_task("gsm8k", "val") == val


def test_train_val_split_refuses_a_fraction_outside_0_1():
    with pytest.raises(ValueError, match="val_frac"):
        gsm8k.train_val_split([1, 2, 3], val_frac=1.0)


def test_an_unknown_split_is_refused_by_name(cache):
    with pytest.raises(ValueError, match="unknown GSM8K split 'dev'"):
        gsm8k.load_split("dev")
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        gsm8k.load_task("gsm8k", "dev")


def write_jsonl(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def test_a_malformed_gsm8k_line_is_named_by_file_and_line(tmp_path):
    bad = write_jsonl(tmp_path / "train.jsonl", [
        json.dumps({"question": "q", "answer": "a\n#### 1"}),
        json.dumps({"question": "q", "answer": "a\n#### 2"}),
        '{"question": "q", "answer": ',
    ])
    with pytest.raises(DataError, match=r"train\.jsonl, line 3: not valid JSON"):
        gsm8k._gsm8k_rows(str(bad), "x")
    nohash = write_jsonl(tmp_path / "t2.jsonl", [json.dumps({"question": "q", "answer": "just 5"})])
    with pytest.raises(DataError, match="line 1: answer has no '####"):
        gsm8k._gsm8k_rows(str(nohash), "x")


def test_a_question_answer_jsonl_becomes_rows_and_splits(tmp_path):
    f = write_jsonl(tmp_path / "mini.jsonl", [
        json.dumps({"question": " Capital of France? ", "answer": "Paris"}),
        "",
        json.dumps({"question": "2+3?", "answer": "2+3 = <<2+3=5>>5\n#### 5", "id": 99}),
        json.dumps({"question": "Big?", "answer": "#### 1,000"}),
    ])
    rows = gsm8k.load_jsonl_task(f)
    assert rows == [
        {"id": "mini-0", "question": "Capital of France?", "answer": "Paris", "target": "\\boxed{Paris}"},
        {"id": "99", "question": "2+3?", "answer": "5", "target": "2+3 = <<2+3=5>>5\\boxed{5}"},
        {"id": "mini-2", "question": "Big?", "answer": "1000", "target": "\\boxed{1,000}"},
    ]
    assert gsm8k.load_task(str(f), "test") == rows
    train, val = gsm8k.load_task(f, "train"), gsm8k.load_task(f, "val", val_frac=0.5)
    assert len(train) == 3 and len(val) == 1


@pytest.mark.parametrize("lines,match", [
    (['{"question": "q", "answer": "a"}', "[1, 2]"], r"line 2: expected a JSON object"),
    (['{"question": "q", "answer": "a"}', '{"question": "q"}'], r"line 2: field 'answer' is missing"),
    (['{"question": "", "answer": "a"}'], r"line 1: field 'question' is not a non-empty string"),
    (['{"question": "q", "answer": 5}'], r"line 1: field 'answer' is not a non-empty string"),
    (['{"question": "q", "answer": "a"}', "{oops}"], r"line 2: not valid JSON"),
    (["", ""], "has no rows"),
])
def test_a_bad_jsonl_line_is_named_with_what_is_wrong(tmp_path, lines, match):
    f = write_jsonl(tmp_path / "bad.jsonl", lines)
    with pytest.raises(DataError, match=match):
        gsm8k.load_jsonl_task(f)


def test_a_missing_or_non_utf8_jsonl_is_one_clear_error(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        gsm8k.load_jsonl_task(tmp_path / "nope.jsonl")
    binary = tmp_path / "bin.jsonl"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(DataError, match="not UTF-8"):
        gsm8k.load_jsonl_task(binary)


def test_unknown_data_is_refused_by_name():
    with pytest.raises(ValueError, match="unknown data 'mmlu'"):
        gsm8k.load_task("mmlu", "test")
