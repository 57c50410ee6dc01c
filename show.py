"""
show.py: look inside MemGen - one page per problem showing where the latent memories went in, what they resemble and
what they changed.

    python show.py --model FOLDER --adapter out/sft-gsm8k-X/final           # the first GSM8K test problem
    python show.py --model FOLDER --adapter A --index 10 --limit 20         # 20 problems, and plots across them

Each problem is decoded as eval.py decodes it (memgen.generate); the completion is then replayed teacher-forced
(memgen.teacher_forced, which the tests prove equal to decoding) to read out, for every insertion:
  - its K latents: their nearest vocabulary tokens by cosine similarity to the input embedding matrix, and their
    norms beside the distribution of the token embeddings' norms;
  - its effect: the reasoner's next-token distribution with and without that insertion's latents, and
    KL(with || without);
and at every sentence boundary the trigger's p(insert) and decision. Written to OUT_DIR (files: temp + rename):
    problem-<index>.html   one self-contained page per problem (plain HTML and CSS, opens offline)
    index.html             the problems, the settings and the plots
    positions.png, norms.png, pca.png   across the problems (matplotlib, a dev dependency: skipped without it)
    show.json              every number on the pages
and a compact rendering is printed on the terminal. Without --adapter the weaver is MemGen's random
initialisation (every page says so): that shows the machinery, not what a trained weaver learned.
"""
import html
import json
import os
import shlex
import subprocess
import sys

import torch
import torch.nn.functional as F

import errors
import loading
import memgen
import official
import settings
from files import pyplot, save_figure, write_atomic

# -----------------------------------------------------------------------------
MODEL = ""  # a local Hugging Face model folder or a hub id org/name (required)
ADAPTER = ""  # folder with weaver.safetensors/.json (memgen.save); "" = a randomly initialised weaver
TRIGGER_MODE = "always"  # always | learned (needs trigger.safetensors in ADAPTER) | random
DATA = "gsm8k"  # "gsm8k" or a .jsonl with "question" and "answer" fields
SPLIT = "test"  # train | val | test
INDEX = 0  # the first problem shown (its row number in the split)
LIMIT = 1  # how many problems, from INDEX on
MAX_NEW_TOKENS = 256  # completion tokens at most
TEMPERATURE = 0.0  # 0 = greedy
SEED = 0  # sampling and the random trigger (problem i decodes with SEED + i), and the random weaver
K = 8  # latents per insertion when there is no ADAPTER (an adapter brings its own K and N)
N = 3  # at most N inference insertions per completion, when there is no ADAPTER
BOUNDARY = "official"  # without ADAPTER: official (after every "," "." "\n") | sentence (not inside numbers)
LATENT_INIT = "paper"  # the random weaver's latent scale, without ADAPTER: paper | embedding (memgen.LATENT_INITS)
TOP_TOKENS = 5  # nearest tokens per latent, and tokens shown per next-token distribution
DTYPE = "auto"  # auto | float32 | bfloat16 | float16
DEVICE = "auto"  # auto | cpu | cuda | cuda:N
OUT_DIR = ""  # "" -> out/show/<data>-<split>-<model folder name>
ALLOW_OTHER_BASE = False  # load an adapter trained on another base model
# -----------------------------------------------------------------------------
MODES = ("always", "learned", "random")
PERCENTILES = (0, 5, 25, 50, 75, 95, 100)  # of the token-embedding norms, shown beside each latent's norm
_DIAMOND, _HOLLOW, _DOT = "\u25c6", "\u25c7", "\u00b7"  # page markers: insertion, skipped, no insertions left
_VISIBLE = str.maketrans({" ": "\u2423", "\n": "\u21b5", "\t": "\u21e5", "\r": "\u240d"})  # whitespace made visible


class ShowError(loading.LoadError):
    """A bad input; the message says what to do."""


# -----------------------------------------------------------------------------
# 1. What the latents are: nearest tokens and norms


def token_label(tok, i):
    """A token's text with its whitespace made visible (a leading space is ␣, a newline ↵)."""
    try:
        text = tok.token_bytes(i).decode("utf-8", "backslashreplace")
    except ValueError:
        return f"[id {i}]"
    return text.translate(_VISIBLE) or "[empty]"


