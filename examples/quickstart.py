"""Quickstart: a learned optimizer in place of ``torch.optim.Adam``.

Runs the snippet of the design notes end to end::

    opt = learned_optim.from_pretrained(<checkpoint>, model.parameters())   # a torch.optim.Optimizer
    for x, y in loader:
        opt.zero_grad(); loss_fn(model(x), y).backward(); opt.step()

then shows the rest of the ``torch.optim`` contract it keeps: an LR scheduler (the flagship's ``lr`` is a real
learning rate, its checkpoint's default 1e-3), decoupled weight decay, and a ``state_dict`` resume.

    python examples/quickstart.py                      # the zoo's flagship (bundled, offline)
    python examples/quickstart.py --checkpoint <zoo name | owner/repo | folder>
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from torch import nn

import learned_optim


def make_loader(batches: int = 20, batch_size: int = 32, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A synthetic regression problem y = sin(x @ w), as a list of (x, y) batches."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(8, 1, generator=gen)
    xs = [torch.randn(batch_size, 8, generator=gen) for _ in range(batches)]
    return [(x, torch.sin(x @ w)) for x in xs]


def main(checkpoint: str = learned_optim.FLAGSHIP, epochs: int = 2) -> list[float]:
    """Train a small MLP with the learned optimizer; returns the training losses."""
    torch.manual_seed(0)
    print("zoo:", [entry["name"] for entry in learned_optim.list_pretrained()] or "empty")
    with tempfile.TemporaryDirectory() as tmp:
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
            print(f"epoch {epoch}: mean loss {sum(losses[-len(loader) :]) / len(loader):.4f}")

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
    parser.add_argument(
        "--checkpoint", default=learned_optim.FLAGSHIP, help="zoo name, Hub repo id or checkpoint folder"
    )
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()
    main(args.checkpoint, args.epochs)
