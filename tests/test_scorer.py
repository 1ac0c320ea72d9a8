"""The batched pair scorer against independent computations of the same formula."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from colbertkit.checkpoint import load_checkpoint
from colbertkit.model import ColBERT
from colbertkit.scorer import PairScorer

PAIRS = [
    ("what is the capital of france", "paris is the capital of france"),
    ("what is the capital of france", "the cat eats fish"),
    ("how do fish swim", "fish swim in the sea and the river with small fins"),
    ("how do fish swim", "paris is the capital of france"),
    ("dogs", "a big red dog and a small blue dog play with a ball in the park at night"),
    ("who won the game", "the team won the game"),
]


@pytest.fixture(scope="module")
def loaded(reference_dir):
    return load_checkpoint(reference_dir)


def independent_score(encoder, head, tokenizer, query, passage, max_q=128, max_p=512):
    """One pair, no batching, no padding: the formula written out directly."""

    def vectors(text, max_len):
        encoded = tokenizer(text, truncation=True, max_length=max_len, return_tensors="pt")
        hidden = encoder(
            input_ids=encoded["input_ids"], attention_mask=encoded["attention_mask"]
        ).last_hidden_state[0]
        return F.normalize(head(hidden[1:]), dim=-1)  # drop CLS, no padding to mask

    with torch.no_grad():
        q = vectors(query, max_q)
        d = vectors(passage, max_p)
        return (q @ d.T).max(dim=1).values.sum().item() / q.shape[0]


def reference_padded_score(encoder, head, tokenizer, query, passage, max_q, max_p):
    """The reference: pad both sides to max length; zero vectors take part in the max."""

    def vectors(text, max_len):
        encoded = tokenizer(
            text, truncation=True, max_length=max_len, padding="max_length", return_tensors="pt"
        )
        hidden = encoder(
            input_ids=encoded["input_ids"], attention_mask=encoded["attention_mask"]
        ).last_hidden_state
        mask = encoded["attention_mask"][:, 1:]
        vectors = head(hidden[:, 1:]) * mask[:, :, None]
        return F.normalize(vectors, dim=-1)[0], mask[0]

    with torch.no_grad():
        q, q_mask = vectors(query, max_q)
        d, _ = vectors(passage, max_p)
        return ((q @ d.T).max(dim=1).values.sum() / q_mask.sum()).item()


def make_scorer(loaded, **options):
    defaults = dict(query_max_len=128, passage_max_len=512, batch_size=4)
    defaults.update(options)
    return PairScorer(loaded.model, loaded.tokenizer, **defaults)


def test_scores_match_independent_per_pair_computation(loaded, tiny_parts):
    encoder, tokenizer, head = tiny_parts
    scores = list(make_scorer(loaded).score(PAIRS))
    expected = [independent_score(encoder, head, tokenizer, q, p) for q, p in PAIRS]
    assert scores == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize("batch_size", [1, 2, 3, 64])
@pytest.mark.parametrize("window", [1, 2, 5, 4096])
def test_scores_do_not_depend_on_batch_size_window_or_batch_mates(loaded, batch_size, window):
    base = list(make_scorer(loaded, batch_size=1, window=1).score(PAIRS))
    scores = list(make_scorer(loaded, batch_size=batch_size, window=window).score(PAIRS))
    assert scores == pytest.approx(base, abs=1e-5)
    # Each pair alone (no batch-mates at all) gives the same score too.
    alone = [next(make_scorer(loaded).score([pair])) for pair in PAIRS]
    assert alone == pytest.approx(base, abs=1e-5)


@pytest.fixture(scope="module")
def centred(tiny_parts):
    """The tiny model with a head that centres its vectors, so that many similarities are
    negative (the random BERT's vectors all point one way) and the floor matters."""
    encoder, tokenizer, head = tiny_parts
    centred_head = torch.nn.Linear(head.in_features, head.out_features)
    with torch.no_grad():
        texts = [text for pair in PAIRS for text in pair]
        encoded = tokenizer(texts, padding=True, return_tensors="pt")
        hidden = encoder(**encoded).last_hidden_state[encoded["attention_mask"].bool()]
        centred_head.weight.copy_(head.weight)
        centred_head.bias.copy_(-head.weight @ hidden.mean(dim=0))
    return encoder, tokenizer, centred_head


def test_pad_floor_matches_the_reference_implementation(centred):
    encoder, tokenizer, head = centred
    model = ColBERT(encoder, head).eval()
    floor = PairScorer(model, tokenizer, query_max_len=16, passage_max_len=12, pad_floor=True)
    pairs = [
        *PAIRS,
        ("what is the capital of france", "cat"),
        ("cat", "cat"),
        ("cat", "one two three four " * 10),  # fills all 12 tokens: no padding, no floor
    ]
    scores = list(floor.score(pairs))
    expected = [reference_padded_score(encoder, head, tokenizer, q, p, 16, 12) for q, p in pairs]
    assert scores == pytest.approx(expected, abs=1e-5)
    # The floor only ever raises a score, and changes some of these.
    exact_scorer = PairScorer(model, tokenizer, query_max_len=16, passage_max_len=12)
    exact = list(exact_scorer.score(pairs))
    assert all(f >= e - 1e-6 for f, e in zip(scores, exact, strict=True))
    assert any(f > e + 1e-4 for f, e in zip(scores, exact, strict=True))


def test_truncation_follows_max_lengths(loaded, tiny_parts):
    encoder, tokenizer, head = tiny_parts
    scorer = make_scorer(loaded, query_max_len=4, passage_max_len=6)
    scores = list(scorer.score(PAIRS))
    expected = [independent_score(encoder, head, tokenizer, q, p, 4, 6) for q, p in PAIRS]
    assert scores == pytest.approx(expected, abs=1e-5)


def test_encode_returns_real_token_vectors_only(loaded):
    scorer = make_scorer(loaded)
    texts = ["cat", "the big red dog"]
    vectors = scorer.encode(texts, 32)
    lengths = [len(ids) - 1 for ids in scorer.tokenize(texts, 32)]  # minus CLS
    assert [v.shape[0] for v in vectors] == lengths
    for v in vectors:
        assert torch.allclose(v.norm(dim=-1), torch.ones(v.shape[0]), atol=1e-5)


def test_ranking_sorts_within_query_keeps_query_order_and_top_k(tmp_path):
    from colbertkit.pairs import open_pairs
    from colbertkit.scorer import rank_scored_pairs

    def ranked(lines: list[str], scores: list[float], top_k=None, notes=None):
        path = tmp_path / "run.tsv"
        path.write_text("".join(lines))
        source = open_pairs(path)
        scored = zip(source.pairs(), scores, strict=True)
        note = notes.append if notes is not None else None
        return [
            (p.qid, p.pid, r) for p, r, _ in rank_scored_pairs(source, scored, top_k, note=note)
        ]

    # Grouped input (each qid's lines together) streams one query at a time.
    grouped = ["a\tq\t0\tp\n", "a\tq\t1\tp\n", "a\tq\t2\tp\n", "b\tq\t3\tp\n", "b\tq\t4\tp\n"]
    expected = [("a", "2", 1), ("a", "0", 2), ("a", "1", 3), ("b", "4", 1), ("b", "3", 2)]
    assert ranked(grouped, [0.5, 0.1, 0.9, 0.2, 0.8]) == expected
    assert ranked(grouped, [0.5, 0.1, 0.9, 0.2, 0.8], top_k=1) == [("a", "2", 1), ("b", "4", 1)]
    # Interleaved qids give the same ranking, read back from the file, and say what they hold.
    notes = []
    mixed = ["a\tq\t0\tp\n", "b\tq\t3\tp\n", "a\tq\t1\tp\n", "b\tq\t4\tp\n", "a\tq\t2\tp\n"]
    assert ranked(mixed, [0.5, 0.2, 0.1, 0.8, 0.9], notes=notes) == expected
    assert "not grouped" in notes[0]
    # Ties keep input order.
    assert ranked(grouped[:3], [0.5, 0.5, 0.5]) == [("a", "0", 1), ("a", "1", 2), ("a", "2", 3)]


def test_scoring_streams_its_input_in_windows(loaded):
    # An endless input: the scorer must yield scores without reading it to the end.
    endless = itertools.cycle(PAIRS)
    first = list(itertools.islice(make_scorer(loaded, window=4).score(endless), 2 * len(PAIRS)))
    base = list(make_scorer(loaded).score(PAIRS))
    assert first == pytest.approx(base * 2, abs=1e-5)


@pytest.mark.slow
def test_each_window_scores_the_same_bits_alone_or_in_a_stream():
    # What scoring across processes relies on: a window's scores do not depend on the windows
    # before it (no vectors carried over), so any process scores it to the same bits. A real
    # model (MiniLM) is needed: the tiny one's vectors do not change bits with batch-mates.
    loaded = load_checkpoint("sentence-transformers/all-MiniLM-L6-v2", fresh_head=True)
    queries = [
        "what is the capital of france and how big is it",
        "how do fish swim",
        "cats",
        "who won the world cup in football last year",
    ]
    passages = [
        "paris is the capital of france",
        "fish swim with fins in the sea and rivers",
        "a cat is a small animal",
        "the team won the final",
        "music and history of europe",
    ]
    pairs = [(query, passage) for query in queries for passage in passages]  # 5 per query
    stream = list(make_scorer(loaded, window=3).score(pairs))  # queries cross window borders
    for start in range(0, len(pairs), 3):
        alone = list(make_scorer(loaded, window=3).score(pairs[start : start + 3]))
        assert alone == stream[start : start + 3]


def test_an_input_error_in_a_later_window_reaches_the_caller(loaded):
    # The next window is read in a background thread; its errors must still surface, after the
    # windows before it were scored.
    from colbertkit.errors import InputError

    def pairs():
        yield from PAIRS[:4]
        raise InputError("pairs.tsv", 5, "empty passage", "write a passage")

    scores = make_scorer(loaded, window=4).score(pairs())
    assert len([next(scores) for _ in range(4)]) == 4
    with pytest.raises(InputError, match=r"pairs.tsv:5"):
        next(scores)


def test_bf16_encoder_still_gives_float32_unit_vectors_and_close_scores(reference_dir):
    # MaxSim and the normalisation stay in float32 whatever the encoder runs in.
    fp32 = load_checkpoint(reference_dir)
    bf16 = load_checkpoint(reference_dir, dtype=torch.bfloat16)
    layer_dtypes = []
    hook = bf16.model.encoder.encoder.layer[0].register_forward_hook(
        lambda module, args, output: layer_dtypes.append(
            (output[0] if isinstance(output, tuple) else output).dtype
        )
    )
    encoded = bf16.tokenizer(["the cat eats fish"], return_tensors="pt")
    with torch.inference_mode():
        embeddings, mask = bf16.model(encoded["input_ids"], encoded["attention_mask"])
    hook.remove()
    assert layer_dtypes == [torch.bfloat16]
    assert embeddings.dtype == torch.float32
    norms = embeddings[mask.bool()].norm(dim=-1)
    assert torch.allclose(norms, torch.ones_like(norms), atol=1e-6)
    exact = list(make_scorer(fp32).score(PAIRS))
    approximate = list(make_scorer(bf16).score(PAIRS))
    assert approximate != exact  # it really ran in bf16
    assert approximate == pytest.approx(exact, abs=2e-2)


def test_score_pairs_auto_runs_what_resolve_dtype_chose(reference_dir):
    from colbertkit.precision import resolve_dtype
    from colbertkit.scorer import load_scorer, score_pairs

    chosen, _ = resolve_dtype("auto", "cpu")
    auto = load_scorer(str(reference_dir), device="cpu", dtype="auto")
    assert auto.dtype == chosen
    assert (
        next(auto.loaded.model.encoder.parameters()).dtype
        == {
            "fp32": torch.float32,
            "bf16": torch.bfloat16,
        }[chosen]
    )
    assert auto.describe().startswith(f"cpu ({chosen}, ")
    assert score_pairs(str(reference_dir), PAIRS, device="cpu", dtype="auto") == score_pairs(
        str(reference_dir), PAIRS, device="cpu", dtype=chosen
    )


@pytest.mark.slow
def test_score_pairs_on_two_processes_gives_the_same_scores(colbertkit_dir):
    from colbertkit.scorer import score_pairs

    pairs = [*PAIRS, *PAIRS[::-1], *PAIRS[1::2]]  # 15 pairs: windows of 4 over 2 processes
    # Each of 2 CPU processes computes with half the cores; rounding depends on the threads
    # that split a product, so the one-process run uses as many.
    from colbertkit.launcher import cpu_threads_for

    threads = torch.get_num_threads()
    torch.set_num_threads(cpu_threads_for(2, gpu=False))
    try:
        alone = score_pairs(str(colbertkit_dir), pairs, device="cpu", window=4)
    finally:
        torch.set_num_threads(threads)
    together = score_pairs(str(colbertkit_dir), pairs, device="cpu", window=4, num_processes=2)
    assert together == alone
