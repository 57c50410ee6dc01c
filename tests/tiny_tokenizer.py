"""
Test fixture: write a tiny Hugging-Face tokenizer folder (tokenizer.json, vocab.json, merges.txt,
tokenizer_config.json, generation_config.json) for a model family, trained in well under a second
with the `tokenizers` package (a test-only dependency).

    vocab_size = build_tokenizer_files(folder, "qwen2")   # or "llama" (SmolLM2 layout)
"""

import json
import os

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

FAMILIES = ("qwen2", "llama")
QWEN2_SPLIT = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content']"
    " + '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
VOCAB_SIZE = 800

# Small but varied: prose, contractions, numbers, code, whitespace runs, CJK, emoji, accents, so the
# learned merges cover multi-byte characters and space/newline runs too.
CORPUS = """
The quick brown fox jumps over the lazy dog. She said: "don't stop, we'll be there at 10:30!"
I'M sure they're right; it's what you'd expect. Numbers like 1234567890, 3.14159 and $1,000,000.
Question: Janet has 16 eggs and eats 3 for breakfast. How many are left? Answer: 16 - 3 = 13.
def add(a, b):
    return a + b  # add two numbers

for i in range(10):
    print(i ** 2)

class Memory:
    def __init__(self, size=8):
        self.size = size
\t\ttabs\tand   spaces   mixed   \n\n\n
Le café est très bon. Größe, naïve, résumé, coöperate. Ελληνικά και русский язык.
中文文本测试，你好世界。日本語のテキスト。한국어 텍스트.
Emoji: 😀 🚀 👍🏽 ❤️ — and symbols: © ® ™ € £ ¥ ½ ∑ ∞.
"""


def _byte_to_unicode():
    """GPT-2's byte -> printable unicode map (to name the byte tokens we leave out)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    out, n = {b: chr(b) for b in printable}, 0
    for b in range(256):
        if b not in out:
            out[b] = chr(256 + n)
            n += 1
    return out


def _new_tokenizer(family):
    tok = Tokenizer(models.BPE())
    if family == "qwen2":
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


def build_tokenizer_files(folder, family, *, missing_bytes=()):
    """Write a tiny tokenizer for `family` ("qwen2" or "llama") into `folder`; return its vocab size.

    qwen2: Qwen2 Split regex + ByteLevel(use_regex=False) + NFC; specials AFTER the regular vocab.
    llama: SmolLM2's Digits(individual_digits=True) + ByteLevel(use_regex=True); specials at ids 0,1,2.
    In both, all 256 byte tokens come before the merges and merge results get increasing ids, so
    BPE rank order == id order. missing_bytes: byte values to leave out (to test unencodable text).
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown tokenizer family {family!r}; use one of {FAMILIES}")
    os.makedirs(folder, exist_ok=True)
    b2u = _byte_to_unicode()
    alphabet = [b2u[b] for b in range(256) if b not in set(missing_bytes)]
    tok = _new_tokenizer(family)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE, min_frequency=2, show_progress=False, initial_alphabet=alphabet,
        # llama: specials are trained in first (ids 0,1,2); qwen2: appended after training
        special_tokens=SPECIALS if family == "llama" else [],
    )
    tok.train_from_iterator([CORPUS] * 2, trainer=trainer)
    if family == "qwen2":
        tok.add_special_tokens(SPECIALS)
    tok.save(os.path.join(folder, "tokenizer.json"))

    # slow-tokenizer files (vocab.json + merges.txt), read back from what we just saved
    with open(os.path.join(folder, "tokenizer.json"), encoding="utf-8") as f:
        saved = json.load(f)
    vocab, merges = saved["model"]["vocab"], saved["model"]["merges"]
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
        f.write("".join((" ".join(m) if isinstance(m, list) else m) + "\n" for m in merges))

    ids = {t: tok.token_to_id(t) for t in SPECIALS}
    config = {
        "tokenizer_class": "Qwen2Tokenizer" if family == "qwen2" else "PreTrainedTokenizerFast",
        "added_tokens_decoder": {str(i): {"content": t, "special": True, "normalized": False, "lstrip": False,
                                          "rstrip": False, "single_word": False} for t, i in ids.items()},
        "bos_token": None if family == "qwen2" else "<|im_start|>",
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>" if family == "qwen2" else "<|im_end|>",
        "clean_up_tokenization_spaces": False,
        "model_max_length": 2048,
        "chat_template": CHATML_TEMPLATE,
    }
    with open(os.path.join(folder, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
    # Qwen2.5-Instruct lists two eos ids; SmolLM2 one int
    eos = [ids["<|im_end|>"], ids["<|endoftext|>"]] if family == "qwen2" else ids["<|im_end|>"]
    with open(os.path.join(folder, "generation_config.json"), "w", encoding="utf-8") as f:
        json.dump({"bos_token_id": ids["<|endoftext|>"] if family == "qwen2" else ids["<|im_start|>"],
                   "eos_token_id": eos, "pad_token_id": ids["<|endoftext|>"] if family == "qwen2" else ids["<|im_end|>"]},
                  f, indent=2)
    return tok.get_vocab_size(with_added_tokens=True)
