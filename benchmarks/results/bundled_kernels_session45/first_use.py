import time, torch
t0 = time.perf_counter()
import learned_optim
from learned_optim import kernels
t1 = time.perf_counter()
m = torch.nn.Linear(10, 10)
opt = learned_optim.from_pretrained("adafac-mlp-adam-magnitude-tbv-nomup-soup-all8-orthogonal", m.parameters())
m(torch.randn(4, 10)).sum().backward()
t2 = time.perf_counter()
opt.step()
t3 = time.perf_counter()
opt.step()
t4 = time.perf_counter()
print(f"import {t1-t0:.1f} s, load {t2-t1:.1f} s, first step {t3-t2:.1f} s, second {1e3*(t4-t3):.2f} ms, kernels {kernels.available()}")
