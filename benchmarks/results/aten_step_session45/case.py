"""One timing process: the ATen step (kernels off) of a case, in the tree on sys.path[0]."""
import sys, time, json
import torch
torch.set_num_threads(1)
from learned_optim import LearnedOptimizer
from learned_optim.hub import load_rule
case, name = sys.argv[1], sys.argv[2]
rule, config = load_rule(name)
if case.startswith("task:"):
    from learned_optim.bench.tasks import get_task
    w = get_task(case[5:]).bind(); model = w.build_model(0)
    params = list(model.parameters()); w.loss(model, w.batch(torch.Generator().manual_seed(0))).backward()
else:
    shapes = [tuple(int(x) for x in s.split("x")) for s in case.split(",")]
    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=g) * 0.1) for s in shapes]
    for p in params: p.grad = torch.randn(p.shape, generator=g) * 0.01
opt = LearnedOptimizer(params, rule, **config.get("optimizer", {}))
for _ in range(5): opt.step()
n = sum(p.numel() for p in params)
calls = max(5, min(200, int(3e6 / max(n, 1))))
best = 1e9
for _ in range(7):
    t0 = time.process_time()
    for _ in range(calls): opt.step()
    best = min(best, (time.process_time() - t0) / calls)
print(json.dumps({"case": case, "ms": best * 1e3}))
