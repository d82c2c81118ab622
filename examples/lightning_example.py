"""PyTorch Lightning: return a learned optimizer from ``configure_optimizers``.

A ``LearnedOptimizer`` is a ``torch.optim.Optimizer``, so Lightning drives it like Adam: automatic
optimization calls ``optimizer.step(closure)``, LR schedulers returned next to it drive its ``lr`` (the flagship's is a
real learning rate, default 1e-3; the older nets' a multiplier of the learned step, default 1.0), and ``Trainer``
checkpoints carry its state.

    pip install -e ".[integrations]"      # from a checkout
    python examples/lightning_example.py --checkpoint <zoo name | owner/repo | folder> --max-steps 200

Without ``--checkpoint`` it uses the zoo's flagship (bundled, works offline).
"""

from __future__ import annotations

import argparse
import tempfile

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import learned_optim


class LitRegressor(L.LightningModule):
    """A small MLP regressor trained by a learned optimizer loaded with ``from_pretrained``."""

    def __init__(self, checkpoint: str, weight_decay: float = 1e-4, total_steps: int = 100) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(8, 32), nn.LayerNorm(32), nn.ReLU(), nn.Linear(32, 1))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        # no weight decay on biases and norm parameters, as timm and transformers do
        decay = [p for n, p in self.named_parameters() if p.ndim > 1]
        no_decay = [p for n, p in self.named_parameters() if p.ndim <= 1]
        opt = learned_optim.from_pretrained(
            self.hparams.checkpoint,
            [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}],
            weight_decay=self.hparams.weight_decay,
        )
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=self.hparams.total_steps)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def make_data(n: int = 512, seed: int = 0) -> DataLoader:
    """Synthetic regression data y = sin(x @ w)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=gen)
    y = torch.sin(x @ torch.randn(8, 1, generator=gen))
    return DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True, generator=gen)


def main(checkpoint: str = learned_optim.FLAGSHIP, max_steps: int = 100) -> tuple[L.Trainer, LitRegressor]:
    """Fit for ``max_steps`` optimizer steps on CPU; returns the trainer and the module."""
    L.seed_everything(0, verbose=False)
    with tempfile.TemporaryDirectory() as tmp:
        module = LitRegressor(checkpoint, total_steps=max_steps)
        trainer = L.Trainer(
            max_steps=max_steps,
            accelerator="cpu",
            devices=1,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            default_root_dir=tmp,
        )
        trainer.fit(module, make_data())
    print(f"trained {trainer.global_step} steps, last loss {float(trainer.callback_metrics['train_loss']):.4f}")
    return trainer, module


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--checkpoint", default=learned_optim.FLAGSHIP, help="zoo name, Hub repo id or checkpoint folder"
    )
    parser.add_argument("--max-steps", type=int, default=100)
    args = parser.parse_args()
    main(args.checkpoint, args.max_steps)
