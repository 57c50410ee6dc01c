"""
Tokenizer tests: our tiktoken-based tokenizer must give exactly the ids of the Hugging-Face
tokenizer (transformers / tokenizers are test-only oracles here).

Default tests use tiny tokenizers trained on the fly (tests/tiny_tokenizer.py), one per family.
Set MEMGEN_SMALL_MODEL=/path/to/hf-folder to also check a real model's tokenizer.
"""

import json
import os
import random
import shutil
import sys
import unicodedata

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

from tiny_tokenizer import FAMILIES, build_tokenizer_files  # noqa: E402
from tokenizer import GPT2_DIGITS_PATTERN, GPT2_PATTERN, QWEN2_PATTERN, load_tokenizer  # noqa: E402

REAL = os.environ.get("MEMGEN_SMALL_MODEL")

# -----------------------------------------------------------------------------
# corpus

HARD = [
    "", " ", "  ", "\n", "\n\n", "\t", "Hello world!", "hello  world", "a  b   c", "  \n\n  x", "x  \n\n  ",
    "trailing spaces   ", "   leading", "tabs\there\t\tand\t \tthere", "\r\n\r\nwindows\r\n", "a\rb",
    "1234567890", "3.14159", "$1,000,000", "-42", "v1.2.3", "x1y22z333", "abc123def", "a 1", "a  1",
    "a   1", "a \n 1", "1 a", "1  a", "1   a", "12  34", " 1", "  1", "1 ", "1  ", "1\n\n2", "a\t1",
    "0x1F 1e-9 100%", "2024-01-01T12:00:00Z", "phone: +1 (555) 123-4567",
    "don't", "I'M", "we'll", "they'RE here", "it's", "you'd've", "'s", "'", "''", "rock 'n' roll",
    "中文文本测试，你好世界。", "日本語のテキスト", "한국어 텍스트", "Ελληνικά русский язык", "مرحبا بالعالم",
    "😀", "👍🏽", "🇺🇸🇩🇪", "👨‍👩‍👧‍👦 family", "❤️ love", "emoji😀inside", "a😀 😀b",
    "def f(x):\n    return x ** 2  # square\n", "for (int i = 0; i < n; ++i) { a[i] += 1; }",
    "if x == 1:\n\tprint('hi')\n\n\n", "```python\nimport os\n```", "<div class=\"x\">&nbsp;</div>",
    "e\u0301", "cafe\u0301 vs café", "A\u030a", "\u212b", "ﬁ ligature", "Å Å", "ǅ", "ß ẞ İ ı",
    "ſ 'ſ 'ſt 'S 'LL", "K Kelvin", "½ ² ٣ Ⅻ ① 〇", "١٢٣ ४५६", "\u00a0nbsp\u00a0", "\u3000ideographic",
    "\u1100\u1161\u11a8 jamo", "\u2028line\u2029para", "\x85nel", "zero\u200bwidth", "\x0b\x0c vertical", "\x7f del", "\x00nul",
    "mixed 中文 and English 123 😀 don't!", "... --- ??? !!!", "$$$ ### @@@", "~`^|\\", "\"quoted\"",
    "Question: 16 - 3 = 13. Answer: 13", " \t \n \r\n ", "a\n \nb", "x \n", "x\n ", "!\n\n", "?\r\n",
]

_FRAGMENTS = [
    "a", "b", "Z", "hello", "World", " ", "  ", "   ", "\t", "\n", "\n\n", "\r\n", "\r", "0", "1", "7", "42",
    "999", "٣", "½", "²", "Ⅻ", "'", "'s", "'T", "'LL", "'re", "ſ", "\u212a", "\u00a0", "\u3000", "\u2028",
    "\x85", "\u200d", "\u0301", "e\u0301", "A\u030a", "中", "文", "の", "한", "😀", "👍🏽", "🇺🇸", "é", "ß", "İ",
    "!", "?", ".", ",", "$", "#", "(", ")", "{", "}", "_", "-", "\\", "/", '"', "`", "~", "…", "—", "<", ">",
    "|", "=", "+", "*", "\x0b", "\x0c", "\x1f", "\x04", "\x00", "\U00040000", "ÿ", "\x7f", "<|im_end|>",
]


