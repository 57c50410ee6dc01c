"""
show.py: the numbers on its pages against brute force and the naive references, escaping, well-formed HTML, and an
end-to-end run on a tiny model. Opt-in (-m slow, needs the `chromium` package): the page renders to a non-blank
screenshot in headless Chromium.
"""
import html.parser
import json
import os
import shutil
import subprocess

import pytest
import torch

import lora
import memgen
import show
from reference import naive_forward, naive_weave
from model import load_model
from tokenizer import load_tokenizer

K = 4
VOID = {"meta", "br", "img", "hr", "link", "input", "wbr"}
TAGS = {"html", "head", "meta", "title", "style", "body", "h1", "h2", "h3", "p", "div", "span", "a", "b", "small",
        "table", "thead", "tbody", "tr", "th", "td", "code", "img"}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from threads, and on a busy shared CPU idle-spinning threads make each op ~10x
    slower; the setting is restored for the other test files."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class Checker(html.parser.HTMLParser):
    """Fails on an end tag that does not close the innermost open tag, on a tag left open, and on any tag the pages
    do not use (a `<script>` from the model's text, unescaped, would be one)."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.stack, self.seen = [], set()

    def handle_starttag(self, tag, attrs):
        assert tag in TAGS, f"unexpected <{tag}> at {self.getpos()}"
        self.seen.add(tag)
        if tag not in VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag, attrs):
        assert tag in TAGS and tag in VOID, f"unexpected <{tag}/> at {self.getpos()}"

    def handle_endtag(self, tag):
        assert self.stack and self.stack[-1] == tag, f"</{tag}> closes {self.stack[-1:]} at {self.getpos()}"
        self.stack.pop()

    def check(self, text):
        assert text.startswith("<!DOCTYPE html>")
        self.feed(text)
        self.close()
        assert not self.stack, f"left open: {self.stack}"
        return self


def make(tiny, mode="always", seed=0, more_boundaries=True):
    """A MemGen on the tiny Qwen2 folder with random adapters, queries and heads (every part visibly matters), and
    (more_boundaries) more sentence boundaries than a random model says on its own."""
    path, _ = tiny("qwen2", False)
    model, tok = load_model(path, dtype="float32"), load_tokenizer(path)
    torch.manual_seed(seed)
    mg = memgen.MemGen(model, tok, k=K, n=3, mode=mode).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name in ("weaver", "trigger"):
            for p in lora.parameters(model, name).values():
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
        for p in list(mg.weaver.parameters()) + list(mg.trigger.parameters()):
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    if more_boundaries:
        mg.is_delim[::3] = True
    return mg, tok


def decoded(mg, tok, question="Say: a, b. c", new=30):
    prompt = tok.chat([{"role": "user", "content": question}])
    return prompt, memgen.generate(mg, tok, [prompt], max_new_tokens=new)[0]


def test_nearest_tokens_and_latents_equal_brute_force(tiny):
    mg, tok = make(tiny)
    prompt, res = decoded(mg, tok)
    assert len(res["insertions"]) >= 3
    rec, latents = show.inspect(mg, tok, prompt, res, top=5)
    emb = mg.model.model.embed_tokens.weight[:mg.vocab].double()
    norms = sorted(float(e.norm()) for e in emb)
    ids = torch.tensor(prompt + res["ids"])
    P, cur, start = len(prompt), mg.model.embed(ids)[:0], 0
    for r, lat in zip(rec["insertions"], latents):
        # the latents: the naive weaver re-run from scratch over the prefix with every earlier latent in it
        cur = torch.cat([cur, mg.model.embed(ids[start:P + r["t"]])])
        with torch.no_grad():
            want = naive_weave(mg, cur, r["t"] == 0)
        assert (lat - want).abs().max() <= 1e-4
        cur, start = torch.cat([cur, want]), P + r["t"]
        pairs = [float(a @ b / (a.norm() * b.norm())) for q, a in enumerate(want) for b in want[q + 1:]]
        assert r["spread"] == pytest.approx(sum(pairs) / len(pairs), abs=1e-5)
        for z, x in zip(lat.double(), r["latents"]):
            cos = (emb @ z) / (emb.norm(dim=1) * z.norm())  # every token, float64, fully sorted
            best = sorted(zip(cos.tolist(), range(len(emb))), reverse=True)[:5]
            assert [i for _, i, _ in x["nearest"]] == [v for _, v in best]
            assert all(abs(s - b) <= 1e-5 for (_, _, s), (b, _) in zip(x["nearest"], best))
            assert [lab for lab, _, _ in x["nearest"]] == [show.token_label(tok, v) for _, v in best]
            assert abs(x["norm"] - float(z.norm())) <= 1e-4
            assert x["norm_rank"] == pytest.approx(sum(n < float(z.norm()) for n in norms) / len(norms), abs=1e-6)


def test_with_and_without_equal_two_naive_forwards(tiny):
    mg, tok = make(tiny)
    prompt, res = decoded(mg, tok)
    ins = res["insertions"]
    assert len(ins) >= 3
    ids, mask, plen = memgen.right_pad([prompt], [res["ids"]], tok.pad_id, "cpu")
    P = len(prompt)
    points = torch.tensor([[P + t for t in ins]])
    with torch.no_grad():
        lw, lo = show.with_without(mg, ids, mask, plen, points)
        rec, _ = show.inspect(mg, tok, prompt, res, top=5)
        for j, t in enumerate(ins):
            pts = [P + s for s in ins]
            logp = lambda h: torch.log_softmax(mg.model.head(h[P + t - 1])[:mg.vocab], -1)  # noqa: E731
            want_w = logp(naive_forward(mg, ids[0], P, pts))
            want_o = logp(naive_forward(mg, ids[0], P, pts[:j] + pts[j + 1:]))
            assert (lw[j] - want_w).abs().max() <= 1e-4 and (lo[j] - want_o).abs().max() <= 1e-4
            r = rec["insertions"][j]
            assert r["kl"] == pytest.approx(float((want_w.exp() * (want_w - want_o)).sum()), abs=1e-4)
            assert r["kl"] > 1e-3  # the latents matter, so a swapped pair of rows would show
            top = want_w.topk(5)
            assert [i for _, i, _ in r["with"]] == top.indices.tolist()
            assert [i for _, i, _ in r["without"]] == want_o.topk(5).indices.tolist()
            # greedy decoding sampled the argmax of the distribution "with": teacher-forced = decoded
            assert res["ids"][t] == int(top.indices[0]) and r["next"][1] == res["ids"][t]


def test_learned_trigger_probabilities_at_every_boundary(tiny):
    mg, tok = make(tiny, mode="learned")
    with torch.no_grad():  # a sharper trigger, centred on the p(insert) it gave along a first completion
        mg.trigger.head.weight.mul_(3)
        ps = torch.tensor([p for _, p, _ in decoded(mg, tok, new=40)[1]["decisions"]])
        mg.trigger.head.bias[1] -= (ps / (1 - ps)).log().median() - 0.2
    prompt, res = decoded(mg, tok, new=40)
    rec, _ = show.inspect(mg, tok, prompt, res)
    ids, mask, _ = memgen.right_pad([prompt], [res["ids"]], tok.pad_id, "cpu")
    with torch.no_grad():
        p = memgen.trigger_forward(mg, ids, mask)[0]
    P, comp = len(prompt), res["ids"]
    bounds = {b["t"]: b for b in rec["boundaries"]}
    assert sorted(bounds) == [0] + [t for t in range(1, len(comp)) if bool(mg.is_delim[comp[t - 1]])]
    for t, prob, fired in res["decisions"]:  # asked while decoding: recorded p = one pass over the sequence
        assert abs(prob - float(p[P + t - 1])) <= 1e-4
        assert bounds[t]["decision"] == ("insert" if fired else "skip")
    for t, b in bounds.items():
        assert abs(b["p"] - float(p[P + t - 1])) <= 1e-4
    assert {b["decision"] for b in bounds.values()} == {"insert", "skip", "N reached"}
    # no decision on a knife's edge
    assert all(0.04 < abs(prob - 0.5) for _, prob, _ in res["decisions"]), res["decisions"]


@pytest.mark.parametrize("rule", ["official", "sentence"])
def test_boundaries_follow_the_training_points_under_each_rule(tiny, rule):
    mg, tok = make(tiny, more_boundaries=False)
    mg.boundary = rule
    prompt = tok.chat([{"role": "user", "content": "Sum?"}])
    comp = tok.encode("It is 3.5, or 1,000. So 2. Then 7,\nend") + [tok.eos_ids[0]]
    ids, mask, plen = memgen.right_pad([prompt], [comp], tok.pad_id, "cpu")
    P = len(prompt)
    for n in (2, 9):  # N cuts the points short, or lets every boundary insert
        mg.n = n
        points = memgen.insertion_points(mg, ids, mask, plen)[0]
        ins = [int(p) - P for p in points if p >= 0]
        rec, _ = show.inspect(mg, tok, prompt, {"ids": comp, "text": "", "insertions": ins, "decisions": []})
        got = [b["t"] for b in rec["boundaries"]]
        assert [b["t"] for b in rec["boundaries"] if b["decision"] == "insert"] == ins  # mode always: no skips
        assert {b["decision"] for b in rec["boundaries"]} == ({"insert", "N reached"} if n == 2 else {"insert"})
    in_number = [t for t in range(1, len(comp)) if tok.decode(comp[t - 1:t]).endswith((".", ","))
                 and tok.decode(comp[t - 2:t - 1])[-1:].isdigit() and tok.decode(comp[t:t + 1])[:1].isdigit()]
    assert len(in_number) == 2  # "3.|5" and "1,|000" (the tiny tokenizer splits digits)
    assert set(in_number) <= set(got) if rule == "official" else not set(in_number) & set(got)


HOSTILE = '<script>alert("x")</script></div><b>&amp; "quoted" \'single\' <!-- c --> end.'


@pytest.fixture(scope="module")
def hostile_pages(tiny):
    """A problem page and an index page where the completion, question, answer, id and settings all hold HTML."""
    mg, tok = make(tiny)
    prompt = tok.chat([{"role": "user", "content": "<i>" + HOSTILE}])
    comp = tok.encode(HOSTILE + " More, text. Done.") + [tok.eos_ids[0]]
    ends = [t for t in range(1, len(comp)) if bool(mg.is_delim[comp[t - 1]])]
    res = {"ids": comp, "text": tok.decode(comp[:-1]), "insertions": [0] + ends[:2], "decisions": []}
    rec, _ = show.inspect(mg, tok, prompt, res)
    rec.update(index=0, id=HOSTILE, question=HOSTILE, answer=HOSTILE, page="problem-00000.html",
               command="python show.py " + HOSTILE, correct=False)
    cfg = show.settings.defaults(vars(show))
    cfg["adapter"] = HOSTILE
    about = show.describe(cfg, mg, {"weaver": {"note": HOSTILE}})
    stats = {"percentiles": [1.0] * len(show.PERCENTILES)}
    return show.problem_html(rec, tok, about, stats), show.index_html([rec], about, [(HOSTILE, HOSTILE)])


def test_model_text_is_escaped(hostile_pages):
    for page in hostile_pages:
        assert "<script" not in page and "<!-- c" not in page and "<i>" not in page
        assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;&lt;/div&gt;&lt;b&gt;&amp;amp;" in page
        Checker().check(page)  # a raw </div> or <b> from the text would unbalance the tags


def test_pages_are_well_formed_and_the_checker_can_fail(hostile_pages):
    problem, index = hostile_pages
    assert {"table", "a", "span", "h3"} <= Checker().check(problem).seen
    assert {"table", "a", "img"} <= Checker().check(index).seen
    for bad in ["<!DOCTYPE html><div><span></div></span>", "<!DOCTYPE html><div><p>open</div>",
                "<!DOCTYPE html><p>x</p><script>1</script>", "<!DOCTYPE html><div>"]:
        with pytest.raises(AssertionError):
            Checker().check(bad)


def write_task(path):
    rows = [{"question": "Tom has 3 apples, and buys 2 more. <script>x</script> How many?", "answer": "5"},
            {"question": "What is 2+3?", "answer": "5"},
            {"question": "Say: a, b. c", "answer": "c"}]
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


def test_end_to_end_writes_pages_plots_and_json(long_folder, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    task, out = str(tmp_path / "task.jsonl"), str(tmp_path / "out")
    write_task(task)
    # a saved weaver and trigger (random but nonzero LoRA), so --adapter and --trigger_mode=learned are exercised
    model, tok = load_model(long_folder, dtype="float32"), load_tokenizer(long_folder)
    torch.manual_seed(0)
    mg = memgen.MemGen(model, tok, k=K, n=2)
    with torch.no_grad():
        for name in ("weaver", "trigger"):
            for p in lora.parameters(model, name).values():
                p.normal_(0, 0.1)
        mg.trigger.head.bias.copy_(torch.tensor([0.0, 3.0]))  # mostly inserts
    memgen.save(mg, str(tmp_path / "adapter"))
    show.main([f"--model={long_folder}", f"--adapter={tmp_path / 'adapter'}", "--trigger_mode=learned",
               f"--data={task}", "--index=1", "--limit=2", "--max_new_tokens=16", "--dtype=float32",
               f"--out_dir={out}"])
    files = set(os.listdir(out))
    assert {"problem-00001.html", "problem-00002.html", "index.html", "show.json", "positions.png", "norms.png",
            "pca.png"} <= files and not any(f.endswith(".tmp") for f in files)
    for f in ("positions.png", "norms.png", "pca.png"):
        with open(os.path.join(out, f), "rb") as fh:
            assert fh.read(8) == b"\x89PNG\r\n\x1a\n"
    for f in ("problem-00001.html", "problem-00002.html", "index.html"):
        with open(os.path.join(out, f), encoding="utf-8") as fh:
            Checker().check(fh.read())
    with open(os.path.join(out, "show.json")) as f:
        saved = json.load(f)
    assert [p["index"] for p in saved["problems"]] == [1, 2] and saved["about"]["k"] == K
    assert all(p["insertions"] and p["insertions"][0]["t"] == 0 or p["boundaries"][0]["decision"] == "skip"
               for p in saved["problems"])
    cmd = saved["problems"][1]["command"]
    assert "--index=2" in cmd and "--trigger_mode=learned" in cmd and "--limit" not in cmd
    printed = capsys.readouterr().out
    assert "== problem 1 (task-1)" in printed and "wrote 2 page(s)" in printed
    # the first problem's page without an adapter says its weaver is random; bad settings end in one line
    show.main([f"--model={long_folder}", f"--data={task}", "--max_new_tokens=4", f"--out_dir={out}", "--k=2"])
    with open(os.path.join(out, "problem-00000.html"), encoding="utf-8") as f:
        page = f.read()
    assert "random initialisation" in page and "&lt;script&gt;x&lt;/script&gt;" in page
    for bad in (["--trigger_mode=off"], ["--index=3"], ["--trigger_mode=learned"], [f"--adapter={tmp_path}"]):
        with pytest.raises(SystemExit) as e:
            show.main([f"--model={long_folder}", f"--data={task}", f"--out_dir={out}"] + bad)
        assert e.value.code == 2
    assert capsys.readouterr().err.count("show.py: error:") == 4


def screenshot(chromium, page, shot):
    """(fraction of pixels with ink, distinct colours) of the page rendered by headless Chromium."""
    from PIL import Image

    subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    "--window-size=1000,1400", f"--screenshot={shot}", page.as_uri()],
                   check=True, capture_output=True, timeout=120)
    colors = Image.open(shot).convert("RGB").getcolors(1 << 24)
    total = sum(c for c, _ in colors)
    return sum(c for c, rgb in colors if min(rgb) < 200) / total, len(colors)


@pytest.mark.slow
def test_page_renders_in_headless_chromium(hostile_pages, tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("needs headless Chromium (Debian package `chromium`)")
    pytest.importorskip("PIL.Image")
    blank, page = tmp_path / "blank.html", tmp_path / "page.html"
    blank.write_text("<!DOCTYPE html><html><body></body></html>", encoding="utf-8")
    page.write_text(hostile_pages[0], encoding="utf-8")
    assert screenshot(chromium, blank, tmp_path / "blank.png")[0] < 0.01  # the check can fail
    ink, colors = screenshot(chromium, page, tmp_path / "page.png")
    assert ink > 0.01 and colors > 20, (ink, colors)
