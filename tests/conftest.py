"""Shared fixtures: tiny random Qwen2 / Llama folders written by transformers (the parity oracle), and GSM8K served
from 20 + 20 rows in its format built here (tests never need files outside the repository)."""
import hashlib
import json
import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

SMALL_MODEL = os.environ.get("MEMGEN_SMALL_MODEL")  # a real folder from ../shared/tools/get_small_model.py
SHARED_GSM8K = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "gsm8k"  # the full files, if present


# GSM8K's first two training rows (MIT, tests/fixtures/LICENSE-gsm8k; the prompt/target test checks them word for
# word), then made-up rows in the same format: a question, a rationale with <<calculator>> annotations, "#### answer";
# decimals and thousands separators included, as the boundary rules need them
GSM8K_HEAD = [
    {"question": "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
                 "How many clips did Natalia sell altogether in April and May?",
     "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips "
               "altogether in April and May.\n#### 72"},
    {"question": "Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of babysitting. "
                 "How much did she earn?",
     "answer": "Weng earns 12/60 = $<<12/60=0.2>>0.2 per minute.\nWorking 50 minutes, she earned 0.2 x 50 = "
               "$<<0.2*50=10>>10.\n#### 10"},
]


def gsm8k_row(i):
    a, b, price = 3 + 7 * i, 2 + 3 * i, 1.5 + i % 4
    n = (a + b) * 100
    return {"question": f"A shop sells {a} red mugs and {b} blue mugs on day {i + 1}, at ${price} each. Every mug "
                        f"comes in a box of 100 beads. How much money does the shop take, and how many beads "
                        f"does it hand out?",
            "answer": f"The shop sells {a}+{b} = <<{a}+{b}={a + b}>>{a + b} mugs.\nThat takes {a + b} x {price} = "
                      f"$<<{a + b}*{price}={(a + b) * price:g}>>{(a + b) * price:g}.\nIt hands out {a + b} x 100 = "
                      f"<<{a + b}*100={n}>>{n:,} beads, so the shop takes {(a + b) * price:g}.\n"
                      f"#### {(a + b) * price:g}"}


def write_gsm8k(folder):
    """20 train and 20 test rows as GSM8K's two files in folder; {split: (file name, sha256, lines)}."""
    import data.gsm8k

    folder.mkdir(parents=True, exist_ok=True)
    rows = {"train": GSM8K_HEAD + [gsm8k_row(i) for i in range(18)], "test": [gsm8k_row(i) for i in range(18, 38)]}
    files = {}
    for split, (name, _, _) in data.gsm8k.GSM8K_FILES.items():
        raw = "".join(json.dumps(r) + "\n" for r in rows[split]).encode()
        (folder / name).write_bytes(raw)
        files[split] = (name, hashlib.sha256(raw).hexdigest(), raw.count(b"\n"))
    return files


@pytest.fixture
def gsm8k_fixture(monkeypatch, tmp_path):
    """data.gsm8k downloads "GSM8K" from a folder of 20 train and 20 test rows written here (a file:// URL), its
    sha256 pins swapped for those files' own, into a private cache: the whole download path runs."""
    import data.gsm8k

    folder = tmp_path / "gsm8k-fixture"
    files = write_gsm8k(folder)
    monkeypatch.setattr(data.gsm8k, "GSM8K_FILES", files)
    monkeypatch.setenv("MEMGEN_GSM8K_URL", str(folder))
    monkeypatch.setenv("MEMGEN_CACHE", str(tmp_path / "gsm8k-fixture-cache"))
    return folder


def pytest_collection_modifyitems(config, items):
    """Tests marked `shared` read the full GSM8K files from ../shared: opt-in (python -m pytest -m shared), and
    skipped with the reason when those files are absent."""
    if SHARED_GSM8K.joinpath("train.jsonl").is_file():
        return
    skip = pytest.mark.skip(reason=f"the full GSM8K files are not at {SHARED_GSM8K}")
    for item in items:
        if "shared" in item.keywords:
            item.add_marker(skip)


def hf_config(family, vocab_size, tied=False, **over):
    from transformers import LlamaConfig, Qwen2Config

    common = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  tie_word_embeddings=tied, rms_norm_eps=1e-6)
    common.update(over)
    if family == "qwen2":
        return Qwen2Config(rope_theta=10000.0, **common)
    return LlamaConfig(rope_theta=100000.0, head_dim=common["hidden_size"] // common["num_attention_heads"], **common)


def build_model_folder(path, family="qwen2", tied=False, shard=False, seed=0, tokenizer=True, **over):
    """Write a random HF model folder (+ a tiny trained tokenizer) and return the transformers model."""
    from transformers import AutoModelForCausalLM

    vocab = 0
    if tokenizer:
        from tiny_tokenizer import build_tokenizer_files

        vocab = build_tokenizer_files(path, family)
    torch.manual_seed(seed)
    hf = AutoModelForCausalLM.from_config(hf_config(family, over.pop("vocab_size", vocab or 320), tied, **over))
    with torch.no_grad():  # random everything: zero biases or unit norms would hide a missing term
        for name, p in hf.named_parameters():
            p.copy_(1 + 0.2 * torch.randn_like(p) if "norm" in name else 0.1 * torch.randn_like(p))
    hf.eval()
    hf.save_pretrained(path, max_shard_size="100KB" if shard else "10GB")
    return hf


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """A cache of (folder, hf_model) by (family, tied, shard)."""
    made = {}

    def get(family="qwen2", tied=False, shard=False):
        key = (family, tied, shard)
        if key not in made:
            path = str(tmp_path_factory.mktemp(f"{family}-{'tied' if tied else 'untied'}{'-shard' if shard else ''}"))
            made[key] = (path, build_model_folder(path, family, tied, shard))
        return made[key]

    return get


@pytest.fixture(scope="session")
def add_task(tmp_path_factory):
    """20 addition problems with one-token-ish answers: targets are short, so a few dozen steps can fit them."""
    path = tmp_path_factory.mktemp("task") / "add.jsonl"
    path.write_text("".join(json.dumps({"question": f"What is {3 + i} plus {7 + 2 * i}?", "answer": str(10 + 3 * i)})
                            + "\n" for i in range(20)))
    return str(path)


@pytest.fixture(scope="session")
def long_folder(tmp_path_factory):
    """A tiny random Qwen2 folder with room for GSM8K prompts (the `tiny` fixture's models have 256 positions)."""
    path = str(tmp_path_factory.mktemp("tiny-long"))
    build_model_folder(path, max_position_embeddings=1024)
    return path