def random_strings(n, seed=0):
    """Strings glued from tricky fragments (digits next to spaces, contractions, marks, ...)."""
    rng = random.Random(seed)
    return ["".join(rng.choice(_FRAGMENTS) for _ in range(rng.randint(1, 24))) for _ in range(n)]


def random_unicode(n, seed=0):
    """Strings of random code points from all planes (catches regex \\p{L}/\\p{N}/\\s disagreements)."""
    rng = random.Random(seed)
    pools = [(0x20, 0x7F), (0x80, 0x2FFF), (0x3000, 0xFFFF), (0x10000, 0x10FFFF)]
    out = []
    for _ in range(n):
        chars = []
        for _ in range(rng.randint(1, 30)):
            c = rng.randint(*rng.choice(pools)) if rng.random() < 0.7 else ord(rng.choice(" \t\n\r0123456789'"))
            chars.append(chr(c) if not 0xD800 <= c <= 0xDFFF else "x")  # no lone surrogates
        out.append("".join(chars))
    return out


def encodable(tok, texts):
    """Drop strings with bytes `tok` cannot encode (SmolLM2 lacks a few control bytes)."""
    bad = set(tok.missing_bytes)
    return [t for t in texts if not bad & set(t.encode("utf-8"))]


# -----------------------------------------------------------------------------
# helpers


def hf_tokenizer(folder):
    from transformers import PreTrainedTokenizerFast
    # split_special_tokens: special-token text in the input is encoded as text, as ours does
    return PreTrainedTokenizerFast(tokenizer_file=os.path.join(folder, "tokenizer.json"), split_special_tokens=True)


def hf_chatml_ids(folder, messages):
    """Ids HF gives for the ChatML string (special tokens matched as special ids)."""
    from transformers import PreTrainedTokenizerFast
    hf = PreTrainedTokenizerFast(tokenizer_file=os.path.join(folder, "tokenizer.json"))
    text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    return hf.encode(text + "<|im_start|>assistant\n", add_special_tokens=False)


def assert_matches_hf(folder, texts, hf_gets_our_nfc=False):
    """Ids equal HF's and decode(encode(x)) == x (NFC(x) for NFC families); returns #strings.

    hf_gets_our_nfc: known, accepted difference: HF's NFC tables are older than Python's
    unicodedata, so runs of 2+ combining marks from recent Unicode versions (e.g. "\u08cb\u1734")
    get reordered by us and not by HF. For random code points we therefore hand HF our NFC text,
    which still compares everything after normalisation. Common NFC cases are compared as is."""
    tok, hf = load_tokenizer(folder), hf_tokenizer(folder)
    texts = encodable(tok, texts)
    for text, ids in zip(texts, tok.encode_batch(texts)):
        expected = unicodedata.normalize("NFC", text) if tok.nfc else text
        hf_ids = hf.encode(expected if hf_gets_our_nfc else text, add_special_tokens=False)
        assert ids == hf_ids, f"ids differ for {text!r}"
        assert tok.decode(ids) == expected, f"decode(encode(x)) != x for {text!r}"
    return len(texts)


def check_bpe_core(hf, tok, n, seed=0):
    """tiktoken merges the adjacent pair whose concatenation has the lowest id; HF merges the
    pair listed first in merges. Glue random tokens into one piece and compare the two."""
    from tokenizer import _UNICODE_TO_LATIN1
    vocab = [t for t, i in hf.get_vocab(with_added_tokens=False).items() if i not in tok._specials.values()]
    rng = random.Random(seed)
    for _ in range(n):
        piece = "".join(rng.choice(vocab) for _ in range(rng.randint(2, 4)))  # byte-level form
        ours = tok.enc._encode_single_piece(piece.translate(_UNICODE_TO_LATIN1).encode("latin-1"))
        assert ours == [t.id for t in hf.model.tokenize(piece)], piece


@pytest.fixture(scope="module", params=FAMILIES)
def family_folder(request, tmp_path_factory):
    folder = str(tmp_path_factory.mktemp(request.param))
    build_tokenizer_files(folder, request.param)
    return request.param, folder