def nearest_tokens(latents, emb, top):
    """Latents (L, D) and the input embedding matrix (V, D) -> (scores, ids), each (L, top): the tokens with the
    highest cosine similarity to each latent."""
    sim = F.normalize(latents.float(), dim=-1) @ F.normalize(emb.float(), dim=-1).T
    return sim.topk(min(top, emb.shape[0]), dim=-1)


def mean_pairwise_cosine(latents):
    """Mean cosine similarity between the K latents of one insertion (1 = all point the same way)."""
    k = len(latents)
    if k < 2:
        return 1.0
    c = F.normalize(latents.float(), dim=-1)
    return float(((c @ c.T).sum() - k) / (k * (k - 1)))


def norm_table(emb):
    """The token embeddings' norms, sorted (the distribution each latent's norm is placed in)."""
    return emb.float().norm(dim=-1).sort().values


def norm_rank(sorted_norms, x):
    """Fraction of tokens whose embedding norm is below x."""
    return torch.searchsorted(sorted_norms, x.float().contiguous()).float() / len(sorted_norms)


# -----------------------------------------------------------------------------
# 2. What the latents do: the next-token distribution with and without them


def with_without(mg, ids, mask, prompt_len, points):
    """
    One row (ids, mask (1, T), prompt_len (1,), points (1, J) as memgen.teacher_forced takes them) -> the reasoner's
    next-token log-probs at each insertion point j (the distribution of the token that follows the latents), with
    every insertion (J, V) and with insertion j alone left out (J, V). One teacher_forced call over J + 1 copies of
    the row: copy 0 keeps every point, copy 1 + j drops point j (later insertions cannot change the state before
    point j, so dropping only j is "without that insertion's latents").
    """
    J = points.shape[1]
    if J == 0:
        return torch.zeros(0, mg.vocab), torch.zeros(0, mg.vocab)
    keep = ~torch.eye(J, dtype=torch.bool, device=points.device)
    rows = [points[0]] + [torch.cat([points[0][keep[j]], points.new_full((1,), -1)]) for j in range(J)]
    h = memgen.teacher_forced(mg, ids.expand(J + 1, -1), mask.expand(J + 1, -1), prompt_len.expand(J + 1),
                              torch.stack(rows))
    at = points[0] - 1  # the state right before the token at the point predicts it
    logp = lambda x: torch.log_softmax(mg.model.head(x)[..., :mg.vocab].float(), -1).cpu()  # noqa: E731
    return logp(h[0, at]), logp(h[1 + torch.arange(J), at])


def kl(logp, logq):
    """KL(p || q) of log-prob rows, in nats."""
    return (logp.exp() * (logp - logq)).sum(-1)


def top_list(tok, logp, top):
    values, ids = logp.topk(top)
    return [[token_label(tok, i), int(i), float(v.exp())] for v, i in zip(values, ids)]


# -----------------------------------------------------------------------------
# 3. One problem: decode, replay, collect every number on its page


def boundaries(mg, ids, mask, prompt_len, insertions, decisions, trig_p):
    """The points where the trigger could be asked, for one row (ids, mask (1, T), prompt_len (1,)): the end of the
    prompt (t = 0) and every sentence boundary of the completion - memgen.insertion_points with no cap on their
    number, so the rule (mg.boundary) is memgen's own. Each with the decision taken there: "insert", "skip" (the
    trigger said no) or "N reached" (no insertions left), and the learned trigger's p(insert) (recorded while
    decoding where it was asked, else read from one trigger pass over the whole sequence)."""
    asked = {t: p for t, p, _ in decisions}
    P = int(prompt_len[0])
    points = memgen.insertion_points(mg, ids, mask, prompt_len, n=ids.shape[1])[0]
    out, used = [], 0
    for t in [int(p) - P for p in points if p >= 0]:
        candidate = t == 0 or used < mg.n
        inserted = t in insertions
        if inserted and not candidate:
            raise ShowError(f"insertion at token {t} after {mg.n} inference insertions: the record does not fit N")
        decision = "insert" if inserted else "skip" if candidate else "N reached"
        p = asked.get(t, None if trig_p is None else float(trig_p[P + t - 1]))
        out.append({"t": t, "decision": decision, "p": p})
        used += inserted and t > 0
    stray = sorted(set(insertions) - {b["t"] for b in out})
    if stray:
        raise ShowError(f"insertions at tokens {stray} follow no sentence boundary: the record does not fit this "
                        "model or boundary rule")
    return out


