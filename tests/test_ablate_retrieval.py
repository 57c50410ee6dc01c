"""ablate.py's retrieval variants (issue 24 item 5): memgen-fused gives the retrieved training examples to the weaver
only, memorybank puts them in the reasoner's prompt; both retrieve from one MemoryBank of the training split."""
import json
import os

import pytest

import ablate
import memgen
import memory


def lines(out):
    with open(os.path.join(out, "results.jsonl")) as f:
        return [json.loads(x) for x in f if x.strip()]


def attached(tmp_path, name, cfg=None):
    """The quick setup's evaluation sets and first training examples as the variant sees them, and the memory."""
    cfg = {**dict(data="gsm8k", model="", dtype="auto", progress=False, seed=0, memory_top_k=2, memory_budget=200,
                  max_len=256, val_size=4, ood_size=4, batch_size=2, memory_limit=0), **(cfg or {})}
    model, tok, task, ood = ablate.quick_setup()()
    train, sets = ablate.examples(cfg, task, ood, tok)
    mem = ablate.retrieval_memory(cfg, str(tmp_path), task, model, tok)
    rows = [(task, task.load("train") + task.load("val")), (ood, ood.load("test"))]
    attach = ablate.with_retrieval(ablate.variant(name), cfg, mem, tok, rows)
    return tok, task, ood, train, sets, mem, attach


@pytest.mark.parametrize("name", ["memgen-fused", "memorybank"])
def test_retrieved_examples_go_to_the_weaver_or_the_prompt_never_both(tmp_path, name):
    tok, task, ood, train, sets, mem, attach = attached(tmp_path, name)
    assert len(mem.store.items) == len(task.load("train"))  # every training problem is remembered, gold solution
    for e, t in [(x, task) for x in sets["in"] + train[:3]] + [(x, ood) for x in sets["ood"]]:
        a = attach(e, t)
        assert a["completion"] == e["completion"]  # every variant scores the same tokens
        assert str(e["id"]) not in mem.last_refs  # a problem never retrieves itself
        items = {it["id"]: it for it in mem.store.items}
        text = memory.render([memory.Piece("example", memory.example_text(items[i]), i) for i in mem.last_refs])
        assert mem.last_refs and text
        if name == "memgen-fused":  # the weaver reads the text; the reasoner's prompt is untouched
            assert a["prompt"] == e["prompt"] and tok.decode(a["context"]) == text
        else:  # the reasoner reads it in front of the user message; nothing for a weaver
            assert "context" not in a and text in tok.decode(a["prompt"]) and text not in tok.decode(e["prompt"])
            row = next(r for r in t.load("val" if t is task and e in sets["in"] else "train" if t is task else "test")
                       if r["id"] == e["id"])
            tail = e["prompt"][len(tok.chat(t.messages(row))):]  # a code prompt's opened block and signature
            assert a["prompt"][len(a["prompt"]) - len(tail):] == tail and (t is task) == (tail == [])


def test_quick_grid_with_retrieval_variants_runs_resumes_and_the_retrieval_matters(tmp_path, capsys):
    out = str(tmp_path / "grid")
    args = ["--quick=true", f"--out_dir={out}", "--progress=false", "--plots=false",
            "--only=vanilla,memorybank,memgen,memgen-fused"]
    ablate.main(args)
    rows = lines(out)
    first = {r["variant"]: r for r in rows if r["step"] == 0}
    final = {r["variant"]: r for r in rows if r["final"]}
    assert list(final) == ["vanilla", "memorybank", "memgen", "memgen-fused"]
    # same seed, same initial weaver: at step 0 memgen and memgen-fused differ only by what the weaver read
    assert first["memgen-fused"]["trainable"] == first["memgen"]["trainable"]
    assert first["memgen-fused"]["in_nll"] != first["memgen"]["in_nll"]
    assert first["memgen-fused"]["ood_nll"] != first["memgen"]["ood_nll"]
    assert final["memorybank"]["in_nll"] != final["vanilla"]["in_nll"]  # the prompt holds the examples
    assert final["memorybank"]["trainable"] == 0 and final["memgen-fused"]["in_nll"] != first["memgen-fused"]["in_nll"]
    assert sorted(os.listdir(os.path.join(out, "adapters"))) == ["memgen", "memgen-fused"]
    assert json.load(open(os.path.join(out, "memorybank", "meta.json")))["complete"]
    capsys.readouterr()
    ablate.main(args)  # all finished: nothing is redone
    assert lines(out) == rows and capsys.readouterr().err.count("finished earlier, skipped") == 4


def test_retrieval_variants_refuse_pass_limit(tmp_path, capsys):
    with pytest.raises(SystemExit):
        ablate.main(["--quick=true", f"--out_dir={tmp_path}", "--only=memgen-fused", "--pass_limit=2"])
    err = capsys.readouterr().err
    assert "--pass_limit" in err and "memgen-fused" in err and len(err.strip().splitlines()) == 1


def test_the_fused_variant_feeds_the_context_to_teacher_forced(tmp_path, monkeypatch):
    tok, task, ood, train, sets, mem, attach = attached(tmp_path, "memgen-fused")
    seen = []
    real = memgen.teacher_forced
    monkeypatch.setattr(memgen, "teacher_forced", lambda *a: seen.append(a[5]) or real(*a))
    model, tok, task, ood = ablate.quick_setup()()
    v = ablate.variant("memgen-fused")
    policy, _ = ablate.build(v, model, tok, 0)
    examples = [attach(e, task) for e in sets["in"][:2]]
    ablate.nll(policy, v, model, examples, tok.pad_id, tok.vocab_size, None)
    ablate.nll(policy, ablate.variant("memgen"), model, examples, tok.pad_id, tok.vocab_size, None)
    assert seen == [[e["context"] for e in examples], None]


def test_memory_limit_builds_the_bank_from_the_first_training_problems_only(tmp_path):
    _, task, _, _, _, mem, _ = attached(tmp_path, "memorybank", dict(memory_limit=3))
    assert [it["id"] for it in mem.store.items] == [str(r["id"]) for r in task.load("train")[:3]]
    assert mem.store.emb.shape[0] == 3
    _, _, _, _, _, whole, _ = attached(tmp_path / "all", "memorybank")
    assert len(whole.store.items) == len(task.load("train")) > 3
