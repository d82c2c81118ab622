"""The owner-computes step's messages (:mod:`learned_optim.sharded_step`); its distributed runs are in
tests/core/test_distributed.py."""

from __future__ import annotations

import torch

from learned_optim.sharded_step import _nbytes, _pack, _unpack, shard_layout


def test_pieces_of_mixed_dtypes_and_odd_sizes_come_back_bit_for_bit():
    """bfloat16 and float64 pieces of odd sizes (each padded so the next starts aligned), an empty one, a 0-d one."""
    gen = torch.Generator().manual_seed(0)
    pieces = [
        torch.randn(3, 5, generator=gen).bfloat16(),
        torch.randn(0, 4),
        torch.randn(7, generator=gen).double(),
        torch.randn(2, 3, 1, generator=gen)[:, ::2],  # not contiguous
        torch.tensor(3.5),
    ]
    specs = [(x.shape, x.dtype) for x in pieces]
    message = _pack(pieces)
    assert message.dtype == torch.uint8 and message.numel() == _nbytes(specs) and message.numel() % 8 == 0
    back = _unpack(message, specs)
    for b, x in zip(back, pieces, strict=True):
        assert b.dtype == x.dtype and b.shape == x.shape and torch.equal(b, x)


def test_plain_tensors_are_not_for_the_owners():
    p = torch.nn.Parameter(torch.zeros(3, 2))
    p.grad = torch.zeros(3, 2)
    assert shard_layout(p) is None
