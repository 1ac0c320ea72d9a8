"""``export_model``: every layout in, both layouts out, dtypes, verification, and the refusals.

Score equality is checked with the scorer users run (``load_checkpoint`` + ``PairScorer``), so
an export is only "equal" if colbertkit itself reads it back and scores it the same.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import pickle
import shutil
import socket
import subprocess
import sys
import textwrap
import weakref
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from colbertkit import export as export_module
from colbertkit.checkpoint import detect_layout, load_checkpoint
from colbertkit.checkpoint.sharded import load_dcp_metadata
from colbertkit.checkpoint.tensors import TensorEntry, write_safetensors
from colbertkit.errors import CheckpointError, UsageError
from colbertkit.export import (
    SAMPLE_PAIRS,
    TOLERANCES,
    ExportError,
    VerificationError,
    export_model,
)
from colbertkit.scorer import PairScorer
from tests.conftest import COLBERT_DIM, HIDDEN

REPO = Path(__file__).resolve().parents[1]
PAIRS = [
    ("what is the capital of france", "paris is the capital of france"),
    ("cat", "dog"),
    ("how do fish swim", "fish swim in the sea and the river"),
]


def scores_of(path: Path) -> list[float]:
    loaded = load_checkpoint(path)
    scorer = PairScorer(loaded.model, loaded.tokenizer, query_max_len=32, passage_max_len=64)
    return list(scorer.score(PAIRS))


def encoder_tensors(path: Path) -> dict[str, torch.Tensor]:
    """The encoder weights of any layout, read with the libraries (not with export's reader)."""
    layout = detect_layout(path)
    if layout.encoder_weights.suffix == ".safetensors":
        return load_file(str(layout.encoder_weights))
    return torch.load(layout.encoder_weights, weights_only=True)


def head_tensors(path: Path) -> dict[str, torch.Tensor]:
    from colbertkit.checkpoint import load_head_state

    return load_head_state(detect_layout(path).head_file)


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert torch.equal(a[name], b[name]), name


def leftovers(parent: Path) -> list[str]:
    """Hidden temporary directories that a failed export must not leave behind."""
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


class _Exploit:
    """Unpickling this runs ``touch marker``: what a malicious checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


# --------------------------------------------------------------------------------------------
# Checkpoints the fixtures in conftest do not have
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bge_m3_dir(tmp_path_factory, reference_bin_dir) -> Path:
    """BGE-M3's layout: pytorch_model.bin + colbert_linear.pt + sparse_linear.pt + extras."""
    path = tmp_path_factory.mktemp("bge") / "bge-m3"
    shutil.copytree(reference_bin_dir, path)
    torch.save(torch.nn.Linear(HIDDEN, 1).state_dict(), path / "sparse_linear.pt")
    (path / "1_Pooling").mkdir()
    (path / "1_Pooling" / "config.json").write_text('{"pooling_mode_cls_token": true}')
    (path / "modules.json").write_text("[]")
    return path


# --------------------------------------------------------------------------------------------
# Round trips
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["colbertkit", "reference"])
@pytest.mark.parametrize(
    "fixture", ["reference_dir", "reference_bin_dir", "colbertkit_dir", "bge_m3_dir"]
)
def test_every_layout_exports_to_both_layouts_with_equal_scores_and_weights(
    request, tmp_path, fixture, layout
):
    source = request.getfixturevalue(fixture)
    out = tmp_path / "out"
    report = export_model(source, out, layout=layout)
    assert report.verified and report.max_difference <= TOLERANCES["fp32"]
    assert report.pairs_checked == len(SAMPLE_PAIRS)
    assert detect_layout(out).kind == layout
    assert_same_tensors(encoder_tensors(out), encoder_tensors(source))
    assert_same_tensors(head_tensors(out), head_tensors(source))
    assert scores_of(out) == pytest.approx(scores_of(source), abs=1e-6)
    assert leftovers(tmp_path) == []


def test_chain_colbertkit_reference_colbertkit_is_lossless(colbertkit_dir, tmp_path):
    export_model(colbertkit_dir, tmp_path / "ref", layout="reference")
    export_model(tmp_path / "ref", tmp_path / "back", layout="colbertkit")
    assert_same_tensors(encoder_tensors(tmp_path / "back"), encoder_tensors(colbertkit_dir))
    assert_same_tensors(head_tensors(tmp_path / "back"), head_tensors(colbertkit_dir))
    assert scores_of(tmp_path / "back") == pytest.approx(scores_of(colbertkit_dir), abs=1e-6)


