"""The losses: hand-computed values, independent computations, GradCache == plain, masking."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from colbertkit.collate import length_sorted_chunks
from colbertkit.losses import (
    concat_padded,
    contrastive_logits,
    contrastive_loss,
    gather_passages,
    grad_cache_backward,
    grouped_positive_columns,
    grouped_scores,
    kl_distillation_loss,
    kl_divergence_from_scores,
    plain_backward,
    query_positive_mask,
    reassemble,
)
from colbertkit.scoring import maxsim_matrix


def _unit(*values: float) -> list[float]:
    norm = math.sqrt(sum(v * v for v in values))
    return [v / norm for v in values]


def test_hand_computed_two_passages():
    # One query token [1, 0]; positive token [1, 0] (sim 1), negative token [0.6, 0.8] (sim 0.6).
    queries = torch.tensor([[[1.0, 0.0]]])
    queries_mask = torch.ones(1, 1)
    passages = torch.tensor([[[1.0, 0.0]], [[0.6, 0.8]]])
    passages_mask = torch.ones(2, 1)
    positive_columns, is_positive = grouped_positive_columns(1, 2)
    loss = contrastive_loss(
        queries,
        queries_mask,
        passages,
        passages_mask,
        positive_columns,
        is_positive,
        temperature=0.1,
    )
    # CE = log(1 + exp((0.6 - 1) / 0.1))
    assert loss.item() == pytest.approx(math.log1p(math.exp(-4.0)), rel=1e-5)


def _maxsim_by_hand(
    query: torch.Tensor, query_len: int, passage: torch.Tensor, passage_len: int
) -> float:
    total = 0.0
    for i in range(query_len):
        total += max(float(query[i] @ passage[j]) for j in range(passage_len))
    return total / query_len


def _reference_loss(queries, query_lens, passages, passage_lens, group_size, temperature, others):
    """The reference loss written out with Python loops: [s(q, pos), s(q, every hard negative
    in the batch) (+ other positives)] / temperature, cross-entropy with label 0."""
    num_queries = len(query_lens)
    negatives = [p for p in range(len(passage_lens)) if p % group_size != 0]
    positives = [q * group_size for q in range(num_queries)]
    total = 0.0
    for q in range(num_queries):
        columns = [positives[q], *negatives]
        if others:
            columns += [p for p in positives if p != positives[q]]
        logits = torch.tensor(
            [
                _maxsim_by_hand(queries[q], query_lens[q], passages[p], passage_lens[p])
                / temperature
                for p in columns
            ],
            dtype=torch.float64,
        )
        total += float(-torch.log_softmax(logits, dim=0)[0])
    return total / num_queries


def _random_batch(seed: int, num_queries: int = 3, group_size: int = 4, dim: int = 8):
    generator = torch.Generator().manual_seed(seed)
    query_lens = torch.randint(2, 6, (num_queries,), generator=generator).tolist()
    passage_lens = torch.randint(1, 9, (num_queries * group_size,), generator=generator).tolist()

    def padded(lengths: list[int]):
        longest = max(lengths) + 2  # extra padding that must not matter
        embeddings = F.normalize(
            torch.randn(len(lengths), longest, dim, generator=generator), dim=-1
        )
        mask = torch.zeros(len(lengths), longest)
        for row, length in enumerate(lengths):
            mask[row, :length] = 1
        return embeddings * mask[..., None], mask

    return query_lens, passage_lens, padded(query_lens), padded(passage_lens)


@pytest.mark.parametrize("others", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_loss_equals_independent_computation(seed, others):
    group_size = 4
    query_lens, passage_lens, (queries, queries_mask), (passages, passages_mask) = _random_batch(
        seed, group_size=group_size
    )
    positive_columns, is_positive = grouped_positive_columns(len(query_lens), group_size)
    loss = contrastive_loss(
        queries, queries_mask, passages, passages_mask, positive_columns, is_positive,
        temperature=0.05, other_positives_as_negatives=others,
    )  # fmt: skip
    expected = _reference_loss(
        queries, query_lens, passages, passage_lens, group_size, 0.05, others
    )
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_other_positives_are_excluded_by_default():
    _, _, (queries, queries_mask), (passages, passages_mask) = _random_batch(3)
    positive_columns, is_positive = grouped_positive_columns(3, 4)
    logits = contrastive_logits(
        queries,
        queries_mask,
        passages,
        passages_mask,
        positive_columns,
        is_positive,
        temperature=1.0,
    )  # (3, 12)
    assert torch.isinf(logits[0, 4]) and torch.isinf(logits[0, 8])
    assert torch.isfinite(logits[0, 0]) and torch.isfinite(logits[0, 1:4]).all()
    assert torch.isfinite(logits[:, ~is_positive]).all()


def test_loss_does_not_depend_on_padding_or_order():
    _, _, (queries, queries_mask), (passages, passages_mask) = _random_batch(4)
    positive_columns, is_positive = grouped_positive_columns(3, 4)
    args = dict(temperature=0.02)
    base = contrastive_loss(
        queries, queries_mask, passages, passages_mask, positive_columns, is_positive, **args
    )
    padded = concat_padded([(passages, passages_mask), (passages[:0], passages_mask[:0])])
    more = (
        torch.nn.functional.pad(passages, (0, 0, 0, 5)),
        torch.nn.functional.pad(passages_mask, (0, 5)),
    )
    assert padded[0].shape == passages.shape
    again = contrastive_loss(queries, queries_mask, *more, positive_columns, is_positive, **args)
    assert again.item() == pytest.approx(base.item(), rel=1e-6)
    # Moving each group's positive to the end changes nothing but the column index.
    permutation = torch.tensor([g * 4 + i for g in range(3) for i in (1, 2, 3, 0)])
    moved_is_positive = is_positive[permutation]
    moved_columns = torch.nonzero(moved_is_positive).squeeze(1)
    moved = contrastive_loss(
        queries, queries_mask, passages[permutation], passages_mask[permutation],
        moved_columns, moved_is_positive, **args,
    )  # fmt: skip
    assert moved.item() == pytest.approx(base.item(), rel=1e-6)


def test_gather_without_a_process_group_is_identity():
    _, _, _, (passages, passages_mask) = _random_batch(5)
    positive_columns, is_positive = grouped_positive_columns(3, 4)
    out = gather_passages(passages, passages_mask, positive_columns, is_positive)
    assert out[0] is passages and out[2] is positive_columns


def test_length_sorted_chunks_and_reassemble_round_trip():
    sequences = [[2, 5, 3], [2, 3], [2, 7, 7, 7, 7, 3], [2, 9, 3], [2, 3]]
    chunks = length_sorted_chunks(sequences, chunk_size=2, pad_id=0, multiple_of=4)
    assert [chunk.input_ids.shape for chunk in chunks] == [(2, 8), (2, 4), (1, 4)]
    outputs = [(chunk.input_ids[..., None].float(), chunk.attention_mask) for chunk in chunks]
    embeddings, mask = reassemble(outputs, chunks)
    for row, ids in enumerate(sequences):
        assert embeddings[row, : len(ids), 0].tolist() == ids
        assert mask[row].sum() == len(ids)


# --------------------------------------------------------------------------------------------
# GradCache == plain, on the tiny BERT (dropout on: GradCache replays the RNG)
# --------------------------------------------------------------------------------------------


def _model_and_batch(tiny_parts):
    import copy

    from colbertkit.model import ColBERT

    encoder, tokenizer, head = tiny_parts
    model = ColBERT(copy.deepcopy(encoder), copy.deepcopy(head)).train()
    queries = ["what is the capital of france", "how do fish swim", "cats eat fish"]
    passages = [
        "paris is the capital of france", "london is a city", "the sun", "music and songs play",
        "fish swim in the sea with a boat", "a dog", "red blue green", "the night sky has stars",
        "the cat eats fish and drinks milk", "python code", "big ship", "history of science",
    ]  # fmt: skip
    tokenize = lambda texts: tokenizer(texts, add_special_tokens=True)["input_ids"]  # noqa: E731
    return model, tokenize(queries), tokenize(passages)


def _assert_gradients_close(actual, expected, tolerance):
    """Each gradient within ``tolerance`` x its largest entry (sums in another order differ in
    the last bits, and tiny entries next to large ones make elementwise rtol meaningless)."""
    assert actual.keys() == expected.keys()
    for name, grad in expected.items():
        scale = float(grad.abs().max()) or 1.0
        difference = float((actual[name] - grad).abs().max())
        # key biases have a zero gradient in exact arithmetic (softmax shift invariance): noise.
        assert difference <= tolerance * scale + 1e-8, f"{name}: {difference} vs scale {scale}"


def _gradients_of(model, run) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1234)
    loss = run()
    return float(loss), {
        n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None
    }


@pytest.mark.parametrize("chunk_size", [1, 2, 5])
def test_grad_cache_equals_plain_loss_and_gradients(tiny_parts, chunk_size):
    model, queries, passages = _model_and_batch(tiny_parts)
    positive_columns, is_positive = grouped_positive_columns(3, 4)

    def loss_fn(q, qm, p, pm):
        return contrastive_loss(q, qm, p, pm, positive_columns, is_positive, temperature=0.02)

    def encode(chunks):
        return [model(chunk.input_ids, chunk.attention_mask) for chunk in chunks]

    def chunks(size):
        return (
            length_sorted_chunks(queries, chunk_size=size, pad_id=0),
            length_sorted_chunks(passages, chunk_size=size, pad_id=0),
        )

    plain_loss, plain_grads = _gradients_of(
        model, lambda: plain_backward(encode, *chunks(None), loss_fn, lambda t: t.backward())
    )
    cached_loss, cached_grads = _gradients_of(
        model,
        lambda: grad_cache_backward(encode, *chunks(chunk_size), loss_fn, lambda t: t.backward()),
    )
    # Chunked plain encoding (same chunks as GradCache, with gradients) is the exact twin.
    chunked_loss, chunked_grads = _gradients_of(
        model, lambda: plain_backward(encode, *chunks(chunk_size), loss_fn, lambda t: t.backward())
    )
    assert cached_loss == pytest.approx(chunked_loss, rel=1e-6)
    _assert_gradients_close(cached_grads, chunked_grads, 1e-5)
    # Against the one-batch plain step: equal up to float noise (padding changes nothing, and
    # dropout is off in eval mode for this comparison).
    model.eval()
    plain_loss, plain_grads = _gradients_of(
        model, lambda: plain_backward(encode, *chunks(None), loss_fn, lambda t: t.backward())
    )
    cached_loss, cached_grads = _gradients_of(
        model,
        lambda: grad_cache_backward(encode, *chunks(chunk_size), loss_fn, lambda t: t.backward()),
    )
    assert cached_loss == pytest.approx(plain_loss, rel=1e-5)
    _assert_gradients_close(cached_grads, plain_grads, 1e-4)


def test_grad_cache_replays_dropout(tiny_parts):
    """With dropout on, the second pass must see the first pass's masks: GradCache then equals
    plain encoding of the same chunks, and differs from a run without replay."""
    model, queries, passages = _model_and_batch(tiny_parts)
    positive_columns, is_positive = grouped_positive_columns(3, 4)

    def loss_fn(q, qm, p, pm):
        return contrastive_loss(q, qm, p, pm, positive_columns, is_positive, temperature=0.02)

    def encode(chunks):
        return [model(chunk.input_ids, chunk.attention_mask) for chunk in chunks]

    query_chunks = length_sorted_chunks(queries, chunk_size=2, pad_id=0)
    passage_chunks = length_sorted_chunks(passages, chunk_size=2, pad_id=0)
    torch.manual_seed(7)
    first = grad_cache_backward(
        encode, query_chunks, passage_chunks, loss_fn, lambda t: t.backward()
    )
    state_after = torch.get_rng_state()
    torch.manual_seed(7)
    again = grad_cache_backward(
        encode, query_chunks, passage_chunks, loss_fn, lambda t: t.backward()
    )
    assert float(first) == float(again)
    assert torch.equal(torch.get_rng_state(), state_after)


# --------------------------------------------------------------------------------------------
# Positives of the same query are never its negatives (by text)
# --------------------------------------------------------------------------------------------


def test_query_positive_mask_matches_texts():
    from colbertkit.collate import text_fingerprint

    passages = ["paris", "london", "rome", "paris", "berlin"]
    positives = [["paris", "rome"], ["berlin"]]
    passage_fingerprints = torch.tensor([text_fingerprint(t) for t in passages])
    table = torch.zeros(2, 2, dtype=torch.long)
    for row, texts in enumerate(positives):
        table[row, : len(texts)] = torch.tensor([text_fingerprint(t) for t in texts])
    mask = query_positive_mask(passage_fingerprints, table)
    assert mask.tolist() == [
        [True, False, True, True, False],
        [False, False, False, False, True],
    ]


@pytest.mark.parametrize("others", [False, True])
def test_second_positive_of_the_same_query_is_not_a_negative(others):
    """Two examples of one query (positives at columns 0 and 4) and one of another (column 8):
    neither positive of the first query may be a negative of the other example of it, whatever
    ``other_positives_as_negatives`` says; the other query's positive is one only when asked."""
    _, _, (queries, queries_mask), (passages, passages_mask) = _random_batch(6)
    positive_columns, is_positive = grouped_positive_columns(3, 4)
    query_positives = torch.zeros(3, 12, dtype=torch.bool)
    query_positives[0, [0, 4]] = query_positives[1, [0, 4]] = True
    query_positives[2, 8] = True
    logits = contrastive_logits(
        queries, queries_mask, passages, passages_mask, positive_columns, is_positive,
        temperature=0.05, other_positives_as_negatives=others, query_positives=query_positives,
    )  # fmt: skip
    assert torch.isinf(logits[0, 4]) and torch.isinf(logits[1, 0])
    assert torch.isfinite(logits[0, 0]) and torch.isfinite(logits[1, 4])
    assert torch.isfinite(logits[2, 0]) == others and torch.isfinite(logits[0, 8]) == others
    # Against the independent computation: the masked columns are simply absent.
    loss = contrastive_loss(
        queries, queries_mask, passages, passages_mask, positive_columns, is_positive,
        temperature=0.05, other_positives_as_negatives=others, query_positives=query_positives,
    )  # fmt: skip
    scores = maxsim_matrix(queries, queries_mask, passages, passages_mask).double() / 0.05
    expected = 0.0
    for q, own in enumerate(positive_columns.tolist()):
        columns = [own] + [
            p for p in range(12)
            if p != own and not query_positives[q, p] and (others or not is_positive[p])
        ]  # fmt: skip
        expected -= float(torch.log_softmax(scores[q, columns], dim=0)[0])
    assert loss.item() == pytest.approx(expected / 3, rel=1e-5)