# -----------------------------------------------------------------------------
# tiny tokenizers (default)


def test_matches_hf(family_folder):
    family, folder = family_folder
    tok = load_tokenizer(folder)
    assert tok.pattern == (GPT2_DIGITS_PATTERN if family == "llama" else QWEN2_PATTERN)
    assert tok.nfc == (family == "qwen2")
    n = assert_matches_hf(folder, HARD + random_strings(2000) + ["\n".join(HARD) * 3])
    n += assert_matches_hf(folder, random_unicode(1000), hf_gets_our_nfc=True)
    assert n > 3000


def test_bpe_merges_match_hf(family_folder):
    """The BPE step alone (no regex): random glued vocabulary tokens as one piece."""
    from tokenizers import Tokenizer
    _, folder = family_folder
    check_bpe_core(Tokenizer.from_file(os.path.join(folder, "tokenizer.json")), load_tokenizer(folder), 3000)


def test_single_regex_equals_hf_pretokenizer(family_folder):
    """Our one regex splits text exactly like HF's pre-tokenizer Sequence (the `regex` module
    stands in for tiktoken's regex engine here; the id test above checks tiktoken itself)."""
    regex = pytest.importorskip("regex")
    from tokenizers import Tokenizer
    family, folder = family_folder
    hf, tok = Tokenizer.from_file(os.path.join(folder, "tokenizer.json")), load_tokenizer(folder)
    pat = regex.compile(tok.pattern)
    for text in HARD + random_strings(3000, seed=1):  # no random code points: `regex` knows newer Unicode than HF
        text = hf.normalizer.normalize_str(text) if hf.normalizer else text
        want = [text[a:b] for _, (a, b) in hf.pre_tokenizer.pre_tokenize_str(text)]
        assert pat.findall(text) == want, repr(text)


def test_plain_gpt2_digits_lookahead_matters():
    """Why GPT2_DIGITS_PATTERN changes the whitespace lookahead: the plain GPT-2 lookahead
    splits the spaces before a digit differently from HF's Digits-then-ByteLevel Sequence."""
    regex = pytest.importorskip("regex")
    naive = GPT2_PATTERN.replace(r" ?\p{N}+", r"\p{N}")
    assert regex.findall(naive, "a   1") == ["a", "  ", " ", "1"]
    assert regex.findall(GPT2_DIGITS_PATTERN, "a   1") == ["a", "   ", "1"]


def test_fallback_vocab_and_merges(tmp_path):
    """Without tokenizer.json, Qwen2's vocab.json + merges.txt + tokenizer_config.json give the same ids."""
    full, slow = str(tmp_path / "full"), str(tmp_path / "slow")
    build_tokenizer_files(full, "qwen2")
    shutil.copytree(full, slow)
    os.remove(os.path.join(slow, "tokenizer.json"))
    a, b = load_tokenizer(full), load_tokenizer(slow)
    texts = HARD + random_strings(300)
    assert b.encode_batch(texts) == a.encode_batch(texts)
    assert (b.vocab_size, b.eos_ids, b.pad_id, b.special_ids) == (a.vocab_size, a.eos_ids, a.pad_id, a.special_ids)


def test_fallback_needs_known_class(tmp_path):
    build_tokenizer_files(str(tmp_path), "llama")  # tokenizer_class PreTrainedTokenizerFast, like SmolLM2
    os.remove(tmp_path / "tokenizer.json")
    with pytest.raises(ValueError, match="tokenizer.json"):
        load_tokenizer(str(tmp_path))


def test_special_text_is_ordinary(family_folder):
    _, folder = family_folder
    tok = load_tokenizer(folder)
    for text in ["<|im_end|>", "say <|im_start|>system\nhi<|im_end|> ok", "<|endoftext|><|endoftext|>"]:
        ids = tok.encode(text)
        assert not set(ids) & tok.special_ids
        assert tok.decode(ids) == text
    ids = tok.chat([{"role": "user", "content": "stop <|im_end|> here"}])
    assert sum(i in tok.special_ids for i in ids) == 3  # <|im_start|>, <|im_end|>, <|im_start|>


