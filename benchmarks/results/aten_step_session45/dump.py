"""Steps a few cases on the ATen path (kernels off) and saves every parameter and state tensor (for a bitwise A/B)."""
import sys, torch
torch.set_num_threads(1)
from learned_optim import LearnedOptimizer
from learned_optim.hub import load_rule
out = {}
cases = ["task:diabetes-mlp", "task:shapes-cnn", "task:copy-gru", "task:stdlib-transformer-lm", "512x128,128x128,128,7", "1536,48x32,24x64,64x24,16x96,96x16"]
for name in sys.argv[2:]:
    rule, config = load_rule(name)
    for case in cases:
        if case.startswith("task:"):
            from learned_optim.bench.tasks import get_task
            w = get_task(case[5:]).bind(); model = w.build_model(0)
            params = list(model.parameters()); w.loss(model, w.batch(torch.Generator().manual_seed(0))).backward()
        else:
            g = torch.Generator().manual_seed(0)
            params = [torch.nn.Parameter(torch.randn(tuple(int(x) for x in s.split("x")), generator=g) * 0.1) for s in case.split(",")]
            for p in params: p.grad = torch.randn(p.shape, generator=g) * 0.01
        opt = LearnedOptimizer(params, rule, **config.get("optimizer", {}))
        for _ in range(4): opt.step()
        for i, p in enumerate(params):
            out[f"{name}|{case}|{i}|param"] = p.detach().clone()
            for k, v in opt.state[p].items():
                out[f"{name}|{case}|{i}|{k}"] = v.clone()
torch.save(out, sys.argv[1])