@torch.no_grad()
def inspect(mg, tok, prompt, result, top=TOP_TOKENS, emb_norms=None):
    """
    Every number on one problem's page. prompt: ids; result: a row of memgen.generate (ids, insertions, decisions).
    Returns (record, latents): the record is plain data (show.json); latents is a list over insertions of (K, D)
    float tensors, recomputed teacher-forced.
    """
    model, dev = mg.model, mg.model.device
    emb = model.model.embed_tokens.weight[:mg.vocab]
    emb_norms = norm_table(emb) if emb_norms is None else emb_norms
    comp, ins = list(result["ids"]), list(result["insertions"])
    P = len(prompt)
    ids, mask, plen = memgen.right_pad([prompt], [comp], tok.pad_id, dev)
    points = torch.tensor([[P + t for t in ins]], dtype=torch.long, device=dev)
    latents = [lat[0].float() for lat in memgen.weaver_rounds(mg, model.embed(ids), points, plen)]
    lw, lo = with_without(mg, ids, mask, plen, points)
    trig_p = memgen.trigger_forward(mg, ids, mask)[0].float().cpu() if mg.mode == "learned" else None
    records = []
    for j, (t, lat) in enumerate(zip(ins, latents)):
        scores, near = nearest_tokens(lat, emb, top)
        norms = lat.norm(dim=-1)
        chosen = comp[t]
        records.append({
            "j": j, "t": t, "after": tok.decode(comp[max(0, t - 8):t]).translate(_VISIBLE) if t else "",
            "spread": mean_pairwise_cosine(lat),
            "latents": [{"norm": float(n), "norm_rank": float(r),
                         "nearest": [[token_label(tok, i), int(i), float(s)] for s, i in zip(sc, ni)]}
                        for n, r, sc, ni in zip(norms, norm_rank(emb_norms, norms), scores, near)],
            "with": top_list(tok, lw[j], top), "without": top_list(tok, lo[j], top), "kl": float(kl(lw[j], lo[j])),
            "next": [token_label(tok, chosen), chosen, float(lw[j, chosen].exp()), float(lo[j, chosen].exp())],
        })
    record = {"ids": comp, "text": result["text"], "insertions": records,
              "boundaries": boundaries(mg, ids, mask, plen, ins, result.get("decisions", []), trig_p)}
    return record, latents


# -----------------------------------------------------------------------------
# 4. The terminal rendering


def terminal(rec, tok):
    """A compact text rendering: the completion with ⟦#j⟧ at each insertion and ⟨skip⟩ / ⟨p=..⟩ at the other
    boundaries, then one line per insertion with its effect and each latent's nearest token."""
    marks = {}
    for b in rec["boundaries"]:
        p = "" if b["p"] is None else f" p={b['p']:.2f}"
        if b["decision"] == "skip" or (b["decision"] == "N reached" and p):  # a bare "N reached" is noise here
            marks[b["t"]] = f"\u27e8{'skip' if b['decision'] == 'skip' else 'N'}{p}\u27e9"
    for r in rec["insertions"]:
        p = next((b["p"] for b in rec["boundaries"] if b["t"] == r["t"]), None)
        marks[r["t"]] = f"\u27e6#{r['j']}{'' if p is None else f' p={p:.2f}'}\u27e7"
    ids, text, prev = rec["ids"], [], 0
    for t in sorted(marks):
        text += [tok.decode(ids[prev:t]), marks[t]]
        prev = t
    text.append(tok.decode([i for i in ids[prev:] if i not in tok.eos_ids]))
    lines = [f"== problem {rec['index']} ({rec['id']}): {len(ids)} tokens, {len(rec['insertions'])} insertions"
             + ("" if rec.get("correct") is None else f", {'correct' if rec['correct'] else 'wrong'}"), "".join(text)]
    for r in rec["insertions"]:
        fmt = lambda xs: " ".join(f"'{lab}':{p:.2f}" for lab, _, p in xs[:3])  # noqa: E731
        norms = [x["norm"] for x in r["latents"]]
        lines.append(f"  #{r['j']} t={r['t']}: KL={r['kl']:.3f}  with {fmt(r['with'])}  without {fmt(r['without'])}"
                     f"  |z| {min(norms):.2f}-{max(norms):.2f}")
        lines.append("      nearest: " + " ".join(f"'{x['nearest'][0][0]}':{x['nearest'][0][2]:.2f}"
                                                  for x in r["latents"]))
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# 5. The page: plain HTML and CSS. Everything the model, the tokenizer or the data wrote goes through esc().

