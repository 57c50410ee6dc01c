# A/B of the eager decode loops: vanilla and MemGen tok/s of the repository checkout given first (a model folder second),
# SmolLM2, the first 4 GSM8K test prompts, 64 tokens, warm-up then the best of 3. Run alternately for two checkouts:
#   python docs/bench/ab.py CHECKOUT MODEL_FOLDER   (MEMGEN_GSM8K_URL pointing at the GSM8K files when offline)
import json, os, sys, time
sys.path.insert(0, sys.argv[1])
import torch
import data, memgen
from model import load_model, generate
from tokenizer import load_tokenizer
path = sys.argv[2]
m, tok = load_model(path, dtype="float32"), load_tokenizer(path)
class NoEos:
    def __init__(s, t): s.t, s.eos_ids = t, []
    def __getattr__(s, n): return getattr(s.t, n)
tok = NoEos(tok)
task = data.get_task("gsm8k")
prompts = [tok.chat(task.messages(r)) for r in task.load("test")[:4]]
torch.manual_seed(0)
mg = memgen.MemGen(m, tok).eval()
def t(fn):
    fn(); best = 1e9
    for _ in range(3):
        a = time.perf_counter(); fn(); best = min(best, time.perf_counter() - a)
    return 4 * 64 / best
v = t(lambda: generate(m, tok, prompts, max_new_tokens=64))
g = t(lambda: memgen.generate(mg, tok, prompts, max_new_tokens=64, mode="always"))
print(json.dumps(dict(repo=os.path.basename(sys.argv[1].rstrip("/")), vanilla_tok_s_b4=round(v, 3), memgen_tok_s=round(g, 3), memgen_vs_vanilla=round(g / v, 3))), flush=True)
