"""Write a recipe's net *before* meta-training as a checkpoint folder: the control that shows on the
benchmark suite what meta-training added.

With ``init: adam`` an adafac_mlp recipe's untrained net is an exact, hand-built rule (AdamW with a
per-tensor RMS-normalised step and the muP scale; with ``step_magnitude: adam`` exactly AdamW times the muP
scale): its hidden units other than the two that carry Adam's direction have zero output weights, so the
function does not depend on the seed. The folder is a normal checkpoint (``from_pretrained``, ``bench
--optimizer``), named ``<recipe>-untrained`` and described as a control.

    python benchmarks/untrained_control.py adafac-mlp-adam-magnitude --out runs/adafac-mlp-adam-magnitude-untrained
    python -m learned_optim bench --optimizer runs/adafac-mlp-adam-magnitude-untrained --lr-rule adamw ...

``--net FIELD=VALUE`` changes a net setting the weights do not depend on (as ``meta soup --net``), e.g. the
untrained net with its direction orthogonalised: ``--net newton_schulz_steps=5`` (AdamW's direction through
Newton-Schulz, rescaled to AdamW's per-tensor RMS). ``--net init=momentum`` builds the other hand-built net of the
family: the momentum's direction instead of Adam's (with ``newton_schulz_steps``, Muon's orthogonalised momentum at
AdamW's per-tensor step RMS).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from learned_optim.hub import save_pretrained  # noqa: E402
from learned_optim.meta.cli import add_net_settings_option, net_settings, resolve_config_path  # noqa: E402
from learned_optim.meta.config import load_config  # noqa: E402
from learned_optim.nets.base import build_rule  # noqa: E402


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("recipe", help="a bundled meta-training config name or a config file")
    parser.add_argument("--out", type=Path, required=True, help="checkpoint folder to write")
    parser.add_argument(
        "--schedule", default="cosine", help="the lr schedule recorded for the bench's default rule (default cosine)"
    )
    add_net_settings_option(
        parser, "change a net setting the weights do not depend on, e.g. --net newton_schulz_steps=5 (repeatable)"
    )
    args = parser.parse_args(argv)
    config = load_config(resolve_config_path(args.recipe))
    torch.manual_seed(config.seed)
    overrides = net_settings(args.net_overrides)
    rule = build_rule(config.net.family, {**config.net.config, **overrides})
    changed = "".join(f", {k}={v!r}" for k, v in overrides.items())
    folder = save_pretrained(
        rule,
        args.out,
        name=f"{config.name}-untrained" + "".join(f"-{k}-{v}" for k, v in overrides.items()),
        description=f"CONTROL, untrained: the net of recipe {config.name} before meta-training{changed}",
        optimizer_defaults={"lr": config.unroll.lr if config.unroll.lr is not None else rule.default_lr},
    )
    path = folder / "config.json"
    record = json.loads(path.read_text())
    record["schedule"] = args.schedule
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {folder}")
    return folder


if __name__ == "__main__":
    main()