_CSS = """
body{font:15px/1.5 system-ui,sans-serif;max-width:1150px;margin:1.5em auto;padding:0 1em;color:#222}
h1{font-size:1.4em}h2{font-size:1.15em;margin-top:1.6em;border-bottom:1px solid #ddd}h3{font-size:1em}
.note{background:#fff4d6;border:1px solid #e8c766;padding:.4em .7em}
.box{white-space:pre-wrap;font:13px/1.75 ui-monospace,Menlo,Consolas,monospace;background:#fafafa;
 border:1px solid #ddd;padding:.8em}
.a{background:#eef3fb}.b{background:#f7f7f7}.eos{color:#999}
.m{font:bold 11px system-ui,sans-serif;border-radius:3px;padding:0 .3em;margin:0 .1em;text-decoration:none}
.insert{background:#c0392b;color:#fff}.skip{background:#ddd;color:#333}.cap{color:#aaa;font-weight:normal}
table{border-collapse:collapse;margin:.4em 0}td,th{border:1px solid #ddd;padding:.15em .5em;text-align:left;
 vertical-align:top}th{background:#f3f3f3}td.n{text-align:right;font-variant-numeric:tabular-nums}
code,.tok{font-family:ui-monospace,Menlo,Consolas,monospace}.tok{background:#f0f0f0;padding:0 .2em}
.bar{display:inline-block;position:relative;width:90px;height:8px;background:#e4e4e4;margin-left:.4em}
.tick{position:absolute;top:-3px;width:3px;height:14px;background:#c0392b}
.two{display:flex;gap:2em;flex-wrap:wrap}small{color:#666}
"""


def prob(p):
    return f"{p:.3f}" if p >= 0.001 or p == 0 else f"{p:.1e}"


def esc(x):
    return html.escape(str(x), quote=True)


def tok_span(label, score=None):
    s = f'<span class="tok">{esc(label)}</span>'
    return s if score is None else f"{s} <small>{score:.2f}</small>"


def table(head, rows, numeric=()):
    """rows: lists of cells that are already HTML."""
    th = "".join(f"<th>{esc(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f'<td class="n">{c}</td>' if i in numeric else f"<td>{c}</td>"
                                    for i, c in enumerate(r)) + "</tr>" for r in rows)
    return f"<table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"


def page(title, body):
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>'
            f"<style>{_CSS}</style></head><body>{body}</body></html>\n")


def completion_html(rec, tok):
    """The completion, with a marker at every boundary at its exact token position. Tokens are shaded alternately
    (a run of tokens shares a shade where only together they form whole UTF-8 characters); hover shows positions."""
    marks = {}
    what = {"insert": "latents inserted", "skip": "the trigger skipped", "N reached": "no insertions left"}
    ins = {r["t"]: r["j"] for r in rec["insertions"]}
    for b in rec["boundaries"]:
        t, p = b["t"], "" if b["p"] is None else f" p={b['p']:.2f}"
        title = esc(f"before token {t}: {what[b['decision']]}{p}")
        if t in ins:
            marks[t] = f'<a class="m insert" href="#ins-{ins[t]}" title="{title}">{_DIAMOND}{ins[t]}{esc(p)}</a>'
        elif b["decision"] == "skip":
            marks[t] = f'<span class="m skip" title="{title}">{_HOLLOW}{esc(p)}</span>'
        else:
            marks[t] = f'<span class="m cap" title="{title}">{_DOT}{esc(p)}</span>'
    out, run, shade = [], [], 0
    eos = set(tok.eos_ids)

    def flush():
        nonlocal run, shade
        if run:
            ids = [i for _, i in run]
            cls, text = ("eos", "[eos]") if ids[-1] in eos else ("ab"[shade], tok.decode(ids))
            where = f"token {run[0][0]}" if len(run) == 1 else f"tokens {run[0][0]}-{run[-1][0]}"
            out.append(f'<span class="{cls}" title="{esc(where)}, id {esc(" ".join(map(str, ids)))}">{esc(text)}'
                       "</span>")
            shade, run = 1 - shade, []

    for t, i in enumerate(rec["ids"]):
        if t in marks or i in eos:
            flush()
            out.append(marks.get(t, ""))
        run.append((t, i))
        try:
            b"".join(tok.token_bytes(x) for _, x in run).decode("utf-8")
            flush()
        except (UnicodeDecodeError, ValueError):
            if i in eos:
                flush()
    flush()
    return f'<div class="box">{"".join(out)}</div>'


