r"""How large is a regularizer's meta-gradient next to the objective's? (centres the weight grids)

For a meta-training config with ``regularizers``, runs the config's own segments (its task family,
trajectories and net, e.g. the ``l2o-lstm`` net a fine-tune starts from) *without* updating the net, and
for every segment measures

.. math::
    \rho = \frac{\|\nabla_\phi\, \textstyle\sum_b w_b R_b\|}{\|\nabla_\phi\, J\|}

the norm of the meta-gradient of the regularizer terms (at their configured weights :math:`w_b`, summed
over the segment's points where they apply) over that of the segment's objective :math:`J`. Prints the
median and quartiles of :math:`\rho` over the segments and the weight at which the median would be 1
(:math:`w / \mathrm{median}\,\rho`, for a single block): a grid centred there makes the term about as
strong as the objective.

    python benchmarks/regularizer_scale.py l2o-lstm-gam --segments 30 \
        --set "regularizers=[{kind: smoothing, weight: 1.0, where: all, every: 5, space: features, epsilon: 0.1}]"
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from learned_optim.meta.cli import resolve_config_path
from learned_optim.meta.config import load_config
from learned_optim.meta.trainer import MetaTrainer


def _norm(grads: Sequence[torch.Tensor | None]) -> float:
    return float(torch.sqrt(sum((g.square().sum() for g in grads if g is not None), torch.zeros(()))))


def gradient_ratios(trainer: MetaTrainer, segments: int) -> list[float]:
    """:math:`\\rho` of ``segments`` consecutive segments of the trainer's trajectories (net left unchanged)."""
    weights = dict(trainer.rule.named_parameters())
    params = list(weights.values())
    ratios = []
    while len(ratios) < segments:
        if trainer.trajectory is None:
            trainer._begin_trajectory()
        n = min(trainer.config.unroll.segment_length, trainer.trajectory_length - trainer.trajectory.step)
        result, objective, extra = trainer.segment_objective(weights, n)
        if extra.requires_grad:  # the terms applied somewhere in this segment
            g_obj = torch.autograd.grad(objective, params, retain_graph=True, allow_unused=True)
            g_reg = torch.autograd.grad(extra, params, allow_unused=True)
            ratios.append(_norm(g_reg) / max(_norm(g_obj), 1e-30))
        if trainer.hook is not None:
            trainer.hook.pop_values()
        trainer.trajectory = result.end
        if result.end.step >= trainer.trajectory_length:
            trainer.trajectory, trainer.meta_epochs = None, trainer.meta_epochs + 1
    return ratios


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config", help="a bundled config name (e.g. l2o-lstm-gam) or a config file")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config override, as for `python -m learned_optim.meta train`",
    )
    parser.add_argument("--segments", type=int, default=30, help="segments with the term applied")
    args = parser.parse_args(argv)
    config = load_config(resolve_config_path(args.config), args.overrides)
    if not config.regularizers:
        parser.error(f"{args.config} has no regularizers to measure")
    torch.set_num_threads(config.num_threads or torch.get_num_threads())
    with tempfile.TemporaryDirectory() as out:
        trainer = MetaTrainer(config, out_dir=out, progress=False)
        ratios = gradient_ratios(trainer, args.segments)
    q1, median, q3 = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else (ratios[0],) * 3
    blocks = config.regularizers
    print(f"{args.config} {' '.join(args.overrides)}")
    print(
        f"|meta-gradient of the terms| / |meta-gradient of the objective| over {len(ratios)} segments: "
        f"median {median:.3g} (quartiles {q1:.3g} .. {q3:.3g})"
    )
    if len(blocks) == 1:
        weight = blocks[0]["weight"]
        print(f"weight at which the median ratio is 1: {weight / median:.3g} (configured weight {weight})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