def test_a_hard_negative_repeating_a_positive_is_masked():
    _, _, (queries, queries_mask), (passages, passages_mask) = _random_batch(7)
    positive_columns, is_positive = grouped_positive_columns(3, 4)
    query_positives = torch.zeros(3, 12, dtype=torch.bool)
    query_positives[0, [0, 2]] = True  # passage 2, a "negative" of query 0, is its positive text
    logits = contrastive_logits(
        queries, queries_mask, passages, passages_mask, positive_columns, is_positive,
        temperature=0.05, query_positives=query_positives,
    )  # fmt: skip
    assert torch.isinf(logits[0, 2]) and torch.isfinite(logits[1, 2])


# --------------------------------------------------------------------------------------------
# Distillation (KL to the teacher's distribution over each query's own passages)
# --------------------------------------------------------------------------------------------


def _kl_by_hand(queries, query_lens, passages, passage_lens, teacher, group, temperature, t_temp):
    """KL(teacher || student) per query, written out with Python loops, averaged."""
    total = 0.0
    for q in range(len(query_lens)):
        student = [
            _maxsim_by_hand(queries[q], query_lens[q], passages[p], passage_lens[p]) / temperature
            for p in range(q * group, (q + 1) * group)
        ]
        targets = [float(t) / t_temp for t in teacher[q]]
        student_norm = math.log(sum(math.exp(s) for s in student))
        teacher_norm = math.log(sum(math.exp(t) for t in targets))
        for s, t in zip(student, targets, strict=True):
            p_teacher = math.exp(t - teacher_norm)
            total += p_teacher * ((t - teacher_norm) - (s - student_norm))
    return total / len(query_lens)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize(("temperature", "teacher_temperature"), [(0.05, 0.05), (0.02, 1.0)])
