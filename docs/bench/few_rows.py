# model.linear's two routes on a CPU, side by side: F.linear (x @ W.T) against W @ x.T, for the weight shapes of
# Qwen2.5-0.5B (random weights, float32) at several row counts, then one decode step of that whole model (random
# weights, a 200-token prompt in the cache) with the few-rows route on (FEW_ROWS as shipped) and off (FEW_ROWS = 0).
# Best of 5 (matrices) or of 3 (steps); one JSON line per figure. Run with every other job paused:
#   python docs/bench/few_rows.py > docs/bench/few-rows.jsonl
import json, os, sys
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
import torch
import torch.nn.functional as F
import bench
import model as model_lib


def best(fn, n):  # ms of the fastest of n runs, after a warm-up run
    fn()
    return bench.best_of(n, fn)[0] * 1000


torch.manual_seed(0)
shapes = {"q/o proj": (896, 896), "gate/up proj": (4864, 896), "down proj": (896, 4864), "head": (151936, 896)}
for name, (n, k) in shapes.items():
    w = torch.randn(n, k)
    for rows in (1, 4, 16, 64, 128, 256):
        x = torch.randn(rows, k)
        plain, other = best(lambda: F.linear(x, w), 5), best(lambda: (w @ x.t()).t().contiguous(), 5)
        print(json.dumps(dict(matrix=name, rows=rows, f_linear_ms=round(plain, 3), w_xT_ms=round(other, 3),
                              speedup=round(plain / other, 2))), flush=True)
model = bench.random_model("qwen2.5-0.5b", torch.float32, "cpu", 0)
few = model_lib.FEW_ROWS
for batch in (1, 4, 16):
    ids = torch.randint(0, 150000, (batch, 200))
    cache = model_lib.KVCache(model.cfg, batch, 200 + 64)
    with torch.no_grad():
        model(ids, cache=cache, logits="last")
        tok = torch.randint(0, 150000, (batch, 1))

        def step():  # one decode step, then forget it (the next timing reads the same 200 slots)
            model(tok, cache=cache, logits="last")
            cache.rollback(1)
        ms = {}
        for route, value in (("on", few), ("off", 0)):
            model_lib.FEW_ROWS = value
            ms[route] = best(step, 3)
        model_lib.FEW_ROWS = few
    print(json.dumps(dict(decode_step_batch=batch, route_on_ms=round(ms["on"], 1), route_off_ms=round(ms["off"], 1),
                          speedup=round(ms["off"] / ms["on"], 2))), flush=True)