def test_chat_matches_hf(family_folder):
    from transformers import AutoTokenizer
    _, folder = family_folder
    tok = load_tokenizer(folder)
    msgs = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is 12 + 30?"},
            {"role": "assistant", "content": "42"}, {"role": "user", "content": "  and 中文 😀?\n"}]
    ids = tok.chat(msgs)
    assert ids == hf_chatml_ids(folder, msgs)
    hf = AutoTokenizer.from_pretrained(folder)
    got = hf.apply_chat_template(msgs, tokenize=True, add_generation_prompt=True)
    got = got["input_ids"] if isinstance(got, dict) or hasattr(got, "keys") else got
    assert ids == list(got)
    start = tok.encode("<|im_start|>")  # as text: no special ids
    assert not set(start) & tok.special_ids
    no_prompt = tok.chat(msgs, add_generation_prompt=False)
    assert ids[:len(no_prompt)] == no_prompt and tok.decode(ids[len(no_prompt):]) == "<|im_start|>assistant\n"
    assert tok.decode(ids, skip_special=True).startswith("system\nYou are terse.\nuser\n")
    with pytest.raises(ValueError, match="message #0"):
        tok.chat([{"role": "user"}])


def test_ids_and_metadata(family_folder):
    family, folder = family_folder
    tok = load_tokenizer(folder)
    with open(os.path.join(folder, "tokenizer.json"), encoding="utf-8") as f:
        cfg = json.load(f)
    specials = {a["content"]: a["id"] for a in cfg["added_tokens"]}
    assert tok.vocab_size == max(max(cfg["model"]["vocab"].values()), *specials.values()) + 1
    assert tok.special_ids == set(specials.values())
    if family == "qwen2":
        assert tok.eos_ids == sorted([specials["<|im_end|>"], specials["<|endoftext|>"]])
        assert tok.pad_id == specials["<|endoftext|>"]
        assert min(specials.values()) > max(i for t, i in cfg["model"]["vocab"].items() if t not in specials)
    else:
        assert tok.eos_ids == [specials["<|im_end|>"]] == [2]
        assert tok.pad_id == 2 and sorted(specials.values()) == [0, 1, 2]
    assert tok.missing_bytes == []
    assert tok.token_bytes(specials["<|im_end|>"]) == b"<|im_end|>"
    assert b"".join(tok.token_bytes(i) for i in tok.encode("don't 😀")) == "don't 😀".encode()
    assert {len(tok.token_bytes(i)) for i in range(tok.vocab_size)} >= {1, 2, 3}  # every id has bytes
    assert tok.decode([specials["<|im_start|>"]]) == "<|im_start|>"
    with pytest.raises(ValueError, match="not in the vocabulary"):
        tok.decode([tok.vocab_size + 5])
    with pytest.raises(ValueError, match="not in the vocabulary"):
        tok.decode([5, -1])
    with pytest.raises(ValueError, match="not in the vocabulary"):
        tok.token_bytes(-1)
    with pytest.raises(ValueError, match="expects a str"):
        tok.encode(b"bytes")


# -----------------------------------------------------------------------------
# errors


def test_error_folder_without_tokenizer(tmp_path):
    with pytest.raises(ValueError, match=str(tmp_path)):
        load_tokenizer(str(tmp_path))
    with pytest.raises(ValueError, match="not a folder"):
        load_tokenizer(str(tmp_path / "nope"))


