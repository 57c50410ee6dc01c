# A/B of leaving finished rows out of the CPU decode loops: vanilla and MemGen (mode always) greedy decoding of the
# first 8 GSM8K test prompts, 64 new tokens, with every token whose text ends in "." made an EOS, so that rows end
# at their first full stop, at different steps; float32, a warm-up run, then one timed run. Run for two checkouts,
# the model folder second:
#   python docs/bench/finished_rows.py CHECKOUT MODEL_FOLDER   (MEMGEN_GSM8K_URL pointing at the GSM8K files offline)
# With a third argument N: vanilla only, the model's own EOS, N new tokens (rows end where the model ends them).
import json, os, sys
sys.path.insert(0, sys.argv[1])
import torch
import data, memgen
from model import load_model, generate
from tokenizer import load_tokenizer
from bench import timed
m, tok = load_model(sys.argv[2], dtype="float32"), load_tokenizer(sys.argv[2])
own_eos = len(sys.argv) > 3
new_tokens = int(sys.argv[3]) if own_eos else 64
if not own_eos:
    tok.eos_ids = sorted(set(tok.eos_ids) | {i for i in range(tok.vocab_size) if tok.decode([i]).endswith(".")})
task = data.get_task("gsm8k")
prompts = [tok.chat(task.messages(r)) for r in task.load("test")[:8]]


def warm_then_time(fn):  # (seconds, result) of one run after a warm-up run
    fn()
    return timed(fn)


v, (seqs, _) = warm_then_time(lambda: generate(m, tok, prompts, max_new_tokens=new_tokens))
out = dict(checkout=os.path.basename(sys.argv[1].rstrip("/")), new_tokens=new_tokens, vanilla_s=round(v, 2),
           vanilla_lengths=[len(s) for s in seqs])
if not own_eos:
    torch.manual_seed(0)
    mg = memgen.MemGen(m, tok).eval()
    g, res = warm_then_time(lambda: memgen.generate(mg, tok, prompts, max_new_tokens=new_tokens, mode="always"))
    out.update(memgen_s=round(g, 2), memgen_lengths=[len(r["ids"]) for r in res])
print(json.dumps(out), flush=True)
