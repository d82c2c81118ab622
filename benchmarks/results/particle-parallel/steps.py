import sys, time, torch
from safetensors.torch import save_file
from learned_optim.meta.cli import resolve_config_path
from learned_optim.meta.config import load_config
from learned_optim.meta.trainer import MetaTrainer
torch.set_num_threads(1)
cfg = load_config(resolve_config_path(sys.argv[1]), ["meta_epochs=2"] + sys.argv[4:])
t = MetaTrainer(cfg, out_dir=sys.argv[2], progress=False)
t.step()
start = time.perf_counter()
for _ in range(int(sys.argv[3])): t.step()
print("s/step", (time.perf_counter() - start) / int(sys.argv[3]))
save_file({k: v.contiguous() for k, v in t.rule.state_dict().items()}, sys.argv[2] + "/w.safetensors")