def test_error_unknown_pretokenizer(tmp_path):
    build_tokenizer_files(str(tmp_path), "llama")
    path = tmp_path / "tokenizer.json"
    cfg = json.loads(path.read_text(encoding="utf-8"))
    cfg["pre_tokenizer"] = {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always", "split": True}
    path.write_text(json.dumps(cfg), encoding="utf-8")
    with pytest.raises(ValueError, match="Metaspace"):
        load_tokenizer(str(tmp_path))


def test_error_tiktoken_cannot_build(tmp_path):
    build_tokenizer_files(str(tmp_path), "qwen2")
    path = tmp_path / "tokenizer.json"
    cfg = json.loads(path.read_text(encoding="utf-8"))
    cfg["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = "(?<=a"  # broken regex
    path.write_text(json.dumps(cfg), encoding="utf-8")
    with pytest.raises(ValueError, match="tiktoken cannot build"):
        load_tokenizer(str(tmp_path))


def test_error_broken_json(tmp_path):
    build_tokenizer_files(str(tmp_path), "qwen2")
    (tmp_path / "tokenizer.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(ValueError, match="tokenizer.json"):
        load_tokenizer(str(tmp_path))


@pytest.mark.parametrize("family", FAMILIES)
def test_error_missing_byte(tmp_path, family):
    # 0x06: an ASCII control char; 0xF1: lead byte of U+40000..U+7FFFF; 0xFF: never in UTF-8
    build_tokenizer_files(str(tmp_path), family, missing_bytes=(0x06, 0xF1, 0xFF))
    tok = load_tokenizer(str(tmp_path))
    assert tok.missing_bytes == [0x06, 0xF1, 0xFF]
    assert tok.decode(tok.encode("fine text ÿ 😀")) == "fine text ÿ 😀"
    with pytest.raises(ValueError, match=r"'\\x06' at position 3 .*cannot be encoded by this vocabulary"):
        tok.encode("abc\x06def")
    with pytest.raises(ValueError, match=r"position 2 .*cannot be encoded"):
        tok.encode("é😀\U00040000x")
    with pytest.raises(ValueError, match="cannot be encoded"):
        tok.encode_batch(["ok", "\x06"])
    with pytest.raises(ValueError, match="cannot be encoded"):
        tok.chat([{"role": "user", "content": "\x06"}])


# -----------------------------------------------------------------------------
# a real model folder (opt-in)

real = pytest.mark.skipif(not REAL, reason="set MEMGEN_SMALL_MODEL to a Hugging-Face model folder")


@real
def test_real_matches_hf():
    n = assert_matches_hf(REAL, HARD + random_strings(20000) + ["\n".join(HARD) * 3])
    n += assert_matches_hf(REAL, random_unicode(10000), hf_gets_our_nfc=True)
    print(f"compared {n} strings with HF")
    assert n > 15000  # SmolLM2 drops ~40% of the random strings (bytes it lacks)


@real
def test_real_bpe_merges_match_hf():
    from tokenizers import Tokenizer
    check_bpe_core(Tokenizer.from_file(os.path.join(REAL, "tokenizer.json")), load_tokenizer(REAL), 20000)


@real
def test_real_vocab_tokens_are_bpe_fixed_points():
    """tiktoken returns a piece's own id when the piece is a whole token, without merging;
    HF merges. They agree only if every token's own bytes BPE back to that token in HF."""
    from tokenizers import Tokenizer
    hf, tok = Tokenizer.from_file(os.path.join(REAL, "tokenizer.json")), load_tokenizer(REAL)
    vocab = hf.get_vocab(with_added_tokens=False)
    bad = [(t, i) for t, i in vocab.items() if i not in tok._specials.values()
           and [x.id for x in hf.model.tokenize(t)] != [i]]
    assert not bad, bad[:10]


@real
def test_real_chat_and_eos():
    tok = load_tokenizer(REAL)
    msgs = [{"role": "user", "content": "Janet has 16 eggs. How many are left after 3?"}]
    assert tok.chat(msgs) == hf_chatml_ids(REAL, msgs)
    im_end = tok._specials["<|im_end|>"]
    assert im_end in tok.eos_ids and tok.pad_id is not None
    assert tok.vocab_size > max(tok.eos_ids)


@real
def test_real_missing_bytes():
    tok = load_tokenizer(REAL)
    ascii_missing = [b for b in tok.missing_bytes if b < 0x80]
    for b in ascii_missing:
        with pytest.raises(ValueError, match="cannot be encoded by this vocabulary"):
            tok.encode("ok " + chr(b))
    if 0xF1 in tok.missing_bytes:
        with pytest.raises(ValueError, match="cannot be encoded"):
            tok.encode("\U00040000")
    # every other character below 0x80 encodes and round-trips
    fine = "".join(chr(c) for c in range(128) if c not in ascii_missing)
    assert tok.decode(tok.encode(fine)) == fine