def test_colbertkit_layout_is_safetensors_with_metadata(reference_dir, tmp_path):
    out = tmp_path / "out"
    export_model(reference_dir, out, query_max_len=32, passage_max_len=64)
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(
        ["model.safetensors", "colbert_linear.safetensors", "colbertkit.json", "config.json"]
        + [p.name for p in reference_dir.iterdir() if p.name.startswith("tokenizer")]
    )
    metadata = json.loads((out / "colbertkit.json").read_text())
    assert (metadata["colbert_dim"], metadata["hidden_size"]) == (COLBERT_DIM, HIDDEN)
    assert (metadata["query_max_len"], metadata["passage_max_len"]) == (32, 64)
    assert metadata["semantics"]["drop_cls"] is True
    assert {"colbertkit", "transformers", "torch"} <= set(metadata["versions"])
    assert metadata["dtype"] == "fp32" and metadata["encoder_class"] == "BertModel"
    source = metadata["source"]
    assert source["kind"] == "reference" and source["path"] == str(reference_dir.resolve())
    assert source["sha256"] == {
        name: hashlib.sha256((reference_dir / name).read_bytes()).hexdigest()
        for name in ("model.safetensors", "colbert_linear.pt")
    }
    assert load_checkpoint(out).query_max_len == 32  # the metadata is what the scorer reads


def test_reference_layout_head_is_plain_tensors(colbertkit_dir, tmp_path):
    out = tmp_path / "out"
    export_model(colbertkit_dir, out, layout="reference")
    assert not (out / "colbertkit.json").exists()  # the reference layout has no metadata
    head = torch.load(out / "colbert_linear.pt", weights_only=True)  # no code objects to refuse
    assert set(head) == {"weight", "bias"}
    assert all(type(value) is torch.Tensor for value in head.values())


def test_bge_m3_extra_heads_are_left_out_and_said(bge_m3_dir, tmp_path):
    out = tmp_path / "out"
    report = export_model(bge_m3_dir, out, verify=False)
    notes = " ".join(report.notes)
    assert "sparse_linear.pt (BGE-M3's sparse head)" in notes
    assert "1_Pooling/" in notes and "modules.json" in notes
    assert "only colbert_linear.pt is kept" in notes
    assert not (out / "sparse_linear.pt").exists() and not (out / "1_Pooling").exists()


def test_sharded_hugging_face_encoder_index(tiny_parts, tmp_path):
    encoder, tokenizer, head = tiny_parts
    source = tmp_path / "sharded"
    encoder.save_pretrained(str(source), max_shard_size="50KB")
    tokenizer.save_pretrained(str(source))
    torch.save(head.state_dict(), source / "colbert_linear.pt")
    assert (source / "model.safetensors.index.json").is_file()
    report = export_model(source, tmp_path / "out")
    assert report.verified
    assert_same_tensors(
        load_file(str(tmp_path / "out" / "model.safetensors")),
        {k: v for k, v in encoder.state_dict().items() if not k.endswith("position_ids")},
    )


# --------------------------------------------------------------------------------------------
# Training checkpoints
# --------------------------------------------------------------------------------------------


def test_training_checkpoint_exports_the_trained_weights_only(
    training_run, training_checkpoint, tmp_path
):
    out = tmp_path / "out"
    report = export_model(training_checkpoint, out)
    assert report.source_kind == "training" and report.verified
    # The engine's own final model is the same step: the export must equal it.
    final = training_run / "model"
    assert_same_tensors(encoder_tensors(out), encoder_tensors(final))
    assert_same_tensors(head_tensors(out), head_tensors(final))
    assert scores_of(out) == pytest.approx(scores_of(final), abs=1e-6)
    metadata = json.loads((out / "colbertkit.json").read_text())
    assert (metadata["query_max_len"], metadata["passage_max_len"]) == (16, 24)
    assert metadata["source"]["step"] == 2 and metadata["source"]["kind"] == "training"
    assert "model.safetensors" in metadata["source"]["sha256"]
    # Weights only: the optimizer, scheduler and RNG states stay behind, and say so.
    assert not [p for p in out.iterdir() if p.suffix in (".bin", ".pkl", ".pt")]
    assert any("optimizer.bin (training state)" in note for note in report.notes)