def insertion_html(r, stats):
    median = stats["percentiles"][PERCENTILES.index(50)]
    lat_rows = []
    for q, x in enumerate(r["latents"]):
        tick = f'<span class="tick" style="left:{100 * min(x["norm_rank"], 0.97):.0f}%"></span>'
        lat_rows.append([str(q), f"{x['norm']:.3f}", f"{x['norm'] / median:.2f}",
                         f'{100 * x["norm_rank"]:.0f} %<span class="bar">{tick}</span>',
                         " ".join(tok_span(lab, s) for lab, _, s in x["nearest"])])
    dist = lambda xs: table(["token", "p"], [[tok_span(lab), prob(p)] for lab, _, p in xs], (1,))  # noqa: E731
    lab, _, pw, po = r["next"]
    where = (f"before completion token {r['t']}, after {tok_span(r['after'])}" if r["t"] else
             "at the end of the prompt")
    top = len(r["latents"][0]["nearest"]) if r["latents"] else 0
    return (f'<h3 id="ins-{r["j"]}">{_DIAMOND}{r["j"]} {where}</h3>'
            + table(["latent", "norm", "\u00d7 median token norm", "token norms below it",
                     f"nearest tokens (cosine similarity, top {top})"], lat_rows, (1, 2))
            + f"<p>Effect on the next token: KL(with \u2016 without) = <b>{r['kl']:.4f}</b> nats. The token that came "
              f"next, {tok_span(lab)}, has p = {prob(pw)} with the latents and {prob(po)} without. The "
              f"{len(r['latents'])} latents' mean pairwise cosine similarity is {r['spread']:.2f}.</p>"
            + f'<div class="two"><div><b>with</b>{dist(r["with"])}</div><div><b>without</b>{dist(r["without"])}'
              "</div></div>")


def glance_html(rec):
    """One row per insertion: where, how large, most similar token, effect."""
    rows = []
    for r in rec["insertions"]:
        norms = [x["norm"] for x in r["latents"]]
        best = max((x["nearest"][0] for x in r["latents"]), key=lambda n: n[2])
        rows.append([f'<a href="#ins-{r["j"]}">{_DIAMOND}{r["j"]}</a>', str(r["t"]),
                     tok_span(r["after"]) if r["t"] else "end of the prompt",
                     f"{sum(norms) / len(norms):.3f}", f"{r['spread']:.2f}", tok_span(best[0], best[2]),
                     f"{r['kl']:.4f}", f"{tok_span(r['next'][0])} {prob(r['next'][2])} / {prob(r['next'][3])}"])
    head = ["insertion", "before token", "after", "mean latent norm", "latents' mean cosine", "most similar token",
            "KL(with \u2016 without)", "next token: p with / without"]
    return table(head, rows, (1, 3, 4, 6))


def problem_html(rec, tok, about, stats):
    trained = about["adapter"] != ""
    note = "" if trained else ('<p class="note">No --adapter: the weaver is MemGen\'s <b>random initialisation</b> '
                               f"(seed {esc(about['settings']['seed'])}). What follows shows the machinery, not what "
                               "a trained weaver learned.</p>")
    mode = about["settings"]["trigger_mode"]
    legend = ('<p><small><span class="m insert">\u25c6j</span> latents inserted (insertion j; click for details), '
              '<span class="m skip">\u25c7</span> the trigger skipped, <span class="m cap">\u00b7</span> a boundary '
              f"after the N = {about['n']} insertions were used. Trigger mode <b>{esc(mode)}</b>"
              + (": p = the learned trigger's p(insert)" if mode == "learned" else
                 ": every allowed boundary inserts" if mode == "always" else ": each allowed boundary inserts with "
                 "p = 0.5") + ". Hover a token for its position and id.</small></p>")
    verdict = "" if rec.get("correct") is None else f" \u2014 {'correct' if rec['correct'] else 'wrong'}"
    body = [f"<h1>MemGen, problem {esc(rec['index'])} <small>({esc(rec['id'])})</small></h1>", note,
            "<h2>Prompt</h2>", f'<div class="box">{esc(rec["question"])}</div>',
            f"<p>Reference answer: <b>{esc(rec.get('answer', ''))}</b>{esc(verdict)}</p>",
            f"<h2>Completion <small>({len(rec['ids'])} tokens, {len(rec['insertions'])} insertions)</small></h2>",
            legend, completion_html(rec, tok),
            "<h2>Insertions</h2>", glance_html(rec) if rec["insertions"] else "",
            "<p>Below, for each insertion: each latent's nearest vocabulary tokens by cosine similarity to the input "
            "embedding matrix, and its norm placed in the distribution of the token embeddings' norms, whose "
            "percentiles are:</p>",
            table([f"p{q}" for q in PERCENTILES], [[f"{v:.3f}" for v in stats["percentiles"]]],
                  range(len(PERCENTILES))),
            "<p><small>Latents are recomputed teacher-forced over the completion (memgen.weaver_rounds); the "
            "distributions come from memgen.teacher_forced with every insertion and with that one left out.</small>"
            "</p>"]
    body += [insertion_html(r, stats) for r in rec["insertions"]] or ["<p>No insertions.</p>"]
    body += ["<h2>Reproduce</h2>", f"<p><code>{esc(rec['command'])}</code></p>", settings_html(about)]
    return page(f"MemGen problem {rec['index']}", "".join(body))


