"""Tiny models and batches for the placement tests."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.train.data import Record, collate


def batches(n: int = 3, seed: int = 0, pad_tail: int = 0, counting: bool = False) -> list[dict[str, torch.Tensor]]:
    """``n`` collated batches of 4 sequences (lengths 9..12, right-padded with id 0; ``pad_tail`` more padding
    columns), labels = inputs, as ``lorakit.train.data.collate`` makes them. Tokens are random in 4..255, or with
    ``counting`` runs s, s+1, s+2, ... from a random start (a rule a model can learn across batches)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        lengths = [int(torch.randint(9, 13, (), generator=gen)) for _ in range(4)]
        if counting:
            rows = [4 + (torch.randint(0, 252, (), generator=gen) + torch.arange(t)) % 252 for t in lengths]
        else:
            rows = [torch.randint(4, 256, (t,), generator=gen) for t in lengths]
        batch = collate([Record(r.tolist(), r.tolist()) for r in rows], 0)
        if pad_tail:
            pad = torch.zeros(4, pad_tail, dtype=torch.long)
            batch = {
                "input_ids": torch.cat([batch["input_ids"], pad], 1),
                "attention_mask": torch.cat([batch["attention_mask"], pad], 1),
                "labels": torch.cat([batch["labels"], pad - 100], 1),
            }
        out.append(batch)
    return out


class Block(nn.Module):
    def __init__(self, d: int, basis: torch.Tensor):
        super().__init__()
        self.register_buffer("basis", basis)  # (k, d)
        self.aligned = nn.Linear(d, d, bias=False)  # rows inside the data's subspace
        self.blind = nn.Linear(d, d, bias=True)  # rows orthogonal to it (plus a bias, which NFN ignores)
        self.dead = nn.Linear(d, d, bias=False)  # computed, then multiplied by zero: nothing it does matters
        with torch.no_grad():
            mix = torch.randn(d, basis.shape[0])  # (d, k)
            self.aligned.weight.copy_(mix @ basis)  # (d, d): W = M·Uᵀ
            w = torch.randn(d, d)
            self.blind.weight.copy_(w - (w @ basis.T) @ basis)  # (d, d): W·U = 0
            self.dead.weight.normal_()

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        update = torch.tanh(self.aligned(h) + 0.1 * self.blind(h)) + 0.0 * self.dead(h)  # (B, T, d)
        return h + (update @ self.basis.T) @ self.basis  # the residual stream stays in U


class SubspaceLM(nn.Module):
    """A causal LM whose token embeddings lie in a k-dim subspace U of its width d: ``aligned`` maps U, ``blind``
    is zero on U, ``dead`` does not reach the output. ``model(**batch).loss`` is next-token cross-entropy."""

    def __init__(self, seed: int = 0, vocab: int = 256, d: int = 32, k: int = 3, layers: int = 2):
        super().__init__()
        torch.manual_seed(seed)
        basis = torch.linalg.qr(torch.randn(d, k))[0].T  # (k, d), orthonormal rows
        self.embed = nn.Embedding(vocab, d)
        with torch.no_grad():
            self.embed.weight.copy_(torch.randn(vocab, k) @ basis)  # (vocab, d), rows in U
        self.blocks = nn.ModuleList(Block(d, basis) for _ in range(layers))
        self.head = nn.Linear(d, vocab, bias=False)

    def get_output_embeddings(self) -> nn.Module:
        return self.head

    def forward(self, input_ids, attention_mask=None, labels=None):
        h = self.embed(input_ids)  # (B, T, d)
        for block in self.blocks:
            h = block(h)
        logits = self.head(h)  # (B, T, vocab)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))
        return type("Out", (), {"logits": logits, "loss": loss})()
