r"""Flatness-aware regularizers of the meta-loss (SPEC §3): optimizers meta-trained to land in flat minima.

A regularizer is a term :math:`\lambda\,R(\theta_t)` added to the meta-loss at points :math:`\theta_t` of
the optimizee trajectory. Because :math:`\theta_t = \theta_{t-1} + \Delta_\phi(\dots)` is in the graph of
the net's weights :math:`\phi`, backpropagating the meta-loss chains :math:`\nabla_\theta R` into
:math:`\phi`: the net is trained to produce trajectories whose points are flat (Yang et al. 2023,
"Learning to Generalize Provably in L2O"; the SAM/GSAM/GAM terms and the smoothing term of "Learning
Regularizers"). At meta-test time nothing of this runs: the optimizer costs the same per step as a
vanilla one.

Config blocks (``MetaTrainConfig.regularizers``, a list; several may be combined)::

    regularizers:
      - {kind: hessian_trace, weight: 1.0e-3, where: posterior, probes: 10}
      - {kind: smoothing, weight: 1.0, where: all, every: 5, epsilon: 1.0}

Every block has ``kind``, ``weight`` (:math:`\lambda`, required), ``where`` (which trajectory points:
``posterior`` = second half of the trajectory, :math:`t > T/2`; ``all``; ``final`` = the trajectory's
last point :math:`t = T`; ``segment_end`` = the last point of every truncated-BPTT segment), ``every``
(apply at steps :math:`t` with :math:`t \bmod \text{every} = 0` only, to bound the cost; with ``all`` and
``posterior``, as ``final`` and ``segment_end`` pick their points), an optional
``name`` (the key of its logged value) and the hyperparameters of its kind:

=================== ========================================================================= ==========
kind                term :math:`R(\theta)` (its gradient w.r.t. :math:`\theta` is what reaches
                    the net)                                                                   default
                                                                                               ``where``
=================== ========================================================================= ==========
hessian_trace       Hutchinson :math:`\frac1n\sum_i z_i^\top H z_i`, fresh Rademacher          posterior
                    :math:`z_i` at every call, :math:`Hz` by ``jvp(grad)`` (``probes`` 10;
                    ``hvp: reverse``: by ``grad`` of :math:`\nabla L \cdot z`)
hessian_eigenvalue  :math:`|v^\top H v|`, :math:`v` from ``iters`` (10) power iterations         posterior
                    (largest-magnitude eigenvalue; ``absolute: false`` keeps the sign)
jacobian_trace      :math:`g^\top g` (``reduction: sum``) or its mean over coordinates          posterior
local_entropy       surrogate :math:`\frac\gamma2\|\theta - \mathrm{sg}(\mu)\|^2` whose gradient  posterior
                    is :math:`\gamma(\theta-\mu) = -\nabla_\theta G(\theta;\gamma)`, :math:`\mu`
                    the SGLD estimate of :math:`E[\theta']` (see :func:`local_entropy_mean`)
sam                 :math:`L(\theta + \mathrm{sg}(\hat\epsilon))`, :math:`\hat\epsilon =            final
                    \rho g/\|g\|` (``gap: true``: minus :math:`L(\theta)`)
gsam                value :math:`L(\theta+\hat\epsilon)`, gradient the GSAM direction              final
                    :math:`g_p - \alpha(g - \mathrm{proj}_{g_p} g)`
gam                 :math:`\rho\,\|\nabla L(\theta + \mathrm{sg}(\delta))\|`, :math:`\delta =        final
                    \rho\,Hg/\|Hg\|` (one normalised ascent step on :math:`\|\nabla L\|`)
smoothing           :math:`\|m(x + \mathrm{sg}(\tilde\delta)) - m(x)\|^2` over the coordinates,      all
                    :math:`\tilde\delta` found by PGA in the :math:`L_\infty` ball of radius
                    ``epsilon`` around the net's input features :math:`x` (Xiong & Hsieh 2022;
                    ``space: gradient`` perturbs the gradient fed to the net instead)
=================== ========================================================================= ==========

:math:`L` is the optimizee loss on the train batch that produced :math:`g_t` (the hook's ``batch``),
:math:`g = \nabla L(\theta)`, :math:`H = \nabla^2 L(\theta)` and :math:`\mathrm{sg}` stops the gradient
(SAM, GSAM and GAM treat their perturbations as constants, as the optimizers they come from do).
Terms are summed over the points where they apply, like the ``sum`` meta-objective sums losses.

Randomness (probes, power-iteration start, SGLD noise, PGA start) comes from the ``generator=`` of the
functions (``seed=`` of :class:`RegularizerHook`), else from torch's global RNG. The trainer gives its hook a
generator seeded from the config's ``seed`` (and the process rank) and checkpoints its state, so a run is
reproducible from its config and a resumed run continues bit for bit (torch's global RNG starts from a random
seed in every process).

:class:`RegularizerHook` is the :class:`~learned_optim.meta.unroll.MetaLossHook` the trainer builds
from the config (``hook``); the kinds and the parsing of config blocks are in ``kinds``; the differentiable
building blocks, usable on any ``loss_fn(params_dict) -> scalar``, in ``terms`` (the flatness terms of
:math:`\theta`) and ``smoothing`` (the net's input-smoothing term).
"""

from __future__ import annotations

from ..curvature import hvp
from .hook import RegularizerHook, combine_hooks
from .kinds import (
    REGULARIZERS,
    WHERE,
    GAMRegularizer,
    GSAMRegularizer,
    HessianEigenvalueRegularizer,
    HessianTraceRegularizer,
    JacobianTraceRegularizer,
    LocalEntropyRegularizer,
    Regularizer,
    RegularizerBlock,
    SAMRegularizer,
    SmoothingRegularizer,
    parse_block,
    parse_blocks,
)
from .smoothing import net_input_layer, smoothing_term
from .terms import (
    gam_term,
    gsam_term,
    hutchinson_trace,
    jacobian_trace,
    local_entropy_mean,
    local_entropy_surrogate,
    sam_term,
    top_eigenvalue,
)

__all__ = [
    "WHERE",
    "REGULARIZERS",
    "Regularizer",
    "RegularizerBlock",
    "RegularizerHook",
    "parse_block",
    "parse_blocks",
    "combine_hooks",
    "HessianTraceRegularizer",
    "HessianEigenvalueRegularizer",
    "JacobianTraceRegularizer",
    "LocalEntropyRegularizer",
    "SAMRegularizer",
    "GSAMRegularizer",
    "GAMRegularizer",
    "SmoothingRegularizer",
    "hvp",
    "hutchinson_trace",
    "top_eigenvalue",
    "jacobian_trace",
    "local_entropy_mean",
    "local_entropy_surrogate",
    "sam_term",
    "gsam_term",
    "gam_term",
    "smoothing_term",
    "net_input_layer",
]