def test_kl_loss_equals_independent_computation(seed, temperature, teacher_temperature):
    query_lens, passage_lens, (queries, queries_mask), (passages, passages_mask) = _random_batch(
        seed, group_size=4
    )
    teacher = torch.rand(3, 4, generator=torch.Generator().manual_seed(seed))
    loss = kl_distillation_loss(
        queries, queries_mask, passages, passages_mask, teacher,
        temperature=temperature, teacher_temperature=teacher_temperature,
    )  # fmt: skip
    expected = _kl_by_hand(
        queries, query_lens, passages, passage_lens, teacher.tolist(), 4, temperature,
        teacher_temperature,
    )  # fmt: skip
    assert loss.item() == pytest.approx(expected, rel=1e-4, abs=1e-7)


def test_kl_loss_is_zero_when_the_student_agrees_and_scores_are_grouped():
    _, _, (queries, queries_mask), (passages, passages_mask) = _random_batch(3)
    student = grouped_scores(queries, queries_mask, passages, passages_mask)  # (3, 4)
    full = maxsim_matrix(queries, queries_mask, passages, passages_mask)  # (3, 12)
    for q in range(3):
        assert torch.allclose(student[q], full[q, q * 4 : (q + 1) * 4], atol=1e-6)
    # A teacher with the student's own scores (same temperature): nothing to learn.
    loss = kl_distillation_loss(
        queries, queries_mask, passages, passages_mask, student * 2,
        temperature=0.05, teacher_temperature=0.1,
    )  # fmt: skip
    assert loss.item() == pytest.approx(0.0, abs=1e-6)
    # A shift of the teacher's scores changes nothing (a softmax is shift-invariant).
    teacher = torch.rand(3, 4)
    a = kl_divergence_from_scores(student, teacher, temperature=0.05, teacher_temperature=0.1)
    b = kl_divergence_from_scores(student, teacher + 3, temperature=0.05, teacher_temperature=0.1)
    assert a.item() == pytest.approx(b.item(), rel=1e-5)