def test_training_checkpoint_to_reference_layout(training_run, training_checkpoint, tmp_path):
    out = tmp_path / "out"
    export_model(training_checkpoint, out, layout="reference", dtype="bf16")
    assert detect_layout(out).kind == "reference"
    expected = encoder_tensors(training_run / "model")
    assert_same_tensors(encoder_tensors(out), {k: v.bfloat16() for k, v in expected.items()})


def test_training_state_pickles_are_never_opened(training_checkpoint, tmp_path):
    checkpoint = tmp_path / "checkpoints" / "step-00000002"
    shutil.copytree(training_checkpoint, checkpoint)
    marker = tmp_path / "pwned"
    for name in ("optimizer.bin", "scheduler.bin", "random_states_0.pkl"):
        with open(checkpoint / name, "wb") as handle:
            pickle.dump(_Exploit(marker), handle)
    export_model(checkpoint, tmp_path / "out", verify=False)
    assert not marker.exists()


def test_config_and_tokenizer_come_from_the_checkpoints_own_base_dir(training_checkpoint, tmp_path):
    checkpoint = tmp_path / "alone" / "step-2"  # not under a run, base model gone
    shutil.copytree(training_checkpoint, checkpoint)
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    state["config"]["model"] = str(tmp_path / "moved-away")
    (checkpoint / "trainer_state.json").write_text(json.dumps(state))
    report = export_model(checkpoint, tmp_path / "out")
    assert report.verified
    assert "config and tokenizer from the checkpoint's base/" in report.notes
    assert not any("base/" in note for note in report.notes if note.startswith("not exported"))


def _older_checkpoint(training_checkpoint: Path, target: Path, base_model: str | None) -> Path:
    """A checkpoint as earlier engines wrote it: no base/ directory, no model facts."""
    shutil.copytree(training_checkpoint, target, ignore=shutil.ignore_patterns("base"))
    state = json.loads((target / "trainer_state.json").read_text())
    state.pop("model", None)
    state["config"]["model"] = base_model
    (target / "trainer_state.json").write_text(json.dumps(state))
    return target


def test_older_checkpoint_uses_the_runs_base_model_or_asks_for_it(
    training_checkpoint, colbertkit_dir, tmp_path
):
    checkpoint = _older_checkpoint(
        training_checkpoint, tmp_path / "a" / "step-2", str(colbertkit_dir)
    )
    report = export_model(checkpoint, tmp_path / "out-a")
    assert (
        report.verified
        and f"config and tokenizer from the run's base model {colbertkit_dir}" in report.notes
    )

    checkpoint = _older_checkpoint(
        training_checkpoint, tmp_path / "b" / "step-2", str(tmp_path / "gone")
    )
    with pytest.raises(CheckpointError, match=r"no config\.json or tokenizer .*--base-model") as e:
        export_model(checkpoint, tmp_path / "out-b")
    assert "\n" not in str(e.value)
    report = export_model(checkpoint, tmp_path / "out-b", base_model=colbertkit_dir)
    assert report.verified and any("--base-model" in note for note in report.notes)


