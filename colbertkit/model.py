"""The ColBERT module: a Hugging Face encoder plus a linear head, BGE-M3 semantics.

::

    H = encoder(input_ids, attention_mask).last_hidden_state   # (B, L, hidden)
    E = head(H[:, 1:])                                          # drop CLS; Linear has a bias
    E = E * mask[:, 1:, None]                                   # padding -> 0
    E = normalize(E, dim=-1)                                    # L2, after masking

SEP stays on both sides; there are no [Q]/[D] markers, no query expansion, no punctuation mask.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ColBERT(nn.Module):
    """Encoder + ``Linear(hidden, colbert_dim)`` head producing normalised token vectors."""

    def __init__(self, encoder: nn.Module, head: nn.Linear) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = head

    @property
    def colbert_dim(self) -> int:
        return self.head.out_features

    @property
    def hidden_size(self) -> int:
        return self.head.in_features

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Token embeddings of a batch.

        input_ids, attention_mask: (B, L), CLS first.
        Returns (embeddings (B, L-1, colbert_dim) L2-normalised with zeros at padding,
        mask (B, L-1)).
        """
        hidden = self.encoder(
            input_ids=input_ids, attention_mask=attention_mask
        ).last_hidden_state  # (B, L, H)
        mask = attention_mask[:, 1:]  # (B, L-1)
        embeddings = self.head(hidden[:, 1:])  # (B, L-1, D)
        embeddings = embeddings * mask.unsqueeze(-1).to(embeddings.dtype)
        # Normalise in float32: bf16/fp16 norms lose digits the score is sensitive to.
        embeddings = F.normalize(embeddings.float(), dim=-1)
        return embeddings, mask


def fresh_head(hidden_size: int, colbert_dim: int, seed: int = 0) -> nn.Linear:
    """A new head, reproducible from ``seed``.

    Semi-orthogonal weight and zero bias: the projection keeps the encoder's token geometry
    (inner products are roughly preserved), so an untrained head already ranks sensibly.
    """
    head = nn.Linear(hidden_size, colbert_dim, bias=True)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        weight = torch.empty(colbert_dim, hidden_size)
        nn.init.orthogonal_(weight, generator=generator)
        head.weight.copy_(weight)
        head.bias.zero_()
    return head