@pytest.mark.parametrize("chunk_size", [1, 5])
def test_grad_cache_equals_plain_with_the_kl_loss(tiny_parts, chunk_size):
    model, queries, passages = _model_and_batch(tiny_parts)
    model.eval()  # dropout off: chunked and one-batch encodings are the same function
    positive_columns, is_positive = grouped_positive_columns(3, 4)
    teacher = torch.tensor([[0.9, 0.1, 0.3, 0.0], [0.8, 0.7, 0.0, 0.2], [1.0, 0.0, 0.5, 0.1]])

    def loss_fn(q, qm, p, pm):
        distillation = kl_distillation_loss(
            q, qm, p, pm, teacher, temperature=0.05, teacher_temperature=0.1
        )
        return distillation + contrastive_loss(
            q, qm, p, pm, positive_columns, is_positive, temperature=0.05
        )

    def encode(chunks):
        return [model(chunk.input_ids, chunk.attention_mask) for chunk in chunks]

    def chunks(size):
        return (
            length_sorted_chunks(queries, chunk_size=size, pad_id=0),
            length_sorted_chunks(passages, chunk_size=size, pad_id=0),
        )

    plain_loss, plain_grads = _gradients_of(
        model, lambda: plain_backward(encode, *chunks(None), loss_fn, lambda t: t.backward())
    )
    cached_loss, cached_grads = _gradients_of(
        model,
        lambda: grad_cache_backward(encode, *chunks(chunk_size), loss_fn, lambda t: t.backward()),
    )
    assert plain_loss > 0
    assert cached_loss == pytest.approx(plain_loss, rel=1e-5)
    _assert_gradients_close(cached_grads, plain_grads, 1e-4)