def test_older_checkpoint_falls_back_to_the_runs_final_model(training_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(training_run, run, ignore=shutil.ignore_patterns("checkpoints"))
    (checkpoint,) = (training_run / "checkpoints").iterdir()
    checkpoint = _older_checkpoint(
        checkpoint, run / "checkpoints" / checkpoint.name, "nobody/not-downloadable-offline"
    )
    report = export_model(checkpoint, tmp_path / "out")
    assert report.verified and any("the run's final model" in note for note in report.notes)


def test_trainer_state_that_contradicts_the_weights(training_checkpoint, tmp_path):
    checkpoint = tmp_path / "step"
    shutil.copytree(training_checkpoint, checkpoint)
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    assert "model" in state  # the engine records the model's facts in every checkpoint
    state["model"]["colbert_dim"] = 999
    (checkpoint / "trainer_state.json").write_text(json.dumps(state))
    with pytest.raises(
        CheckpointError, match=f"colbert_dim 999 but the saved head has {COLBERT_DIM}"
    ):
        export_model(checkpoint, tmp_path / "out")


def test_training_checkpoint_without_weights(training_checkpoint, tmp_path):
    checkpoint = tmp_path / "step"
    shutil.copytree(training_checkpoint, checkpoint)
    (checkpoint / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"no model weights .*incomplete"):
        export_model(checkpoint, tmp_path / "out")


# Sharded (FSDP) training checkpoints ---------------------------------------------------------

FSDP_WORKER = textwrap.dedent(
    """
    import sys, types
    import torch
    from accelerate import PartialState
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import save_fsdp_model
    from safetensors.torch import save_file
    from torch.distributed.fsdp import fully_shard

    from colbertkit.model import ColBERT
    from colbertkit.training import ChunkEncoder
    from tests.conftest import _build_tiny

    state = PartialState(cpu=True)  # gloo, 2 processes
    assert state.num_processes == 2
    encoder, _, head = _build_tiny()
    model = ChunkEncoder(ColBERT(encoder, head))  # what the engine hands to accelerate
    torch.manual_seed(1)  # the same "trained" weights on both ranks, not the base model's
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    if state.is_main_process:
        save_file(dict(model.state_dict()), sys.argv[1] + "/unsharded.safetensors")
    for layer in encoder.encoder.layer:
        fully_shard(layer)
    fully_shard(model)
    me = types.SimpleNamespace(process_index=state.process_index, num_processes=2)
    for kind, folder in (("SHARDED_STATE_DICT", "sharded"), ("FULL_STATE_DICT", "full")):
        plugin = FullyShardedDataParallelPlugin(fsdp_version=2, state_dict_type=kind)
        # accelerate's own writer: what Accelerator.save_state calls under FSDP.
        save_fsdp_model(plugin, me, model, sys.argv[1] + "/" + folder)
    state.wait_for_everyone()
    """
)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def fsdp_checkpoints(tmp_path_factory, colbertkit_dir) -> Path:
    """Two real 2-process FSDP2 checkpoints (sharded DCP and full state dict) of a changed model,
    each with a trainer_state.json naming the base model, plus the unsharded weights."""
    root = tmp_path_factory.mktemp("fsdp")
    (root / "worker.py").write_text(FSDP_WORKER)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",
    }
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
        str(root / "worker.py"), str(root),
    ]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    state = {"progress": {"step": 7}, "world_size": 2, "config": {"model": str(colbertkit_dir)}}
    for folder in ("sharded", "full"):
        (root / folder / "trainer_state.json").write_text(json.dumps(state))
    return root


@pytest.mark.slow
@pytest.mark.parametrize(
    ("folder", "weights"),
    [("sharded", "pytorch_model_fsdp_0/"), ("full", "pytorch_model_fsdp.bin")],
)
def test_fsdp_checkpoint_is_consolidated_to_the_unsharded_weights(
    fsdp_checkpoints, tmp_path, folder, weights
):
    checkpoint = fsdp_checkpoints / folder
    if folder == "sharded":  # really sharded: two ranks' files, each tensor split across them
        metadata = load_dcp_metadata(checkpoint / "pytorch_model_fsdp_0" / ".metadata")
        assert sorted(p.name for p in (checkpoint / "pytorch_model_fsdp_0").glob("*.distcp")) == [
            "__0_0.distcp",
            "__1_0.distcp",
        ]
        word = metadata.state_dict_metadata[
            "model.colbert.encoder.embeddings.word_embeddings.weight"
        ]
        assert len(word.chunks) == 2
    out = tmp_path / "out"
    report = export_model(checkpoint, out)
    assert report.verified and report.max_difference <= TOLERANCES["fp32"]
    assert weights in report.description
    unsharded = load_file(str(fsdp_checkpoints / "unsharded.safetensors"))
    assert_same_tensors(
        encoder_tensors(out),
        {
            k.removeprefix("colbert.encoder."): v
            for k, v in unsharded.items()
            if k.startswith("colbert.encoder.")
        },
    )
    assert_same_tensors(
        head_tensors(out),
        {k.removeprefix("colbert.head."): v for k, v in unsharded.items() if "head" in k},
    )
    assert json.loads((out / "colbertkit.json").read_text())["source"]["step"] == 7


