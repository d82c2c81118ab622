import time, torch
from torch.func import vmap, functional_call
from learned_optim.hub import load_rule
from learned_optim.nets.base import functional_update
torch.set_num_threads(1)
rule, _ = load_rule("pretrained/adafac-mlp-adam-magnitude-tbv-nomup")
P = 8
weights = {k: v.detach() for k, v in rule.named_parameters()}
stacked = {k: v.unsqueeze(0).expand(P, *v.shape).clone() + 0.01 * torch.randn(P, *v.shape) for k, v in weights.items()}
for shape in [(64, 64), (128, 64), (64,), (10, 128)]:
    n = 1
    for s in shape: n *= s
    g = torch.randn(P, n); p = torch.randn(P, n)
    st = rule.init_state(n, shape=shape)
    states = {k: v.unsqueeze(0).expand(P, *v.shape).clone() for k, v in st.items()}
    step = torch.tensor(3.0)
    def one(w, g1, p1, s1):
        return functional_update(rule, w, g1, p1, s1, step, shape)
    def loop():
        return [one({k: v[i] for k, v in stacked.items()}, g[i], p[i], {k: v[i] for k, v in states.items()}) for i in range(P)]
    try:
        batched = vmap(one)
        out_v = batched(stacked, g, p, states)
        ok = True
    except Exception as e:
        ok = False; err = str(e).splitlines()[0][:150]
    out_l = loop()
    t0 = time.perf_counter()
    for _ in range(50): loop()
    tl = (time.perf_counter() - t0) / 50
    if ok:
        t0 = time.perf_counter()
        for _ in range(50): batched(stacked, g, p, states)
        tv = (time.perf_counter() - t0) / 50
        d = max(float((out_v[0][i] - out_l[i][0]).abs().max()) for i in range(P))
        print(shape, f"loop {tl*1e3:.2f} ms  vmap {tv*1e3:.2f} ms  ratio {tl/tv:.2f}x  max diff {d:.2e}")
    else:
        print(shape, f"loop {tl*1e3:.2f} ms; vmap failed: {err}")
