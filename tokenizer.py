"""
tokenizer.py: the tokenizer of a Hugging Face model folder, on tiktoken, with ChatML rendering.

    tok = load_tokenizer(folder)          # tokenizer.json, or vocab.json + merges.txt (+ tokenizer_config.json)
    ids = tok.chat([{"role": "user", "content": "..."}])       # a ChatML prompt, ready for model.generate
    text = tok.decode(ids)

What it does: reads a byte-level BPE vocabulary (Qwen2, Llama 3, SmolLM, GPT-2 style) and encodes and decodes with
exactly the ids of the Hugging Face tokenizer (tests/test_tokenizer.py holds it to `tokenizers`/`transformers`).

Why tiktoken: its BPE and regex split run in native code, so encoding is fast, and it is one small dependency;
`tokenizers` / `transformers` are test-only oracles here. A HF byte-level vocabulary stores every token as a
printable unicode string (GPT-2's byte<->unicode map, BYTE_TO_UNICODE). We undo that map to get raw token bytes,
use the token id as the tiktoken merge rank (for these vocabularies merge order == id order, checked at load), and
translate the folder's pre-tokenizer into the single regex tiktoken wants (GPT2_PATTERN, GPT2_DIGITS_PATTERN,
QWEN2_PATTERN, or the folder's own Split regex). An NFC normalizer is applied in Python before encoding.

Added tokens: special ones (e.g. "<|im_end|>") are tiktoken special tokens that `encode` never produces from text
(special-token text in user input is encoded as plain text; only `chat` emits the ChatML markers); non-special added
tokens (e.g. Qwen's "<tool_call>") are matched inside ordinary text, as HF does.

ChatML (`Tokenizer.chat`), with no default system message (as MemGen's overridden chat template): each message is
    <|im_start|>{role}\\n{content}<|im_end|>\\n
with the two markers as special ids and role + content encoded as plain text; add_generation_prompt appends
"<|im_start|>assistant\\n". A vocabulary without <|im_start|>/<|im_end|> cannot render ChatML (ValueError).

Text the vocabulary cannot encode: a vocabulary may lack a single-byte token for some byte. Text holding such a
byte is rejected before tiktoken sees it (which would panic) with a ValueError naming the character, its position
and the byte, e.g. "character 'é' at position 3 (byte 0xc3) cannot be encoded by this vocabulary (FOLDER); remove it
from the text". Bytes that never occur in UTF-8 may be missing harmlessly.

Every error is a ValueError whose message says what is wrong and what to do. This module does not import model.py.
"""
import json
import os
import re
import unicodedata

import tiktoken

# -----------------------------------------------------------------------------
# pre-tokenizer regexes

# GPT-2's regex, as HF's ByteLevel(use_regex=True) applies it.
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

# Sequence[Digits(individual_digits=True), ByteLevel(use_regex=True)] as ONE regex.
# HF first cuts the text before and after every digit, then runs the GPT-2 regex inside
# each digit-free piece. Two changes make the GPT-2 regex do both at once:
#  - ` ?\p{N}+` becomes `\p{N}`: a digit is always a piece of its own, and never takes the
#    space before it (that space ended the previous piece).
#  - `\s+(?!\S)` becomes `\s+(?![^\s\p{N}])`: inside a piece, whitespace right before a digit
#    sits at the END of the piece, so the lookahead must treat a digit like end-of-text.
#    (With the plain lookahead "a   1" would split "a","  "," ","1" instead of "a","   ","1".)
# No other branch can match a digit or look past one, so no match can cross a cut.
GPT2_DIGITS_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+|\s+(?![^\s\p{N}])|\s+"""

# Qwen2's Split regex; used by Qwen2's slow tokenizer (vocab.json + merges.txt only).
QWEN2_PATTERN = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""

# tokenizer_config.json "tokenizer_class" -> (regex, NFC?) for folders without tokenizer.json
SLOW_TOKENIZER_CLASSES = {
    "Qwen2Tokenizer": (QWEN2_PATTERN, True),
    "Qwen2TokenizerFast": (QWEN2_PATTERN, True),
    "GPT2Tokenizer": (GPT2_PATTERN, False),
    "GPT2TokenizerFast": (GPT2_PATTERN, False),
}


def _byte_to_unicode():
    """GPT-2's reversible map from the 256 bytes to printable unicode characters."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    out, n = {b: chr(b) for b in printable}, 0
    for b in range(256):
        if b not in out:
            out[b] = chr(256 + n)  # non-printable bytes are shifted past latin-1
            n += 1
    return out