def settings_html(about):
    rows = [[esc(k), f"<code>{esc(v)}</code>"] for k, v in about["settings"].items()]
    rows += [[esc(k), f"<code>{esc(about[k])}</code>"] for k in ("model_name", "k", "n", "rules", "adapter_info",
                                                                  "dtype", "device", "torch", "commit")
             if k in about]
    return table(["setting", "value"], rows)


def index_html(records, about, plots):
    rows = [[f'<a href="{esc(r["page"])}">{esc(r["index"])}</a>', esc(r["id"]), str(len(r["ids"])),
             str(len(r["insertions"])),
             f"{max([x['kl'] for x in r['insertions']], default=0):.3f}",
             esc("" if r.get("correct") is None else "yes" if r["correct"] else "no")] for r in records]
    body = [f"<h1>MemGen: {len(records)} problems</h1>",
            "" if about["adapter"] else '<p class="note">No --adapter: a randomly initialised weaver.</p>',
            table(["problem", "id", "tokens", "insertions", "max KL", "correct"], rows, (2, 3, 4))]
    for name, caption in plots:
        body.append(f'<h2>{esc(caption)}</h2><p><img src="{esc(name)}" alt="{esc(caption)}" width="640"></p>')
    body += ["<h2>Settings</h2>", settings_html(about)]
    return page("MemGen: look inside", "".join(body))


# -----------------------------------------------------------------------------
# 6. Plots across the problems (matplotlib is imported here only: a dev dependency)


def pca2(x):
    """(M, D) -> (M, 2) projection onto the top two principal components, their explained variance fractions, and
    the (mean, components) to project other points."""
    import numpy as np

    mean = x.mean(0)
    _, s, vt = np.linalg.svd(x - mean, full_matrices=False)
    var = s ** 2 / max((s ** 2).sum(), 1e-30)
    comps = vt[:2]
    return (x - mean) @ comps.T, var[:2], (mean, comps)


