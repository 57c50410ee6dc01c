"""
SmolLM3, the paper's second reasoner family, against transformers' SmolLM3ForCausalLM on tiny random configs: logits,
padding, cache, greedy generation, MemGen's fast paths against the naive references, and its tokenizer layout
(Llama 3's Split regex + ByteLevel without its own regex, no normalizer, ignore_merges, specials after the vocabulary).
SmolLM3 is a Llama decoder whose every fourth layer applies no rotary embedding (`no_rope_layers` in its config).
"""
import json
import os

import pytest
import torch

import lora
import memgen
from model import KVCache, ModelError, generate, load_model, read_config
from reference import naive_forward, naive_generate
from test_tokenizer import HARD, assert_matches_hf, check_bpe_core, hf_chatml_ids, random_strings
from tiny_tokenizer import CHATML_TEMPLATE, CORPUS, VOCAB_SIZE, _byte_to_unicode
from tokenizer import load_tokenizer

# Llama 3's (and SmolLM3's) pre-tokenizer regex: digits in runs of up to three, no prefix space on letters' runs
LLAMA3_SPLIT = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
                r"""\s*[\r\n]+|\s+(?!\S)|\s+""")
SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|im_start|>", "<|im_end|>", "<|reserved_special_token_0|>"]


def build_smollm3_tokenizer(folder):
    """A tiny tokenizer in SmolLM3's layout (written with `tokenizers`); returns its vocabulary size."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, min_frequency=2, show_progress=False,
                                  initial_alphabet=list(_byte_to_unicode().values()))
    tok.train_from_iterator([CORPUS] * 2, trainer=trainer)
    tok.add_special_tokens(SPECIALS)  # after the regular vocabulary, as Llama 3's 128000+
    tok.save(os.path.join(folder, "tokenizer.json"))
    ids = {t: tok.token_to_id(t) for t in SPECIALS}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": None, "eos_token": "<|im_end|>",
              "pad_token": "<|end_of_text|>", "clean_up_tokenization_spaces": False, "model_max_length": 2048,
              "chat_template": CHATML_TEMPLATE,
              "added_tokens_decoder": {str(i): {"content": t, "special": True, "normalized": False, "lstrip": False,
                                                "rstrip": False, "single_word": False} for t, i in ids.items()}}
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=1)
    with open(os.path.join(folder, "generation_config.json"), "w") as f:
        json.dump({"eos_token_id": ids["<|im_end|>"], "pad_token_id": ids["<|end_of_text|>"]}, f)
    return tok.get_vocab_size(with_added_tokens=True)


def build_smollm3_folder(path, tied, seed=0, **over):
    """A random SmolLM3 folder written by transformers (4 layers: the last one is NoPE) + the tiny tokenizer."""
    from transformers import SmolLM3Config, SmolLM3ForCausalLM

    vocab = build_smollm3_tokenizer(path)
    cfg = dict(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=tied, rms_norm_eps=1e-6,
               rope_parameters={"rope_type": "default", "rope_theta": 50000.0}, pad_token_id=None,
               bos_token_id=None, eos_token_id=None)
    cfg.update(over)
    torch.manual_seed(seed)
    hf = SmolLM3ForCausalLM(SmolLM3Config(**cfg))
    with torch.no_grad():  # random everything: unit norms would hide a missing term
        for name, p in hf.named_parameters():
            p.copy_(1 + 0.2 * torch.randn_like(p) if "norm" in name else 0.1 * torch.randn_like(p))
    hf.eval()
    hf.save_pretrained(path)
    return hf


@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    """(folder, transformers model) by tied; the untied one names its NoPE layers explicitly (two of four)."""
    made = {}

    def get(tied):
        if tied not in made:
            path = str(tmp_path_factory.mktemp(f"smollm3-{'tied' if tied else 'untied'}"))
            over = {} if tied else {"no_rope_layers": [1, 0, 1, 0]}
            made[tied] = (path, build_smollm3_folder(path, tied, **over))
        return made[tied]

    return get


def max_diff(a, b):
    return (a.float() - b.float()).abs().max().item()


@pytest.mark.parametrize("tied", [True, False])
def test_config_reads_the_nope_layers(smol, tied):
    path, hf = smol(tied)
    cfg = read_config(path)
    assert cfg.arch == "smollm3" and cfg.tie_word_embeddings == tied
    assert list(cfg.rope_layers) == [bool(f) for f in hf.config.no_rope_layers]
    assert cfg.rope_layers == ((True, True, True, False) if tied else (True, False, True, False))


@pytest.mark.parametrize("tied", [True, False])
def test_logits_match_transformers(smol, tied):
    path, hf = smol(tied)
    model = load_model(path, dtype="float32", device="cpu")
    ids = torch.randint(0, model.cfg.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(ids).logits
        ours, hidden = model(ids)
        assert max_diff(ours, ref) <= 1e-4
        assert max_diff(model.head(hidden), ref) <= 1e-4
        # the NoPE layers matter: rotating every layer gives other logits (so the test above can fail)
        for block in model.model.layers:
            block.self_attn.use_rope = True
        assert max_diff(model(ids)[0], ref) > 1e-2


@pytest.mark.parametrize("tied", [True, False])
def test_left_padded_batch_matches_transformers(smol, tied):
    path, hf = smol(tied)
    model = load_model(path, dtype="float32", device="cpu")
    lens = [30, 17, 5]
    ids = torch.randint(0, model.cfg.vocab_size, (3, 30), generator=torch.Generator().manual_seed(2))
    mask = torch.zeros(3, 30, dtype=torch.bool)
    for b, n in enumerate(lens):
        mask[b, 30 - n:] = True
    with torch.no_grad():
        ours, _ = model(ids, mask=mask)
        for b, n in enumerate(lens):
            assert max_diff(ours[b, 30 - n:], hf(ids[b:b + 1, 30 - n:]).logits[0]) <= 1e-4


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("prealloc", [True, False])
def test_cached_equals_uncached(smol, tied, prealloc):
    path, _ = smol(tied)
    model = load_model(path, dtype="float32", device="cpu")
    ids = torch.randint(0, model.cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(3))
    mask = torch.ones(2, 24, dtype=torch.bool)
    mask[1, :6] = False
    with torch.no_grad():
        full, _ = model(ids, mask=mask)
        cache = KVCache(model.cfg, 2, 24 if prealloc else None)
        got, t = [], 0
        for n in [10, 1, 1, 5, 7]:
            got.append(model(ids[:, t:t + n], mask=mask[:, t:t + n], cache=cache)[0])
            t += n
    assert max_diff(torch.cat(got, 1)[mask], full[mask]) <= 1e-4


@pytest.mark.parametrize("tied", [True, False])
def test_greedy_generate_matches_transformers(smol, tied):
    path, hf = smol(tied)
    model, tok = load_model(path, dtype="float32", device="cpu"), load_tokenizer(path)
    prompts = [tok.chat([{"role": "user", "content": t}]) for t in
               ["What is 2+3?", "Hello there, how are you doing today?", "x"]]
    seqs, texts = generate(model, tok, prompts, max_new_tokens=20)
    for p, s, text in zip(prompts, seqs, texts):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([p]), max_new_tokens=20, do_sample=False, eos_token_id=tok.eos_ids,
                              pad_token_id=tok.pad_id)[0, len(p):].tolist()
        cut = next((i for i, t in enumerate(ref) if t in tok.eos_ids), len(ref))
        assert s == ref[:cut] and text == tok.decode(s)
        assert generate(model, tok, [p], max_new_tokens=20)[0][0] == s  # batch = one by one


def make_memgen(path, k=4, n=3, seed=0):
    model, tok = load_model(path, dtype="float32", device="cpu"), load_tokenizer(path)
    torch.manual_seed(seed)
    mg = memgen.MemGen(model, tok, k=k, n=n).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # random adapters and maps, so every part visibly matters
        for p in lora.parameters(model, "weaver").values():
            p.copy_(0.1 * torch.randn(p.shape, generator=g))
        for p in mg.weaver.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return mg, tok


def test_memgen_decode_equals_naive_reference(smol):
    path, _ = smol(False)
    mg, tok = make_memgen(path)
    mg.is_delim[::3] = True  # a random model rarely says "." greedily: more boundaries, more insertions
    prompts = [tok.chat([{"role": "user", "content": q}]) for q in ["What is 2+3?", "Say: a, b. c", "x"]]
    res = memgen.generate(mg, tok, prompts, max_new_tokens=24)
    assert sum(len(r["insertions"]) for r in res) > len(prompts)
    for p, r in zip(prompts, res):
        with torch.no_grad():
            toks, ins = naive_generate(mg, tok, p, 24)
        assert r["ids"] == toks and r["insertions"] == ins


def test_memgen_training_forward_equals_naive_reference(smol):
    path, _ = smol(True)
    mg, tok = make_memgen(path)
    pairs = [("What is 2+3?", "First, 2 plus 3. So 5.\nDone."), ("Hi", "no delimiters"), ("Count", "1, 2, 3, 4.")]
    prompts = [tok.chat([{"role": "user", "content": q}]) for q, _ in pairs]
    completions = [tok.encode(a) + [tok.eos_ids[0]] for _, a in pairs]
    ids, mask, prompt_len = memgen.right_pad(prompts, completions, tok.pad_id, "cpu")
    points = memgen.insertion_points(mg, ids, mask, prompt_len)
    with torch.no_grad():
        logits = mg.model.head(memgen.teacher_forced(mg, ids, mask, prompt_len, points))
        for b in range(len(pairs)):
            L = int(mask[b].sum())
            pts = [int(p) for p in points[b] if p >= 0]
            ref = mg.model.head(naive_forward(mg, ids[b, :L], int(prompt_len[b]), pts))
            assert max_diff(logits[b, :L], ref) <= 1e-4


def test_tokenizer_matches_hf(tmp_path):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    build_smollm3_tokenizer(str(tmp_path))
    tok = load_tokenizer(str(tmp_path))
    assert tok.pattern == LLAMA3_SPLIT and not tok.nfc  # the folder's own Split regex, no normalizer
    assert assert_matches_hf(str(tmp_path), HARD + random_strings(1000) + ["Numbers 1234567 and 3.14159"]) > 1000
    check_bpe_core(Tokenizer.from_file(str(tmp_path / "tokenizer.json")), tok, 1000)
    msgs = [{"role": "user", "content": "What is 12 + 30?"}, {"role": "assistant", "content": "42, yes."}]
    assert tok.chat(msgs) == hf_chatml_ids(str(tmp_path), msgs)
    got = AutoTokenizer.from_pretrained(str(tmp_path)).apply_chat_template(msgs, tokenize=True,
                                                                         add_generation_prompt=True)
    assert tok.chat(msgs) == list(got["input_ids"] if hasattr(got, "keys") else got)
    assert tok.eos_ids == [tok._specials["<|im_end|>"]] and tok.pad_id == tok._specials["<|end_of_text|>"]


def write_config(path, **over):
    c = dict(architectures=["SmolLM3ForCausalLM"], vocab_size=300, hidden_size=64, intermediate_size=96,
             num_hidden_layers=8, num_attention_heads=4, num_key_value_heads=2, rope_theta=5e6, rms_norm_eps=1e-6,
             max_position_embeddings=256, tie_word_embeddings=True)
    c.update(over)
    c = {k: v for k, v in c.items() if v is not None}
    path.mkdir(exist_ok=True)
    (path / "config.json").write_text(json.dumps(c))
    return str(path)


def test_config_without_the_list_takes_the_interval(tmp_path):
    assert read_config(write_config(tmp_path)).rope_layers == (True, True, True, False) * 2
    assert read_config(write_config(tmp_path, no_rope_layer_interval=2)).rope_layers == (True, False) * 4


@pytest.mark.parametrize("over,match", [({"no_rope_layers": [1, 1, 0]}, "no_rope_layers has 3 entries for 8 layers"),
                                        ({"mlp_bias": True}, "mlp_bias / attention_bias"),
                                        ({"attention_bias": True}, "mlp_bias / attention_bias"),
                                        ({"use_sliding_window": True, "sliding_window": 8}, "use_sliding_window")])
def test_config_refusals_are_one_line(tmp_path, over, match):
    with pytest.raises(ModelError, match=match):
        read_config(write_config(tmp_path, **over))
