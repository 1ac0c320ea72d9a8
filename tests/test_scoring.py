"""MaxSim as pure tensor functions, against values computed by hand."""

from __future__ import annotations

import pytest
import torch

from colbertkit.scoring import maxsim_matrix, maxsim_pairs


def unit(*values: float) -> list[float]:
    norm = sum(v * v for v in values) ** 0.5
    return [v / norm for v in values]


# Query: two real tokens and one padding row. Document: two real tokens and one padding row
# that would win every max if it were not masked.
QUERY = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]])
QUERY_MASK = torch.tensor([[1, 1, 0]])
DOCUMENT = torch.tensor([[unit(3, 4), unit(-1, 0), [0.0, 0.0]]])
DOCUMENT_MASK = torch.tensor([[1, 1, 0]])


def test_maxsim_pairs_matches_hand_computation():
    # token 1: max(0.6, -1.0) = 0.6 ; token 2: max(0.8, 0.0) = 0.8 ; mean over 2 real tokens
    score = maxsim_pairs(QUERY, QUERY_MASK, DOCUMENT, DOCUMENT_MASK)
    assert score.shape == (1,)
    assert score.item() == pytest.approx((0.6 + 0.8) / 2)


def test_padding_in_document_never_wins_the_max():
    # All real similarities negative: the masked zero row must not lift them to 0.
    query = torch.tensor([[[1.0, 0.0]]])
    document = torch.tensor([[unit(-1, 1), unit(-1, -2), [0.0, 0.0]]])
    score = maxsim_pairs(query, torch.tensor([[1]]), document, torch.tensor([[1, 1, 0]]))
    # max(-1/sqrt(2), -1/sqrt(5)) = -1/sqrt(5)
    assert score.item() == pytest.approx(-(5**-0.5))


def test_pad_floor_reproduces_zero_vectors_in_the_max():
    query = torch.tensor([[[1.0, 0.0]]])
    document = torch.tensor([[unit(-1, 1), unit(-1, -2), [0.0, 0.0]]])
    mask = torch.tensor([[1, 1, 0]])
    # 2 real vectors < padded length 3: the reference's zero padding floors the max at 0.
    assert maxsim_pairs(query, torch.tensor([[1]]), document, mask, pad_to_length=3).item() == 0.0
    # A passage that fills the padded length has no zero vector: no floor.
    full = maxsim_pairs(query, torch.tensor([[1]]), document, mask, pad_to_length=2).item()
    assert full == pytest.approx(-(5**-0.5))


def test_matrix_agrees_with_pairs_and_has_query_by_document_shape():
    torch.manual_seed(0)
    queries = torch.nn.functional.normalize(torch.randn(3, 5, 4), dim=-1)
    queries_mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    documents = torch.nn.functional.normalize(torch.randn(4, 7, 4), dim=-1)
    documents_mask = torch.tensor(
        [[1] * 7, [1, 1, 0, 0, 0, 0, 0], [1, 1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1, 0]]
    )
    matrix = maxsim_matrix(queries, queries_mask, documents, documents_mask)
    assert matrix.shape == (3, 4)
    for q in range(3):
        for p in range(4):
            pair = maxsim_pairs(
                queries[q : q + 1],
                queries_mask[q : q + 1],
                documents[p : p + 1],
                documents_mask[p : p + 1],
            )
            assert matrix[q, p].item() == pytest.approx(pair.item(), abs=1e-6)


def test_score_ignores_padding_length():
    torch.manual_seed(1)
    query = torch.nn.functional.normalize(torch.randn(1, 3, 8), dim=-1)
    document = torch.nn.functional.normalize(torch.randn(1, 4, 8), dim=-1)
    base = maxsim_pairs(query, torch.ones(1, 3), document, torch.ones(1, 4))
    padded_query = torch.cat([query, torch.randn(1, 5, 8)], dim=1)  # garbage, masked out
    padded_document = torch.cat([document, torch.randn(1, 9, 8)], dim=1)
    padded = maxsim_pairs(
        padded_query,
        torch.tensor([[1, 1, 1] + [0] * 5]),
        padded_document,
        torch.tensor([[1, 1, 1, 1] + [0] * 9]),
    )
    assert padded.item() == pytest.approx(base.item(), abs=1e-6)