def plots(records, latents, stats, emb_sample, out_dir):
    """Three PNGs; returns [(file name, caption)], or [] with a one-line message when matplotlib is missing."""
    plt = pyplot("show.py")
    if plt is None:
        return []
    import numpy as np

    J = max([len(r["insertions"]) for r in records] + [1])
    colors = [plt.get_cmap("viridis")(j / max(J - 1, 1)) for j in range(J)]
    out = []

    def save(fig, name, caption):
        save_figure(fig, os.path.join(out_dir, name), dpi=100)
        out.append((name, caption))

    fig, ax = plt.subplots(figsize=(6.4, 3.2))
    pos = [[r_["t"] / max(len(r["ids"]), 1) for r in records for r_ in r["insertions"] if r_["j"] == j]
           for j in range(J)]
    ax.hist(pos, bins=20, range=(0, 1), stacked=True, color=colors, label=[f"#{j}" for j in range(J)])
    ax.set(xlabel="relative position in the completion (insertion before token t / length)", ylabel="insertions")
    ax.legend(title="insertion", fontsize=8)
    save(fig, "positions.png", "Where insertions fall")

    fig, ax = plt.subplots(figsize=(6.4, 3.2))
    lo, mid, hi = stats["percentiles"][1], stats["percentiles"][3], stats["percentiles"][5]
    ax.axhspan(lo, hi, color="0.9", label="token embeddings p5-p95")
    ax.axhline(mid, color="0.5", lw=1, label="token embeddings median")
    rng = np.random.default_rng(0)
    for j in range(J):
        y = [x["norm"] for r in records for r_ in r["insertions"] if r_["j"] == j for x in r_["latents"]]
        ax.scatter(j + rng.uniform(-0.15, 0.15, len(y)), y, s=10, color=colors[j])
    ax.set(xlabel="insertion index (0 = end of the prompt)", ylabel="latent norm", xticks=range(J))
    ax.legend(fontsize=8)
    save(fig, "norms.png", "Latent norms by insertion index")

    if latents:
        x = np.concatenate([lat for lat, _ in latents])
        js = np.concatenate([np.full(len(lat), j) for lat, j in latents])
        xy, var, (mean, comps) = pca2(x)
        fig, ax = plt.subplots(figsize=(6.4, 4.8))
        bg = (emb_sample - mean) @ comps.T
        ax.scatter(bg[:, 0], bg[:, 1], s=3, color="0.85", label="token embeddings (sample)")
        for j in range(J):
            ax.scatter(xy[js == j, 0], xy[js == j, 1], s=12, color=colors[j], label=f"#{j}")
        ax.set(xlabel=f"PC1 ({100 * var[0]:.0f} % of the latents' variance)",
               ylabel=f"PC2 ({100 * var[1]:.0f} %)" if len(var) > 1 else "PC2")
        ax.legend(title="insertion", fontsize=8, markerscale=1.5)
        save(fig, "pca.png", "All latents, first two principal components")
    return out


# -----------------------------------------------------------------------------
# 7. Main: settings, model, problems, files


def load_task(spec, split):
    """(rows, messages(row), grade(row, text) or None): the task registry data.get_task when it exists, else
    data.gsm8k."""
    import data

    if hasattr(data, "get_task"):
        task = data.get_task(spec)
        return task.load(split), task.messages, getattr(task, "grade", None)
    from data import gsm8k

    return gsm8k.load_task(spec, split), gsm8k.messages, lambda row, text: gsm8k.is_correct(text, row["answer"])


def build_memgen(model, tok, cfg, given):
    """A MemGen with the adapter's weaver (and trigger, when the folder holds one) or MemGen's random
    initialisation, and the adapter's json files for the pages."""
    folder = official.resolve_adapter(cfg["adapter"])  # an official MemGen checkpoint: converted once
    if not folder:
        if cfg["trigger_mode"] == "learned":
            raise ShowError("--trigger_mode=learned needs a trained trigger: pass --adapter with trigger.safetensors")
        torch.manual_seed(cfg["seed"])
        mg = memgen.MemGen(model, tok, cfg["k"], cfg["n"], cfg["trigger_mode"], boundary=cfg["boundary"],
                           latent_init=cfg["latent_init"])
        return mg.eval(), {}
    info = {"weaver": loading.adapter_info(folder, "weaver")}
    if os.path.isfile(os.path.join(folder, "trigger.safetensors")):
        info["trigger"] = loading.adapter_info(folder, "trigger")
    elif cfg["trigger_mode"] == "learned":
        raise ShowError(f"--trigger_mode=learned but {folder} holds no trigger.safetensors: train one with "
                        "train_trigger.py, or use --trigger_mode=always")
    # the adapter brings its K, N, boundary rule and delimiters; --k, --n, --boundary, --latent_init that say
    # otherwise are refused (loading.adapter_rules)
    mg = loading.memgen_for(model, tok, folder, cfg["trigger_mode"], cfg["allow_other_base"],
                            given={k: cfg[k] for k in ("k", "n", "boundary", "latent_init") if k in given})
    return mg.eval(), info


def command(cfg, index):
    """The command line that rebuilds one problem's page."""
    base = settings.defaults(globals())
    args = [f"--{k}={v}" for k, v in cfg.items()
            if k in ("model", "adapter", "trigger_mode", "data", "split") or (v != base[k] and k != "limit")]
    args = [a for a in args if not a.startswith("--index=")] + [f"--index={index}"]
    return "python show.py " + " ".join(shlex.quote(a) for a in args)