@pytest.mark.slow
def test_sharded_metadata_pickle_that_would_run_code_is_refused(fsdp_checkpoints, tmp_path):
    checkpoint = tmp_path / "evil"
    shutil.copytree(fsdp_checkpoints / "sharded", checkpoint)
    marker = tmp_path / "pwned"
    with open(checkpoint / "pytorch_model_fsdp_0" / ".metadata", "wb") as handle:
        pickle.dump(_Exploit(marker), handle)
    with pytest.raises(CheckpointError, match=r"refused to unpickle .*system is not allowed"):
        export_model(checkpoint, tmp_path / "out")
    assert not marker.exists()
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_damaged_or_missing_shard_file_is_one_line_error(fsdp_checkpoints, tmp_path):
    checkpoint = tmp_path / "cut"
    shutil.copytree(fsdp_checkpoints / "sharded", checkpoint)
    shard = checkpoint / "pytorch_model_fsdp_0" / "__1_0.distcp"
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="cannot read the sharded checkpoint") as error:
        export_model(checkpoint, tmp_path / "out")
    assert "\n" not in str(error.value)
    assert leftovers(tmp_path) == [] and not (tmp_path / "out").exists()
    shard.unlink()
    with pytest.raises(CheckpointError, match=r"shard file\(s\) __1_0\.distcp missing") as error:
        export_model(checkpoint, tmp_path / "out")


# --------------------------------------------------------------------------------------------
# dtypes
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("dtype", "torch_dtype"), [("fp16", torch.float16), ("bf16", torch.bfloat16)]
)
def test_dtype_conversion_rounds_each_weight_and_verifies_within_tolerance(
    reference_dir, tmp_path, dtype, torch_dtype
):
    out = tmp_path / "out"
    report = export_model(reference_dir, out, dtype=dtype)
    assert report.verified and 0 < report.max_difference <= TOLERANCES[dtype]
    source = encoder_tensors(reference_dir)
    assert_same_tensors(encoder_tensors(out), {k: v.to(torch_dtype) for k, v in source.items()})
    assert head_tensors(out)["weight"].dtype == torch_dtype
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == str(torch_dtype).removeprefix("torch.")
    assert json.loads((out / "colbertkit.json").read_text())["dtype"] == dtype
    assert report.written_bytes < (reference_dir / "model.safetensors").stat().st_size * 0.6
    # colbertkit scores it (CPU: upcast) the same as the export's verification did.
    assert load_checkpoint(out).model.encoder.dtype == torch.float32


def test_fp16_overflow_is_refused_with_the_fix(reference_dir, tmp_path):
    source = tmp_path / "big_values"
    shutil.copytree(reference_dir, source)
    weights = load_file(str(source / "model.safetensors"))
    weights["pooler.dense.bias"][0] = 1e6
    save_file(weights, str(source / "model.safetensors"))
    with pytest.raises(ExportError, match=r"pooler\.dense\.bias .*beyond fp16's range.*bf16"):
        export_model(source, tmp_path / "out", dtype="fp16")
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []
    export_model(source, tmp_path / "out", dtype="bf16", verify=False)  # bf16 has the range


def test_writer_keeps_integer_tensors_and_aligns_data(tmp_path):
    tensors = {
        "ids": torch.arange(5, dtype=torch.int64),
        "odd": torch.randn(3),  # 3 x bf16 = 6 bytes: would misalign what follows if placed first
        "weight": torch.randn(4, 3),
        "flag": torch.tensor([True, False]),
        "empty": torch.zeros(0, 4),
    }
    entries = [
        TensorEntry(name, tuple(t.shape), t.dtype, lambda t=t: t) for name, t in tensors.items()
    ]
    file = tmp_path / "out.safetensors"
    write_safetensors(entries, file, dtype=torch.bfloat16, metadata={"origin": "test"})
    loaded = load_file(str(file))
    assert loaded["ids"].dtype == torch.int64 and torch.equal(loaded["ids"], tensors["ids"])
    assert loaded["flag"].dtype == torch.bool
    assert torch.equal(loaded["weight"], tensors["weight"].bfloat16())
    assert loaded["empty"].shape == (0, 4)
    with safe_open(str(file), "pt") as handle:
        assert handle.metadata() == {"format": "pt", "origin": "test"}
    header_size = int.from_bytes(file.read_bytes()[:8], "little")
    assert header_size % 8 == 0
    header = json.loads(file.read_bytes()[8 : 8 + header_size])
    for name, info in header.items():
        if name != "__metadata__":
            item = loaded[name].element_size()
            assert info["data_offsets"][0] % item == 0, name


