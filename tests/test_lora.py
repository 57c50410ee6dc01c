"""Hand-written LoRA: zero init is the base, switching is exact, save/load round-trips, bad files are clear errors."""
import json

import pytest
import torch

import lora
from conftest import build_model_folder
from model import load_model


def randomize(model, name, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora.parameters(model, name).values():
            p.copy_(0.05 * torch.randn(p.shape, generator=g))


@pytest.fixture
def folder(tiny):
    return tiny("qwen2")[0]


def test_zero_init_equals_base_and_switching_is_exact(folder):
    model = load_model(folder, dtype="float32")
    ids = torch.arange(30)[None] % model.cfg.vocab_size
    with torch.no_grad():
        base = model(ids)[0]
        n = lora.inject(model, ["weaver", "trigger", "sft"])
        assert n == 2 * model.cfg.num_layers  # q_proj and v_proj of every layer
        for name in ("weaver", "trigger", "sft", None):
            with lora.use(model, name):
                assert torch.equal(model(ids)[0], base)  # B = 0: every adapter starts as the base model
        randomize(model, "weaver", 1)
        randomize(model, "trigger", 2)
        with lora.use(model, "weaver"):
            w = model(ids)[0]
        with lora.use(model, "trigger"):
            t = model(ids)[0]
        assert (w - base).abs().max() > 1e-3 and (t - w).abs().max() > 1e-3
        assert torch.equal(model(ids)[0], base)  # back to none: exactly the base again
        with lora.use(model, "weaver"):
            assert torch.equal(model(ids)[0], w)


def test_only_adapters_are_trainable_and_base_is_shared(folder):
    model = load_model(folder, dtype="float32")
    q = model.model.layers[0].self_attn.q_proj.weight
    lora.inject(model, ["weaver", "trigger"])
    assert model.model.layers[0].self_attn.q_proj.weight is q  # taken over, not copied
    trainable = {k for k, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(lora.parameters(model, "weaver")) | set(lora.parameters(model, "trigger"))
    assert "model.layers.0.self_attn.q_proj.lora_A.weaver" in trainable
    # the base checkpoint names are unchanged by injection
    assert "model.layers.0.self_attn.q_proj.weight" in model.state_dict()


def test_formula(folder):
    """y = W x + b + alpha/r * B A x, checked by hand on one layer."""
    model = load_model(folder, dtype="float32")
    lora.inject(model, ["sft"], r=4, alpha=8, dropout=0.0)
    layer = model.model.layers[1].self_attn.v_proj
    randomize(model, "sft")
    x = torch.randn(3, model.cfg.hidden_size)
    ref = x @ layer.weight.T + layer.bias + 2.0 * (x @ layer.lora_A["sft"].T @ layer.lora_B["sft"].T)
    with torch.no_grad(), lora.use(model, "sft"):
        assert torch.allclose(layer(x), ref, atol=1e-6)


def test_save_load_round_trip(folder, tmp_path):
    model = load_model(folder, dtype="float32")
    lora.inject(model, ["sft"])
    randomize(model, "sft", 3)
    ids = torch.arange(20)[None]
    with torch.no_grad(), lora.use(model, "sft"):
        want = model(ids)[0]
    lora.save_adapter(model, "sft", str(tmp_path))
    info = json.loads((tmp_path / "sft.json").read_text())
    assert info["rank"] == 16 and info["alpha"] == 32 and info["targets"] == ["q_proj", "v_proj"]
    fresh = load_model(folder, dtype="float32")
    lora.load_adapter(fresh, "sft", str(tmp_path))  # creates the adapter from the json
    with torch.no_grad(), lora.use(fresh, "sft"):
        assert torch.equal(fresh(ids)[0], want)


def test_load_errors(folder, tmp_path):
    model = load_model(folder, dtype="float32")
    lora.inject(model, ["sft"])
    lora.save_adapter(model, "sft", str(tmp_path))
    with pytest.raises(lora.AdapterError, match="no 'weaver' adapter"):
        lora.load_adapter(model, "weaver", str(tmp_path))
    other = tmp_path / "other"
    build_model_folder(str(other), "qwen2", tokenizer=False, vocab_size=50, hidden_size=32)
    with pytest.raises(lora.AdapterError, match="hidden_size=64.*32"):
        lora.load_adapter(load_model(str(other), dtype="float32"), "sft", str(tmp_path))
    # a file missing tensors
    from safetensors.torch import load_file, save_file

    t = load_file(str(tmp_path / "sft.safetensors"))
    t.pop(next(iter(t)))
    save_file(t, str(tmp_path / "sft.safetensors"))
    with pytest.raises(lora.AdapterError, match="does not fit this model: missing"):
        lora.load_adapter(load_model(folder, dtype="float32"), "sft", str(tmp_path))
    with pytest.raises(lora.AdapterError, match="unknown adapter 'nope'"):
        lora.use(model, "nope")
