"""Shared fixtures: a tiny BERT + WordPiece tokenizer + head, saved in every layout.

Nothing here downloads: the model is built from a config, the vocabulary is written by hand.
"""

from __future__ import annotations

import json
import os
import string
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
# One compute thread per process (before torch is imported; the commands the tests start
# inherit it, and colbertkit's launches honour it): the suite runs on two pytest-xdist workers
# (pyproject's addopts), and two workers each spinning two OpenMP threads on two cores would
# oversubscribe them.
os.environ.setdefault("OMP_NUM_THREADS", "1")

# The README's commands run in order in one workspace and take the longest: collected first,
# so that one worker starts on them while the other takes everything else.
FIRST = ("test_readme.py", "test_journeys.py")


def pytest_collection_modifyitems(config, items):
    def position(item) -> int:
        name = item.path.name
        return FIRST.index(name) if name in FIRST else len(FIRST)

    items.sort(key=position)  # stable: the order inside each file is kept


_WORD_TEXT = """
the a an of to in and is are was for on with by at from what how why who when where
which does do can cat cats dog dogs fish bird animal animals pet pets eat eats food
milk water river sea ocean boat ship sail swim run fast slow big small red blue green
sky sun moon star night day paris france london england city capital country europe
python code program computer language model retrieval search query passage document
score rank train data test good bad new old time year people world music song play game
ball team win history science physics chemistry math number one two three four
"""
WORDS = _WORD_TEXT.split()

COLBERT_DIM = 16
HIDDEN = 32


def build_vocab() -> list[str]:
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    chars = list(string.ascii_lowercase + string.digits + string.punctuation)
    pieces = ["##" + c for c in string.ascii_lowercase + string.digits]
    return specials + chars + pieces + sorted(set(WORDS) - set(chars))


def _build_tiny():
    import torch
    from transformers import BertConfig, BertModel, BertTokenizer

    vocab = build_vocab()
    tokenizer = BertTokenizer(vocab={token: i for i, token in enumerate(vocab)}, do_lower_case=True)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=512,
    )
    torch.manual_seed(0)
    encoder = BertModel(config).eval()
    head = torch.nn.Linear(HIDDEN, COLBERT_DIM)
    return encoder, tokenizer, head


@pytest.fixture(scope="session")
def tiny_parts():
    """(encoder, tokenizer, head) of the tiny model, in memory."""
    return _build_tiny()


@pytest.fixture(scope="session")
def encoder_dir(tmp_path_factory, tiny_parts) -> Path:
    """A bare Hugging Face encoder directory (safetensors), no ColBERT head."""
    encoder, tokenizer, _ = tiny_parts
    path = tmp_path_factory.mktemp("encoder")
    encoder.save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    return path


@pytest.fixture(scope="session")
def reference_dir(tmp_path_factory, tiny_parts) -> Path:
    """The reference layout: encoder (model.safetensors) + colbert_linear.pt."""
    import torch

    encoder, tokenizer, head = tiny_parts
    path = tmp_path_factory.mktemp("reference")
    encoder.save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    torch.save(head.state_dict(), path / "colbert_linear.pt")
    return path


@pytest.fixture(scope="session")
def reference_bin_dir(tmp_path_factory, tiny_parts) -> Path:
    """The older reference layout: pytorch_model.bin + colbert_linear.pt."""
    import torch

    encoder, tokenizer, head = tiny_parts
    path = tmp_path_factory.mktemp("reference_bin")
    encoder.config.save_pretrained(str(path))
    torch.save(encoder.state_dict(), path / "pytorch_model.bin")
    tokenizer.save_pretrained(str(path))
    torch.save(head.state_dict(), path / "colbert_linear.pt")
    return path


@pytest.fixture(scope="session")
def colbertkit_dir(tmp_path_factory, tiny_parts) -> Path:
    """colbertkit's own layout, written by save_checkpoint."""
    from colbertkit.checkpoint import save_checkpoint
    from colbertkit.model import ColBERT

    encoder, tokenizer, head = tiny_parts
    path = tmp_path_factory.mktemp("ck") / "model"
    save_checkpoint(ColBERT(encoder, head), tokenizer, path, query_max_len=32, passage_max_len=64)
    return path


def write_training_rows(path: Path, count: int) -> Path:
    words = sorted(set(WORDS))
    rows = []
    for i in range(count):
        query = " ".join(words[(i * 7 + k) % len(words)] for k in range(2))
        rows.append(
            {
                "query": query,
                "pos": [query + " " + " ".join(words[(i * 3 + k) % len(words)] for k in range(4))],
                "neg": [
                    " ".join(words[(i * 5 + j + k) % len(words)] for k in range(5))
                    for j in range(3)
                ],
            }
        )
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture(scope="session")
def training_run(tmp_path_factory, colbertkit_dir) -> Path:
    """A real run of the training engine: 2 steps, a checkpoint at step 2, the final model."""
    from colbertkit.training import train

    root = tmp_path_factory.mktemp("train")
    config = {
        "model": str(colbertkit_dir),
        "dataset": str(write_training_rows(root / "train.jsonl", 8)),
        "output_dir": str(root / "run"),
        "batch_size": 4,
        "neg_nums": 2,
        "max_steps": 2,
        "save_steps": 2,
        "lr": 1e-2,
        "query_max_len": 16,
        "passage_max_len": 24,
        "progress_bar": False,
        "seed": 3,
    }
    result = train(config)
    return result.output_dir


@pytest.fixture(scope="session")
def training_checkpoint(training_run) -> Path:
    (checkpoint,) = sorted((training_run / "checkpoints").iterdir())
    return checkpoint


@pytest.fixture(scope="session")
def cross_encoder_dir(tmp_path_factory) -> Path:
    """A tiny BertForSequenceClassification (one label): a cross-encoder, e.g. a teacher."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    _, tokenizer, _ = _build_tiny()
    config = BertConfig(
        vocab_size=len(build_vocab()),
        hidden_size=HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=512,
        num_labels=1,
    )
    torch.manual_seed(1)
    model = BertForSequenceClassification(config).eval()
    path = tmp_path_factory.mktemp("cross_encoder")
    model.save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    return path