def test_writer_streams_one_tensor_at_a_time(tmp_path):
    """Each tensor read is released before the next is read: memory holds one at a time."""
    alive: list[weakref.ref] = []

    def reader(index: int):
        def read() -> torch.Tensor:
            gc.collect()
            assert all(ref() is None for ref in alive), "a previous tensor is still held"
            tensor = torch.full((64, 64), float(index))
            alive.append(weakref.ref(tensor))
            return tensor

        return read

    entries = [TensorEntry(f"t{i}", (64, 64), torch.float32, reader(i)) for i in range(6)]
    progress: list[int] = []
    write_safetensors(
        entries, tmp_path / "out.safetensors", dtype=torch.float16, progress=progress.append
    )
    assert progress == [64 * 64 * 2] * 6
    loaded = load_file(str(tmp_path / "out.safetensors"))
    assert [float(loaded[f"t{i}"][0, 0]) for i in range(6)] == [0, 1, 2, 3, 4, 5]


def test_progress_reports_bytes_up_to_the_total(reference_dir, tmp_path):
    seen: list[tuple[int, int]] = []
    export_model(
        reference_dir,
        tmp_path / "out",
        dtype="bf16",
        verify=False,
        progress=lambda d, t: seen.append((d, t)),
    )
    done = [d for d, _ in seen]
    assert done == sorted(done) and done[-1] == seen[-1][1]
    assert seen[-1][1] == (
        tmp_path / "out" / "model.safetensors"
    ).stat().st_size - 8 - int.from_bytes(
        (tmp_path / "out" / "model.safetensors").read_bytes()[:8], "little"
    )


# --------------------------------------------------------------------------------------------
# Verification
# --------------------------------------------------------------------------------------------


def test_a_wrong_export_fails_verification_and_is_not_placed(reference_dir, tmp_path, monkeypatch):
    real_write = export_module._write_export

    def write_then_break_the_head(source, tmp, **kwargs):
        count = real_write(source, tmp, **kwargs)
        head = load_file(str(tmp / "colbert_linear.safetensors"))
        head["weight"][0, 0] += 0.5  # one weight of the head off
        save_file(head, str(tmp / "colbert_linear.safetensors"))
        return count

    monkeypatch.setattr(export_module, "_write_export", write_then_break_the_head)
    out = tmp_path / "out"
    with pytest.raises(
        VerificationError, match=r"differ from the source's by up to .*nothing was written"
    ) as error:
        export_model(reference_dir, out)
    assert "\n" not in str(error.value)
    assert not out.exists() and leftovers(tmp_path) == []


def test_tolerance_is_enforced_and_no_verify_skips(reference_dir, tmp_path):
    with pytest.raises(VerificationError, match="over the bf16 tolerance 0"):
        export_model(reference_dir, tmp_path / "strict", dtype="bf16", tolerance=0.0)
    assert not (tmp_path / "strict").exists()
    report = export_model(reference_dir, tmp_path / "skipped", dtype="bf16", verify=False)
    assert not report.verified and report.max_difference is None
    assert (tmp_path / "skipped" / "model.safetensors").is_file()


def test_verify_pairs_from_a_file_or_a_list(reference_dir, tmp_path):
    pairs_file = tmp_path / "pairs.tsv"
    pairs_file.write_text("cat\tthe cat eats fish\ndog\tthe dog runs\n")
    assert export_model(reference_dir, tmp_path / "a", verify_pairs=pairs_file).pairs_checked == 2
    report = export_model(reference_dir, tmp_path / "b", verify_pairs=[("sky", "the blue sky")])
    assert report.pairs_checked == 1 and report.verified


# --------------------------------------------------------------------------------------------
# Refusals: corrupt files, missing head, pickles, overwriting
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda data: data[: len(data) - 100], r"truncated: the header describes \d+ bytes"),
        (lambda data: data[:5], "truncated or not a safetensors file"),
        (lambda data: b"\xff" * 8 + data[8:], "does not fit in the file"),
        (lambda data: data[:8] + b"[" + data[9:], "header is not valid JSON"),
        (lambda data: data + b"extra", "unexpected bytes after the tensor data"),
    ],
)
def test_corrupt_or_truncated_safetensors_is_one_line_error(
    reference_dir, tmp_path, damage, message
):
    source = tmp_path / "damaged"
    shutil.copytree(reference_dir, source)
    file = source / "model.safetensors"
    file.write_bytes(damage(file.read_bytes()))
    with pytest.raises(CheckpointError, match=message) as error:
        export_model(source, tmp_path / "out")
    assert "\n" not in str(error.value) and "model.safetensors" in str(error.value)
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_truncated_pytorch_model_bin_is_one_line_error(reference_bin_dir, tmp_path):
    source = tmp_path / "damaged"
    shutil.copytree(reference_bin_dir, source)
    file = source / "pytorch_model.bin"
    file.write_bytes(file.read_bytes()[:1000])
    with pytest.raises(
        CheckpointError, match=r"pytorch_model\.bin: cannot read it .*truncated"
    ) as e:
        export_model(source, tmp_path / "out")
    assert "\n" not in str(e.value)
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_corrupt_head_safetensors_is_one_line_error(colbertkit_dir, tmp_path):
    source = tmp_path / "damaged"
    shutil.copytree(colbertkit_dir, source)
    head = source / "colbert_linear.safetensors"
    head.write_bytes(head.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match="not a valid safetensors file") as error:
        export_model(source, tmp_path / "out")
    assert "\n" not in str(error.value)


