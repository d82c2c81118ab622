"""The suite's models: ordinary ``nn.Module`` workloads, each built from a seed by the task.

None of them is an architecture the zoo was meta-trained on (one-hidden-layer sigmoid/relu/tanh MLPs
of width ~20 on 8x8 digits): deeper and wider MLPs with SiLU/GELU, a plain CNN, a ResNet with
BatchNorm, an MLP autoencoder, GRU and LSTM sequence models and pre-norm causal transformers.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["MLP", "SmallCNN", "ResNetBN", "AutoEncoder", "SequenceRNN", "TransformerLM", "ACTIVATIONS"]

ACTIVATIONS = {"relu": nn.ReLU, "silu": nn.SiLU, "gelu": nn.GELU, "tanh": nn.Tanh}


class MLP(nn.Sequential):
    """``in -> hidden[0] -> ... -> out`` with ``activation`` between the linear layers."""

    def __init__(self, inputs: int, hidden: tuple[int, ...], outputs: int, activation: str = "relu") -> None:
        layers: list[nn.Module] = []
        sizes = (inputs, *hidden)
        for a, b in zip(sizes[:-1], sizes[1:], strict=True):
            layers += [nn.Linear(a, b), ACTIVATIONS[activation]()]
        super().__init__(*layers, nn.Linear(sizes[-1], outputs))


class SmallCNN(nn.Module):
    """Two conv-conv-maxpool stages (``channels`` wide, ReLU) and a linear classifier."""

    def __init__(self, in_channels: int, image_size: int, classes: int, channels: tuple[int, int] = (16, 32)) -> None:
        super().__init__()
        c1, c2 = channels
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, c1, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(c1, c1, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(c2, c2, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.head = nn.Linear(c2 * (image_size // 4) ** 2, classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x).flatten(1))


class _Block(nn.Module):
    """Basic residual block: conv-BN-ReLU-conv-BN plus a (1x1 conv-BN when the shape changes) shortcut."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(cin, cout, 3, stride, 1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(),
            nn.Conv2d(cout, cout, 3, 1, 1, bias=False),
            nn.BatchNorm2d(cout),
        )
        self.shortcut = (
            nn.Identity()
            if stride == 1 and cin == cout
            else nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        )

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(self.body(x) + self.shortcut(x))


class ResNetBN(nn.Module):
    """A small ResNet (He et al. 2016) with BatchNorm: a 3x3 stem, one stage of ``blocks`` basic blocks per
    entry of ``widths`` (stride 2 from the second stage on), global average pooling, a linear head."""

    def __init__(self, in_channels: int, classes: int, widths: tuple[int, ...] = (16, 32, 64), blocks: int = 2) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU()
        )
        stages, cin = [], widths[0]
        for i, w in enumerate(widths):
            for j in range(blocks):
                stages.append(_Block(cin, w, 2 if i > 0 and j == 0 else 1))
                cin = w
        self.stages = nn.Sequential(*stages)
        self.head = nn.Linear(cin, classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.stages(self.stem(x)).mean((2, 3)))


class AutoEncoder(nn.Module):
    """MLP autoencoder on flattened inputs: ``encoder`` widths down to the code, mirrored back (GELU)."""

    def __init__(self, inputs: int, widths: tuple[int, ...] = (256, 64)) -> None:
        super().__init__()
        self.encoder = MLP(inputs, widths[:-1], widths[-1], "gelu")
        self.decoder = MLP(widths[-1], tuple(reversed(widths[:-1])), inputs, "gelu")

    def forward(self, x: Tensor) -> Tensor:
        return self.decoder(torch.nn.functional.gelu(self.encoder(x.flatten(1)))).view_as(x)


class SequenceRNN(nn.Module):
    """Token embedding, a ``cell`` (``"gru"`` or ``"lstm"``) recurrent layer, a per-position linear head."""

    def __init__(self, vocab: int, outputs: int, embed: int, hidden: int, cell: str = "gru", layers: int = 1) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, embed)
        self.rnn = {"gru": nn.GRU, "lstm": nn.LSTM}[cell](embed, hidden, num_layers=layers, batch_first=True)
        self.head = nn.Linear(hidden, outputs)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.head(self.rnn(self.embed(tokens))[0])


class TransformerLM(nn.Module):
    """A decoder-only (causal) pre-norm transformer language model with learned positions."""

    def __init__(self, vocab: int, d_model: int, layers: int, heads: int, ff: int, context: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        self.position = nn.Parameter(torch.randn(context, d_model) * 0.02)
        layer = nn.TransformerEncoderLayer(d_model, heads, ff, dropout=0.0, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab)

    def forward(self, tokens: Tensor) -> Tensor:
        t = tokens.shape[1]
        mask = nn.Transformer.generate_square_subsequent_mask(t, device=tokens.device)
        h = self.blocks(self.embed(tokens) + self.position[:t], mask=mask, is_causal=True)
        return self.head(self.norm(h))
