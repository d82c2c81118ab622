"""Quickstart: a learned optimizer in place of ``torch.optim.Adam``.

Runs the snippet of the design notes end to end::

    opt = learned_optim.from_pretrained(<checkpoint>, model.parameters())   # a torch.optim.Optimizer
    for x, y in loader:
        opt.zero_grad(); loss_fn(model(x), y).backward(); opt.step()

then shows the rest of the ``torch.optim`` contract it keeps: an LR scheduler (``lr`` multiplies the
learned step), decoupled weight decay, and a ``state_dict`` resume.

    python examples/quickstart.py                      # the untrained API demo below
    python examples/quickstart.py --checkpoint <zoo name | owner/repo | folder>

WARNING: without ``--checkpoint`` this script writes a *randomly initialised, untrained* optimizer net
to a temporary folder and uses that. It exists only to demonstrate the API on a machine without any
pretrained checkpoint; its steps are random and the loss is not expected to go down. For real
training pick an entry of ``learned_optim.list_pretrained()`` or a Hub repo id.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from torch import nn

import learned_optim


def write_untrained_demo_checkpoint(directory: Path) -> Path:
    """Save a fresh (random, UNTRAINED) RNNProp net as a checkpoint folder, for the API demo only."""
    torch.manual_seed(0)
    return learned_optim.save_pretrained(
        learned_optim.RNNProp(), directory, name="untrained-demo",
        description="UNTRAINED randomly initialised RNNProp net: API demo only, not an optimizer to use",
        card="# untrained-demo\n\nRandomly initialised, never meta-trained. For the quickstart API demo only.\n")


def make_loader(batches: int = 20, batch_size: int = 32, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A synthetic regression problem y = sin(x @ w), as a list of (x, y) batches."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(8, 1, generator=gen)
    xs = [torch.randn(batch_size, 8, generator=gen) for _ in range(batches)]
    return [(x, torch.sin(x @ w)) for x in xs]


def main(checkpoint: str | None = None, epochs: int = 2) -> list[float]:
    """Train a small MLP with the learned optimizer; returns the training losses."""
    torch.manual_seed(0)
    print("zoo:", [entry["name"] for entry in learned_optim.list_pretrained()] or "empty")
    with tempfile.TemporaryDirectory() as tmp:
        if checkpoint is None:
            checkpoint = str(write_untrained_demo_checkpoint(Path(tmp) / "untrained-demo"))
            print(f"using an UNTRAINED demo checkpoint at {checkpoint} (API demo only: expect no progress)")

        model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 1))
        loss_fn = nn.MSELoss()
        loader = make_loader()

        # --- the one-line change: a learned optimizer instead of torch.optim.Adam -----------------
        opt = learned_optim.from_pretrained(checkpoint, model.parameters(), weight_decay=1e-4)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * len(loader))
        losses = []
        for epoch in range(epochs):
            for x, y in loader:
                opt.zero_grad()
                loss = loss_fn(model(x), y)
                loss.backward()
                opt.step()
                scheduler.step()
                losses.append(loss.item())
            print(f"epoch {epoch}: mean loss {sum(losses[-len(loader):]) / len(loader):.4f}")

        # --- resume exactly where training stopped --------------------------------------------------
        path = Path(tmp) / "resume.pt"
        torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, path)
        saved = torch.load(path, weights_only=True)
        resumed = learned_optim.from_pretrained(checkpoint, model.parameters())
        resumed.load_state_dict(saved["opt"])
        print(f"resumed optimizer at step {int(resumed.state[model[0].weight]['step'])} of {len(losses)}")
    return losses


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", help="zoo name, Hub repo id or checkpoint folder (default: untrained demo)")
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()
    main(args.checkpoint, args.epochs)