def git_commit():
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=os.path.dirname(os.path.abspath(__file__)),
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip() if out.returncode == 0 else ""
    except (OSError, subprocess.SubprocessError):
        return ""


def describe(cfg, mg, adapter_info):
    """What a page says about how it was made: the settings, the model, the adapter, the versions."""
    model = mg.model
    return {"settings": dict(cfg), "adapter": cfg["adapter"], "model_name": model.cfg.name, "k": mg.k, "n": mg.n,
            "rules": memgen.rules(mg),  # what decoding followed (an adapter's own, whatever the settings say)
            "adapter_info": json.dumps(adapter_info, sort_keys=True) if adapter_info else
            f"none: random initialisation, seed {cfg['seed']}",
            "dtype": str(model.dtype).removeprefix("torch."), "device": str(model.device),
            "torch": torch.__version__, "commit": git_commit()}


def check(cfg):
    settings.one_of(cfg, "trigger_mode", MODES)
    settings.one_of(cfg, "boundary", memgen.BOUNDARIES)
    settings.one_of(cfg, "latent_init", memgen.LATENT_INITS)
    settings.at_least(cfg, 0, "index", "n", "seed")
    settings.at_least(cfg, 1, "limit", "max_new_tokens", "k", "top_tokens")
    settings.at_least(cfg, 0.0, "temperature")
    if not cfg["model"]:
        raise ShowError("--model is required: a local Hugging Face model folder or a hub id")


@torch.no_grad()
def run(cfg, given):
    rows, messages, grade = load_task(cfg["data"], cfg["split"])
    if cfg["index"] >= len(rows):
        raise ShowError(f"--index={cfg['index']}: the {cfg['split']} split of {cfg['data']} has {len(rows)} rows")
    picked = list(range(cfg["index"], min(cfg["index"] + cfg["limit"], len(rows))))
    model, tok = loading.load_base(cfg["model"], cfg["dtype"], loading.resolve_device(cfg["device"]))
    mg, adapter_info = build_memgen(model, tok, cfg, given)
    out_dir = cfg["out_dir"] or os.path.join(
        "out", "show", f"{os.path.basename(str(cfg['data'])).removesuffix('.jsonl')}-{cfg['split']}-"
                       f"{model.cfg.name}")
    os.makedirs(out_dir, exist_ok=True)
    about = describe(cfg, mg, adapter_info)
    emb = model.model.embed_tokens.weight[:mg.vocab]
    norms = norm_table(emb)
    stats = {"percentiles": [float(torch.quantile(norms, q / 100)) for q in PERCENTILES]}
    records, all_latents = [], []
    for i in picked:
        row = rows[i]
        msgs = messages(row)
        prompt = tok.chat(msgs)
        result = memgen.generate(mg, tok, [prompt], cfg["max_new_tokens"], cfg["temperature"], seed=cfg["seed"] + i,
                                 mode=cfg["trigger_mode"])[0]
        rec, latents = inspect(mg, tok, prompt, result, cfg["top_tokens"], norms)
        rec.update(index=i, id=str(row.get("id", i)), question="\n\n".join(m["content"] for m in msgs),
                   answer=str(row.get("answer", "")), page=f"problem-{i:05d}.html", command=command(cfg, i),
                   correct=None if grade is None else bool(grade(row, result["text"])))
        write_atomic(os.path.join(out_dir, rec["page"]), problem_html(rec, tok, about, stats))
        print(terminal(rec, tok), flush=True)
        records.append(rec)
        all_latents += [(lat.cpu().numpy(), j) for j, lat in enumerate(latents)]
    gen = torch.Generator().manual_seed(0)
    sample = emb[torch.randperm(len(emb), generator=gen)[:2000]].float().cpu().numpy()
    made = plots(records, all_latents, stats, sample, out_dir)
    write_atomic(os.path.join(out_dir, "index.html"), index_html(records, about, made))
    write_atomic(os.path.join(out_dir, "show.json"),
                 json.dumps({"about": about, "token_norms": stats, "problems": records}, indent=1))
    print(f"show.py: wrote {len(records)} page(s), index.html{''.join(', ' + n for n, _ in made)} and show.json "
          f"to {out_dir}")
    return out_dir, records


def main(argv=None):
    with errors.one_line_errors("show.py"):
        cfg, given = settings.parse(sys.argv[1:] if argv is None else argv, globals(), "show.py")
        check(cfg)
        return run(cfg, given)


if __name__ == "__main__":
    main()