def test_missing_head_is_one_line_error(encoder_dir, tmp_path):
    with pytest.raises(CheckpointError, match=r"has no ColBERT head .*bare encoder") as error:
        export_model(encoder_dir, tmp_path / "out")
    assert "\n" not in str(error.value)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("fixture", "file", "key"),
    [
        ("reference_dir", "colbert_linear.pt", "weight"),
        ("reference_bin_dir", "pytorch_model.bin", "embeddings.word_embeddings.weight"),
    ],
)
def test_a_pickle_that_would_run_code_is_refused_not_executed(
    request, tmp_path, fixture, file, key
):
    source = tmp_path / "evil"
    shutil.copytree(request.getfixturevalue(fixture), source)
    marker = tmp_path / "pwned"
    torch.save({key: _Exploit(marker)}, source / file)
    with pytest.raises(CheckpointError, match="refused to unpickle") as error:
        export_model(source, tmp_path / "out")
    assert "\n" not in str(error.value)
    assert not marker.exists()
    assert not (tmp_path / "out").exists()


def test_existing_output_is_kept_unless_force(reference_dir, tmp_path):
    out = tmp_path / "out"
    export_model(reference_dir, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(UsageError, match=r"already exists; .*`force=True`"):
        export_model(reference_dir, out, layout="reference")
    # With force, a failed export still leaves the previous export as it was.
    with pytest.raises(VerificationError):
        export_model(reference_dir, out, force=True, dtype="bf16", tolerance=0.0)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    export_model(reference_dir, out, force=True, layout="reference")
    assert (out / "colbert_linear.pt").is_file() and not (out / "colbertkit.json").exists()
    assert leftovers(tmp_path) == []


def test_force_never_removes_files_colbertkit_did_not_write(reference_dir, tmp_path):
    out = tmp_path / "out"
    (out / "sub").mkdir(parents=True)
    (out / "thesis.txt").write_text("keep me")
    (out / "sub" / "data.csv").write_text("1,2")
    with pytest.raises(UsageError, match=r"holds files colbertkit did not write \(sub/, thesis"):
        export_model(reference_dir, out, force=True)
    assert (out / "thesis.txt").read_text() == "keep me"
    assert (out / "sub" / "data.csv").read_text() == "1,2"
    assert sorted(p.name for p in out.iterdir()) == ["sub", "thesis.txt"]


def test_output_must_not_be_or_contain_the_source(reference_dir, tmp_path):
    source = tmp_path / "run" / "ckpt"
    shutil.copytree(reference_dir, source)
    for out in (source, tmp_path / "run"):
        with pytest.raises(UsageError, match="is \\(or contains\\) the source"):
            export_model(source, out, force=True)
    assert (source / "colbert_linear.pt").is_file()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"layout": "onnx"}, "`layout` onnx: Input should be 'colbertkit' or 'reference'"),
        ({"dtype": "int8"}, "`dtype` int8: Input should be 'fp32', 'fp16' or 'bf16'"),
        ({"tolerance": -1.0}, "`tolerance` -1.0: Input should be greater than or equal to 0"),
        ({"query_max_len": 1}, "`query_max_len` 1: Input should be greater than or equal to 2"),
        ({"verify_pairs": []}, "verify_pairs is empty"),
    ],
)
def test_bad_options_are_usage_errors(reference_dir, tmp_path, options, message):
    with pytest.raises(UsageError, match=message):
        export_model(reference_dir, tmp_path / "out", **options)
    assert not (tmp_path / "out").exists()