BYTE_TO_UNICODE = _byte_to_unicode()
# str.translate table: byte-level char -> the latin-1 char of its byte, so .encode("latin-1")
# turns a whole token into its bytes in C (a python loop over 151k tokens is too slow).
_UNICODE_TO_LATIN1 = {ord(u): chr(b) for b, u in BYTE_TO_UNICODE.items()}
# bytes that never occur in UTF-8 text, so a vocabulary may lack them harmlessly
_NEVER_IN_UTF8 = {0xC0, 0xC1, *range(0xF5, 0x100)}

# -----------------------------------------------------------------------------
# reading the folder


def _read_json(path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read {path}: {e}; re-download the model folder") from None


def _pattern_from_tokenizer_json(pre, path):
    """Map tokenizer.json's pre_tokenizer onto one tiktoken regex, or raise."""
    def name(p):
        return p.get("type") if isinstance(p, dict) else repr(p)

    def byte_level(p, use_regex):
        return (name(p) == "ByteLevel" and bool(p.get("use_regex", True)) == use_regex
                and not p.get("add_prefix_space", False))

    steps = pre.get("pretokenizers", []) if name(pre) == "Sequence" else [pre]
    if len(steps) == 1 and byte_level(steps[0], True):
        return GPT2_PATTERN
    if len(steps) == 2:
        first, second = steps
        if (name(first) == "Digits" and first.get("individual_digits") and byte_level(second, True)):
            return GPT2_DIGITS_PATTERN
        if (name(first) == "Split" and "Regex" in first.get("pattern", {})
                and first.get("behavior") == "Isolated" and not first.get("invert", False)
                and byte_level(second, False)):
            return first["pattern"]["Regex"]
    desc = name(pre) + ("[" + ", ".join(name(p) for p in steps) + "]" if name(pre) == "Sequence" else "")
    raise ValueError(
        f"{path}: unsupported pre_tokenizer {desc}; supported are ByteLevel(use_regex=True), "
        "Sequence[Digits(individual_digits=True), ByteLevel] and Sequence[Split(Regex, Isolated), "
        "ByteLevel(use_regex=False)]")


def _uses_nfc(normalizer, path):
    if normalizer is None:
        return False
    kind = normalizer.get("type")
    if kind == "NFC":
        return True
    if kind == "Sequence":  # e.g. Sequence[] or Sequence[NFC]
        return any([_uses_nfc(n, path) for n in normalizer.get("normalizers", [])])
    raise ValueError(f"{path}: unsupported normalizer {kind}; only NFC (or none) is supported")


def _read_merges_txt(path):
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    # optional "#version" header, then one "left right" pair per line
    return [ln for ln in lines if ln and not ln.startswith("#version")]


def _read_folder(folder):
    """-> vocab {str: id}, merges [str|list], added [(content, id, special)], pattern, nfc, configs"""
    tj = os.path.join(folder, "tokenizer.json")
    tcfg_path = os.path.join(folder, "tokenizer_config.json")
    tcfg = _read_json(tcfg_path) if os.path.isfile(tcfg_path) else {}
    if os.path.isfile(tj):
        t = _read_json(tj)
        model = t.get("model") or {}
        if model.get("type", "BPE") != "BPE" or model.get("byte_fallback") or \
                model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
            raise ValueError(f"{tj}: model must be a plain byte-level BPE (got {model.get('type')}"
                             f", byte_fallback={model.get('byte_fallback')})")
        pattern = _pattern_from_tokenizer_json(t.get("pre_tokenizer") or {"type": None}, tj)
        nfc = _uses_nfc(t.get("normalizer"), tj)
        added = [(a["content"], int(a["id"]), bool(a.get("special", False))) for a in t.get("added_tokens", [])]
        return model.get("vocab", {}), model.get("merges", []), added, pattern, nfc, tcfg
    vj, mt = os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt")
    if not (os.path.isfile(vj) and os.path.isfile(mt)):
        raise ValueError(f"{folder}: no tokenizer files found (need tokenizer.json, or vocab.json + "
                         "merges.txt); point to a Hugging-Face model folder")
    cls = tcfg.get("tokenizer_class")
    if cls not in SLOW_TOKENIZER_CLASSES:
        raise ValueError(f"{folder}: has no tokenizer.json and tokenizer_class {cls!r} does not say which "
                         f"pre-tokenizer to use (known: {sorted(SLOW_TOKENIZER_CLASSES)}); add tokenizer.json")
    pattern, nfc = SLOW_TOKENIZER_CLASSES[cls]
    added = [(a["content"], int(i), bool(a.get("special", False)))
             for i, a in (tcfg.get("added_tokens_decoder") or {}).items()]
    return _read_json(vj), _read_merges_txt(mt), added, pattern, nfc, tcfg


# -----------------------------------------------------------------------------
# the tokenizer


class Tokenizer:
    def __init__(self, folder, vocab, merges, added, pattern, nfc, tcfg, gcfg):
        self.folder = folder
        self.nfc = nfc
        self.pattern = pattern

        # token strings -> bytes; added tokens are kept out of BPE (tiktoken would otherwise
        # happily merge its way to "<|im_end|>") and handled as tiktoken "special" tokens.
        added_text = {c for c, _, _ in added}
        regular = {s: i for s, i in vocab.items() if s not in added_text}
        allowed = set(BYTE_TO_UNICODE.values())
        stray = set("".join(regular)) - allowed
        if stray:
            raise ValueError(f"{folder}: vocabulary is not byte-level BPE (has characters "
                             f"{sorted(stray)[:5]} outside GPT-2's byte alphabet)")
        ranks = {s.translate(_UNICODE_TO_LATIN1).encode("latin-1"): i for s, i in regular.items()}
        if len(ranks) != len(regular):
            raise ValueError(f"{folder}: vocabulary has two tokens with the same bytes")

        # tiktoken merges the adjacent pair whose concatenation has the lowest rank; HF merges the
        # pair listed first in merges. Using ids as ranks is only right if merges follow id order.
        last = -1
        for k, m in enumerate(merges):
            left, right = m if isinstance(m, (list, tuple)) else m.split(" ", 1)
            i = regular.get(left + right)
            if i is None or i <= last:
                raise ValueError(f"{folder}: merge #{k} ({left!r} {right!r}) "
                                 + ("makes a token missing from the vocabulary" if i is None else
                                    "is out of token-id order, which this tokenizer does not support"))
            last = i

        self.special_ids = {i for _, i, special in added if special}
        self._specials = {c: i for c, i, _ in added}
        # HF matches NON-special added tokens (e.g. Qwen's "<tool_call>") inside ordinary text,
        # but never turns special-token text (e.g. "<|im_end|>" in user input) into special ids.
        self._allowed = {c for c, _, special in added if not special}
        try:
            self.enc = tiktoken.Encoding(f"hf:{folder}", pat_str=pattern, mergeable_ranks=ranks,
                                         special_tokens=self._specials)
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as e:  # pyo3 panics are BaseException, not Exception
            raise ValueError(f"{folder}: tiktoken cannot build this vocabulary: {e}") from None

        self._id_to_bytes = {i: b for b, i in ranks.items()}
        self._id_to_bytes.update({i: c.encode("utf-8") for c, i, _ in added})
        self.vocab_size = max(self._id_to_bytes) + 1

        # Bytes the vocabulary has no single-byte token for: text containing them cannot be
        # encoded (tiktoken would panic). Precompute one regex so encode() checks in C.
        missing = set(range(256)) - {b[0] for b in ranks if len(b) == 1}
        self.missing_bytes = sorted(missing)
        reachable = sorted(missing - _NEVER_IN_UTF8)
        self._bad = re.compile(b"[" + b"".join(re.escape(bytes([b])) for b in reachable) + b"]") if reachable else None

        def token_id(text):
            if isinstance(text, dict):  # old configs: {"content": "<|im_end|>", ...}
                text = text.get("content")
            return self._specials.get(text)

        eos = gcfg.get("eos_token_id")
        eos = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        eos |= {i for i in (token_id(tcfg.get("eos_token")), self._specials.get("<|im_end|>")) if i is not None}
        self.eos_ids = sorted(int(i) for i in eos)
        pad = token_id(tcfg.get("pad_token"))
        self.pad_id = pad if pad is not None else (self.eos_ids[0] if self.eos_ids else None)
        # the token that closes an assistant turn: SFT targets end with it, so the model learns to stop
        end = self._specials.get("<|im_end|>")
        self.end_id = end if end is not None else (self.eos_ids[0] if self.eos_ids else None)

    # -- encoding

    def _prepare(self, text):
        if not isinstance(text, str):
            raise ValueError(f"encode expects a str, got {type(text).__name__}")
        if self.nfc:
            text = unicodedata.normalize("NFC", text)
        if self._bad is not None:
            m = self._bad.search(text.encode("utf-8", "surrogatepass"))
            if m is not None:
                pos = len(text.encode("utf-8", "surrogatepass")[:m.start()].decode("utf-8", "ignore"))
                raise ValueError(f"character {text[pos]!r} at position {pos} (byte 0x{m.group()[0]:02x}) "
                                 f"cannot be encoded by this vocabulary ({self.folder}); remove it from the text")
        return text

    def encode(self, text):
        """Ordinary text -> ids. Special-token text is encoded as plain text, never as special ids."""
        text = self._prepare(text)
        try:
            return self.enc.encode(text, allowed_special=self._allowed, disallowed_special=())
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as e:  # a Rust panic arrives as pyo3's PanicException(BaseException)
            raise ValueError(f"tiktoken failed to encode {text[:50]!r}... with the vocabulary of "
                             f"{self.folder}: {type(e).__name__}: {e}") from None

    def encode_batch(self, texts):
        # a plain loop: tiktoken's thread-pool batch is several times slower on short texts
        return [self.encode(t) for t in texts]

    def chat(self, messages, add_generation_prompt=True):
        """ChatML, with no default system message (as MemGen's overridden chat template)."""
        start, end = self._specials.get("<|im_start|>"), self._specials.get("<|im_end|>")
        if start is None or end is None:
            raise ValueError(f"{self.folder}: vocabulary has no <|im_start|>/<|im_end|> tokens, cannot render ChatML")
        ids, newline = [], self.encode("\n")
        for k, m in enumerate(messages):
            if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
                raise ValueError(f"chat message #{k} must be a dict with str 'role' and 'content', got {m!r}")
            ids += [start, *self.encode(m["role"] + "\n" + m["content"]), end, *newline]
        if add_generation_prompt:
            ids += [start, *self.encode("assistant\n")]
        return ids

    # -- decoding

    def token_bytes(self, i):
        b = self._id_to_bytes.get(int(i))
        if b is None:
            raise ValueError(f"token id {i} is not in the vocabulary of {self.folder} (size {self.vocab_size})")
        return b

    def decode(self, ids, skip_special=False):
        ids = [int(i) for i in ids]
        if skip_special:
            ids = [i for i in ids if i not in self.special_ids]
        try:
            return self.enc.decode(ids, errors="replace")
        except (KeyError, OverflowError):  # unknown id / negative or huge id
            bad = next(i for i in ids if i not in self._id_to_bytes)
            self.token_bytes(bad)  # raises the clear ValueError


def load_tokenizer(path):
    """HF model folder -> Tokenizer."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise ValueError(f"{path}: not a folder; pass a Hugging-Face model folder with tokenizer.json")
    vocab, merges, added, pattern, nfc, tcfg = _read_folder(path)
    gpath = os.path.join(path, "generation_config.json")
    gcfg = _read_json(gpath) if os.path.isfile(gpath) else {}
    return Tokenizer(path, vocab, merges, added, pattern, nfc, tcfg, gcfg)
