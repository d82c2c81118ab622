"""Hugging Face Transformers: a learned optimizer in ``Trainer(optimizer_cls_and_kwargs=...)``.

Pass the optimizer *class* and its keyword arguments; the Trainer builds it over its own parameter
groups (weight decay on weights, none on biases and LayerNorm), so ``TrainingArguments.weight_decay``
applies as decoupled weight decay::

    rule, config = learned_optim.load_rule("<zoo name | owner/repo | folder>")
    trainer = Trainer(..., optimizer_cls_and_kwargs=(learned_optim.LearnedOptimizer,
                                                     {"rule": rule, **config["optimizer"]}))

Notes for transformers >= 5:

* the first element must be a ``torch.optim.Optimizer`` subclass. Any other callable (for example
  a ``functools.partial`` of ``learned_optim.from_pretrained``) is treated as an optimizer *factory*
  and called as ``factory()(model, **kwargs)``, which bypasses the Trainer's weight-decay groups;
* ``TrainingArguments.learning_rate`` is not passed to an optimizer given this way: ``lr`` comes from the
  kwargs (the checkpoint's default: a real learning rate, 1e-3, for the flagship; a multiplier of the learned step,
  1.0, for the older nets). The Trainer's scheduler still scales it: this example follows the checkpoint's
  recorded schedule (the flagship's warm-up and cosine decay; ``lr_scheduler_type="constant"`` keeps an older net's
  learned step as it was meta-trained).

    pip install -e ".[integrations]"      # from a checkout
    python examples/transformers_example.py --checkpoint <zoo name | owner/repo | folder> --max-steps 100

The model is a tiny GPT-2 built from a config (random weights, no download). Without ``--checkpoint``
the zoo's flagship (bundled, works offline) is used.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from torch.utils.data import Dataset
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

import learned_optim


class CountingSequences(Dataset):
    """Token sequences that count upward modulo the vocabulary from a random start: easy to learn."""

    def __init__(self, n: int = 256, length: int = 16, vocab_size: int = 32, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        starts = torch.randint(0, vocab_size, (n, 1), generator=gen)
        self.ids = (starts + torch.arange(length)) % vocab_size

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def main(checkpoint: str = learned_optim.FLAGSHIP, max_steps: int = 100, output_dir: str | None = None) -> Trainer:
    """Train a tiny randomly initialised GPT-2 for ``max_steps`` steps on CPU; returns the Trainer."""
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        rule, config = learned_optim.load_rule(checkpoint)

        model = GPT2LMHeadModel(
            GPT2Config(vocab_size=32, n_positions=16, n_embd=32, n_layer=1, n_head=2, bos_token_id=0, eos_token_id=0)
        )
        args = TrainingArguments(
            output_dir=output_dir or str(Path(tmp) / "out"),
            max_steps=max_steps,
            per_device_train_batch_size=16,
            weight_decay=0.01,
            # the checkpoint's recommended schedule: warm-up and cosine for the flagship, constant for older nets
            lr_scheduler_type="cosine" if config.get("schedule") == "cosine" else "constant",
            warmup_steps=max(1, max_steps // 20) if config.get("schedule") == "cosine" else 0,
            use_cpu=True,
            report_to="none",
            save_strategy="no",
            logging_steps=max(1, max_steps // 10),
            disable_tqdm=True,
            dataloader_num_workers=0,
            seed=0,
        )
        trainer = Trainer(
            model=model,
            args=args,
            train_dataset=CountingSequences(),
            optimizer_cls_and_kwargs=(learned_optim.LearnedOptimizer, {"rule": rule, **config.get("optimizer", {})}),
        )
        result = trainer.train()
    print(f"trained {trainer.state.global_step} steps, mean training loss {result.training_loss:.4f}")
    return trainer


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--checkpoint", default=learned_optim.FLAGSHIP, help="zoo name, Hub repo id or checkpoint folder"
    )
    parser.add_argument("--max-steps", type=int, default=100)
    args = parser.parse_args()
    main(args.checkpoint, args.max_steps)
