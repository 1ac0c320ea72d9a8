"""Detecting and loading checkpoints in every layout, and refusing the ones we must not trust."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from colbertkit.checkpoint import (
    atomic_directory,
    detect_layout,
    load_checkpoint,
    resolve_checkpoint,
    save_checkpoint,
)
from colbertkit.errors import CheckpointError, UsageError
from colbertkit.scorer import PairScorer
from tests.conftest import COLBERT_DIM, HIDDEN

PAIRS = [("what is the capital of france", "paris is the capital of france"), ("cat", "dog")]


def scores_of(path, **options):
    loaded = load_checkpoint(path, **options)
    scorer = PairScorer(loaded.model, loaded.tokenizer, query_max_len=32, passage_max_len=64)
    return list(scorer.score(PAIRS))


@pytest.mark.parametrize(
    ("fixture", "kind", "weights", "head"),
    [
        ("reference_dir", "reference", "model.safetensors", "colbert_linear.pt"),
        ("reference_bin_dir", "reference", "pytorch_model.bin", "colbert_linear.pt"),
        ("colbertkit_dir", "colbertkit", "model.safetensors", "colbert_linear.safetensors"),
    ],
)
def test_every_layout_is_detected_and_scores_identically(request, fixture, kind, weights, head):
    path = request.getfixturevalue(fixture)
    layout = detect_layout(path)
    assert (layout.kind, layout.encoder_weights.name, layout.head_file.name) == (
        kind,
        weights,
        head,
    )
    assert scores_of(path) == pytest.approx(
        scores_of(request.getfixturevalue("reference_dir")), abs=1e-6
    )
    loaded = load_checkpoint(path)
    assert loaded.model.colbert_dim == COLBERT_DIM
    assert loaded.notes[0].startswith(f"found {kind} layout")


def test_colbertkit_metadata_records_what_a_scorer_needs(colbertkit_dir):
    metadata = json.loads((colbertkit_dir / "colbertkit.json").read_text())
    assert metadata["colbert_dim"] == COLBERT_DIM
    assert metadata["hidden_size"] == HIDDEN
    assert (metadata["query_max_len"], metadata["passage_max_len"]) == (32, 64)
    assert metadata["semantics"]["drop_cls"] is True
    assert {"colbertkit", "transformers", "torch"} <= set(metadata["versions"])
    loaded = load_checkpoint(colbertkit_dir)
    assert (loaded.query_max_len, loaded.passage_max_len) == (32, 64)
    assert not list(colbertkit_dir.glob("*.bin")) and not list(colbertkit_dir.glob("*.pt"))


def test_reference_defaults_lengths_to_128_and_512(reference_dir):
    loaded = load_checkpoint(reference_dir)
    assert (loaded.query_max_len, loaded.passage_max_len) == (128, 512)


def test_colbert_dim_flag_that_disagrees_with_the_head_names_both_numbers(reference_dir):
    # The core names its parameter; the CLI turns `colbert_dim` into --colbert-dim.
    with pytest.raises(UsageError, match=rf"`colbert_dim` 8 .*colbert_dim {COLBERT_DIM}"):
        load_checkpoint(reference_dir, colbert_dim=8)
    assert load_checkpoint(reference_dir, colbert_dim=COLBERT_DIM).model.colbert_dim == COLBERT_DIM


def test_missing_head_is_an_error_unless_a_fresh_head_is_asked(encoder_dir):
    with pytest.raises(CheckpointError, match=r"has no ColBERT head .*`fresh_head=True`"):
        load_checkpoint(encoder_dir)
    loaded = load_checkpoint(encoder_dir, fresh_head=True, colbert_dim=8, seed=3)
    assert loaded.model.colbert_dim == 8
    again = load_checkpoint(encoder_dir, fresh_head=True, colbert_dim=8, seed=3)
    assert torch.equal(loaded.model.head.weight, again.model.head.weight)
    assert any("fresh head 32 -> 8 (seed 3)" in note for note in loaded.notes)


class _Exploit:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_pickle_that_would_run_code_is_refused_not_executed(reference_dir, tmp_path):
    checkpoint = tmp_path / "evil"
    shutil.copytree(reference_dir, checkpoint)
    marker = tmp_path / "pwned"
    exploit = _Exploit()
    exploit.marker = marker
    torch.save({"weight": exploit}, checkpoint / "colbert_linear.pt")
    with pytest.raises(CheckpointError, match="refused to unpickle"):
        load_checkpoint(checkpoint)
    assert not marker.exists()


def test_a_pickled_encoder_that_would_run_code_is_refused(reference_bin_dir, tmp_path):
    checkpoint = tmp_path / "evil_bin"
    shutil.copytree(reference_bin_dir, checkpoint)
    marker = tmp_path / "pwned"
    exploit = _Exploit()
    exploit.marker = marker
    torch.save({"embeddings.word_embeddings.weight": exploit}, checkpoint / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="refused to unpickle"):
        load_checkpoint(checkpoint)
    assert not marker.exists()


def test_corrupt_safetensors_head_is_one_line_error(colbertkit_dir, tmp_path):
    checkpoint = tmp_path / "corrupt"
    shutil.copytree(colbertkit_dir, checkpoint)
    data = (checkpoint / "colbert_linear.safetensors").read_bytes()
    (checkpoint / "colbert_linear.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="not a valid safetensors file") as error:
        load_checkpoint(checkpoint)
    assert "\n" not in str(error.value)


def test_head_that_does_not_fit_the_encoder(reference_dir, tmp_path):
    checkpoint = tmp_path / "wrong_head"
    shutil.copytree(reference_dir, checkpoint)
    torch.save(torch.nn.Linear(HIDDEN + 1, 4).state_dict(), checkpoint / "colbert_linear.pt")
    with pytest.raises(
        CheckpointError, match=rf"head input size {HIDDEN + 1} .* hidden size {HIDDEN}"
    ):
        load_checkpoint(checkpoint)


def test_not_a_model_directory(tmp_path):
    with pytest.raises(CheckpointError, match=r"no config\.json"):
        load_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="no encoder weights"):
        load_checkpoint(tmp_path)


def test_hub_id_offline_is_one_line_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError, match=r"BAAI/bge-m3: .*offline") as error:
        resolve_checkpoint("BAAI/bge-m3")
    assert "\n" not in str(error.value)


def test_missing_local_path_that_is_not_a_hub_id(tmp_path):
    with pytest.raises(CheckpointError, match="no such directory"):
        resolve_checkpoint(str(tmp_path / "nope" / "deeper" / "still"))


def test_packaged_minilm_resolves_offline():
    path = resolve_checkpoint("sentence-transformers/all-MiniLM-L6-v2")
    assert (path / "config.json").is_file()
    assert detect_layout(path).kind == "encoder"


def test_remote_code_is_not_trusted_by_default(reference_dir, tmp_path):
    checkpoint = tmp_path / "remote"
    shutil.copytree(reference_dir, checkpoint)
    config = json.loads((checkpoint / "config.json").read_text())
    config["auto_map"] = {"AutoModel": "modeling_evil.EvilModel"}
    (checkpoint / "config.json").write_text(json.dumps(config))
    marker = tmp_path / "pwned"
    (checkpoint / "modeling_evil.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    with contextlib.suppress(CheckpointError):  # refusing is fine; running the file is not
        load_checkpoint(checkpoint)
    assert not marker.exists()


def test_save_refuses_to_overwrite_and_is_atomic(tiny_parts, tmp_path):
    from colbertkit.model import ColBERT

    encoder, tokenizer, head = tiny_parts
    out = tmp_path / "model"
    save_checkpoint(ColBERT(encoder, head), tokenizer, out)
    with pytest.raises(UsageError, match="already exists"):
        save_checkpoint(ColBERT(encoder, head), tokenizer, out)
    before = sorted(p.name for p in out.iterdir())

    class Boom(RuntimeError):
        pass

    with pytest.raises(Boom), atomic_directory(out) as tmp:
        (tmp / "partial").write_text("half")
        raise Boom
    assert sorted(p.name for p in out.iterdir()) == before
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no temporary left behind


def test_save_then_load_round_trip_scores_identically(reference_dir, tmp_path):
    loaded = load_checkpoint(reference_dir)
    out = save_checkpoint(loaded.model, loaded.tokenizer, tmp_path / "again")
    assert scores_of(Path(out)) == pytest.approx(scores_of(reference_dir), abs=1e-6)


def test_encoder_weights_under_other_names_are_an_error_not_random(reference_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    checkpoint = tmp_path / "renamed"
    shutil.copytree(reference_dir, checkpoint)
    state = load_file(checkpoint / "model.safetensors")
    save_file({f"foo.{k}": v for k, v in state.items()}, checkpoint / "model.safetensors")
    with pytest.raises(
        CheckpointError, match=r"encoder weights are missing from model\.safetensors"
    ):
        load_checkpoint(checkpoint)


def test_truncated_head_pickle_is_reported_as_unreadable(reference_dir, tmp_path):
    checkpoint = tmp_path / "truncated"
    shutil.copytree(reference_dir, checkpoint)
    data = (checkpoint / "colbert_linear.pt").read_bytes()
    (checkpoint / "colbert_linear.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cannot read it"):
        load_checkpoint(checkpoint)
