"""The training engine on one CPU process: configuration, data, the loop, checkpoints, resume."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from colbertkit.checkpoint.run import list_checkpoints
from colbertkit.errors import ColbertkitError, UsageError
from colbertkit.train_config import TrainConfig, load_train_config
from colbertkit.training import train
from tests.conftest import WORDS

# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def toy_rows(count: int, seed: int, negatives: int = 4) -> list[dict]:
    """A task the tiny model can only solve by learning: query word -> a fixed *other* word.

    Lexical overlap does not help (the answer word never appears in the query).
    """
    rng = random.Random(seed)
    words = sorted(set(WORDS))
    keys, answers, fillers = words[:12], words[12:24], words[24:]
    rows = []
    for _ in range(count):
        index = rng.randrange(len(keys))
        filler = lambda n: rng.sample(fillers, n)  # noqa: E731
        positive = [answers[index], *filler(3)]
        rng.shuffle(positive)
        rows.append(
            {
                "query": " ".join([keys[index], *filler(1)]),
                "pos": [" ".join(positive)],
                "neg": [
                    " ".join([answers[j], *filler(3)])
                    for j in rng.sample([j for j in range(len(answers)) if j != index], negatives)
                ],
            }
        )
    return rows


@pytest.fixture
def dataset(tmp_path) -> Path:
    return write_rows(tmp_path / "train.jsonl", toy_rows(24, seed=0))


def base_config(tmp_path: Path, model: Path, dataset: Path, **overrides) -> dict:
    config = {
        "model": str(model),
        "dataset": str(dataset),
        "output_dir": str(tmp_path / "run"),
        "batch_size": 4,
        "neg_nums": 3,
        "epochs": 1,
        "lr": 1e-3,
        "query_max_len": 16,
        "passage_max_len": 24,
        "logging_steps": 1,
        "progress_bar": False,
        "seed": 7,
    }
    config.update(overrides)
    return config


def final_weights(model_dir: Path) -> dict[str, torch.Tensor]:
    weights = load_file(str(model_dir / "model.safetensors"))
    weights.update(
        {
            f"head.{k}": v
            for k, v in load_file(str(model_dir / "colbert_linear.safetensors")).items()
        }
    )
    return weights


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def read_metrics(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------


def test_unknown_setting_names_the_nearest_one(tmp_path):
    with pytest.raises(
        UsageError, match=r"unknown setting 'learning_rate' \(did you mean 'lr'\?\)"
    ):
        load_train_config({"model": "m", "dataset": "d", "output_dir": "o", "learning_rate": 1})
    with pytest.raises(UsageError, match=r"unknown setting 'zzz' \(the settings are listed in"):
        load_train_config({"model": "m", "dataset": "d", "output_dir": "o", "zzz": 1})
    with pytest.raises(
        UsageError, match=r"unknown setting 'neg_num' \(did you mean 'neg_nums'\?\)"
    ):
        load_train_config({"model": "m", "dataset": "d", "output_dir": "o", "neg_num": 1})


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"lr": 0}, r"lr: Input should be greater than 0"),
        ({"warmup_proportion": 1.5}, r"warmup_proportion: Input should be less than 1"),
        (
            {"mixed_precision": "fp8"},
            r"mixed_precision: Input should be 'no', 'fp16', 'bf16' or 'auto'",
        ),
        (
            {"grad_cache": True, "encode_chunk_size": None},
            r"grad_cache needs encode_chunk_size .* set encode_chunk_size, e.g. 8",
        ),
        ({"eval_steps": 5}, r"eval_steps is set but eval_dataset is not"),
        (
            {"best_metric": "recall@3"},
            r"best_metric 'recall@3' is not computed; choose one of mrr@10",
        ),
        (
            {"train_head_only": True, "gradient_checkpointing": True},
            r"gradient_checkpointing saves nothing with train_head_only",
        ),
        ({"neg_nums": 0}, r"neg_nums 0 leaves only the positive"),
        ({"loss": "kl", "neg_nums": 0}, r"loss kl needs neg_nums >= 1"),
        ({"loss": "ce"}, r"loss: Input should be 'contrastive', 'kl' or 'contrastive\+kl'"),
        ({"distill_weight": 0.5}, r"distill_weight weighs the KL term of loss contrastive\+kl"),
        (
            {"loss": "kl", "distill_weight": 0.5},
            r"distill_weight weighs the KL term of loss contrastive\+kl, not of kl",
        ),
        ({"teacher_temperature": 1.0}, r"teacher_temperature applies to teacher scores"),
        ({"teacher_temperature": 0, "loss": "kl"}, r"teacher_temperature: Input should be greater"),
        (
            {"train_head_only": True, "head_warmup_steps": 5},
            r"head_warmup_steps is meaningless with train_head_only",
        ),
        (
            {"train_head_only": True, "encoder_lr": 1e-5},
            r"encoder_lr is meaningless with train_head_only",
        ),
        ({"head_warmup_steps": 10, "max_steps": 10}, r"the encoder would never train"),
        ({"head_warmup_steps": -1}, r"head_warmup_steps: Input should be greater than or equal"),
        ({"encoder_lr": 0}, r"encoder_lr: Input should be greater than 0"),
    ],
)
def test_invalid_settings_say_what_to_change(overrides, message):
    settings = {"model": "m", "dataset": "d", "output_dir": "o", **overrides}
    with pytest.raises(UsageError, match=message):
        load_train_config(settings)


def test_config_defaults_are_the_reference_loss():
    config = TrainConfig(model="m", dataset="d", output_dir="o")
    assert config.temperature == 0.02
    assert not config.other_positives_as_negatives
    assert config.metric_names() == ["mrr@10", "ndcg@10", "recall@5", "recall@10", "map"]


def test_fp16_on_cpu_is_an_error_naming_the_fix(tmp_path, colbertkit_dir, dataset):
    config = base_config(tmp_path, colbertkit_dir, dataset, mixed_precision="fp16")
    with pytest.raises(
        UsageError, match=r"fp16' needs a CUDA GPU .* use mixed_precision 'bf16' or 'no'"
    ):
        train(config)


# --------------------------------------------------------------------------------------------
# Data: examples per epoch, shards
# --------------------------------------------------------------------------------------------


def test_examples_one_per_positive_and_negatives_per_epoch():
    from colbertkit.collate import epoch_examples
    from colbertkit.data import TrainingRow

    rows = [
        TrainingRow(query="q1", pos=["a", "b"], neg=["n1", "n2", "n3", "n4", "n5"]),
        TrainingRow(query="q2", pos=["c"], neg=["m1"]),
    ]
    epoch0 = epoch_examples(rows, neg_nums=3, seed=1, epoch=0)
    assert sorted(ex.positive for ex in epoch0) == ["a", "b", "c"]
    for ex in epoch0:
        assert len(ex.negatives) == 3
        if ex.query == "q1":
            assert len(set(ex.negatives)) == 3  # enough negatives: drawn without replacement
        else:
            assert ex.negatives == ("m1", "m1", "m1")  # fewer: the list is repeated
    assert epoch_examples(rows, neg_nums=3, seed=1, epoch=0) == epoch0  # seeded
    per_epoch = [
        {ex.positive: ex.negatives for ex in epoch_examples(rows, neg_nums=3, seed=1, epoch=e)}
        for e in range(6)
    ]
    assert len({epoch["a"] for epoch in per_epoch}) > 1  # redrawn each epoch
    once = [
        {
            ex.positive: ex.negatives
            for ex in epoch_examples(rows, neg_nums=3, seed=1, epoch=e, sampling="once")
        }
        for e in range(6)
    ]
    assert len({epoch["a"] for epoch in once}) == 1


def test_teacher_scores_follow_their_sampled_negatives():
    from colbertkit.collate import epoch_examples
    from colbertkit.data import TrainingRow

    negatives = [f"n{i}" for i in range(6)]
    rows = [
        TrainingRow(
            query="q1",
            pos=["a", "b"],
            neg=negatives,
            pos_scores=[0.9, 0.8],
            neg_scores=[i / 10 for i in range(6)],
        ),
        TrainingRow(query="q2", pos=["c"], neg=["m"], pos_scores=[5], neg_scores=[-1]),
    ]
    for epoch in range(3):
        for ex in epoch_examples(rows, neg_nums=4, seed=3, epoch=epoch):
            assert ex.teacher_scores is not None and len(ex.teacher_scores) == 5
            if ex.query == "q1":
                assert ex.teacher_scores[0] == {"a": 0.9, "b": 0.8}[ex.positive]
                assert list(ex.teacher_scores[1:]) == [int(n[1:]) / 10 for n in ex.negatives]
            else:
                assert ex.teacher_scores == (5.0, -1.0, -1.0, -1.0, -1.0)
    # The draws are those of the texts-only rows: adding scores changes no negative.
    plain = [TrainingRow(query=r.query, pos=r.pos, neg=r.neg) for r in rows]
    assert [ex.negatives for ex in epoch_examples(plain, neg_nums=4, seed=3, epoch=1)] == [
        ex.negatives for ex in epoch_examples(rows, neg_nums=4, seed=3, epoch=1)
    ]


def test_a_graded_row_is_one_example_led_by_its_top_passage():
    from colbertkit.collate import count_examples, epoch_examples
    from colbertkit.data import TrainingRow

    row = TrainingRow.model_validate(
        {"query": "q", "pos": ["p0", "p1", "p2", "p3"], "pos_scores": [0.2, 0.9, 0.1, 0.5]}
    )
    assert row.is_graded and count_examples([row]) == 1
    (example,) = epoch_examples([row], neg_nums=3, seed=0, epoch=0)
    assert example.positive == "p1"
    assert sorted(example.negatives) == ["p0", "p2", "p3"]
    scores = dict(zip(["p0", "p1", "p2", "p3"], [0.2, 0.9, 0.1, 0.5], strict=True))
    assert example.teacher_scores == tuple(scores[t] for t in example.passages)
    assert example.query_positives == frozenset({"p1"})
    # A loss without teacher scores reads it like any row: one example per positive.
    assert count_examples([row], graded_rows=False) == 4


def test_batch_marks_every_positive_of_a_query_by_text(tiny_parts):
    """Two examples of one query in a batch: each one's positive is the other's excluded
    column, and so is a negative of another query that repeats it."""
    from colbertkit.collate import Collator, TrainingExample
    from colbertkit.losses import query_positive_mask

    _, tokenizer, _ = tiny_parts
    positives = frozenset({"the cat", "a cat"})
    examples = [
        TrainingExample("cat?", "the cat", ("the dog",), (1.0, 0.0), positives),
        TrainingExample("cat?", "a cat", ("a fish",), (1.0, 0.0), positives),
        TrainingExample("dog?", "the dog", ("a cat",), (1.0, 0.0), frozenset({"the dog"})),
    ]
    batch = Collator(tokenizer, 16, 16)(examples)
    assert batch.teacher_scores.tolist() == [[1.0, 0.0]] * 3
    mask = query_positive_mask(batch.passage_fingerprints, batch.positive_fingerprints)
    # columns: the cat, the dog, a cat, a fish, the dog, a cat
    assert mask.tolist() == [
        [True, False, True, False, False, True],
        [True, False, True, False, False, True],
        [False, True, False, False, True, False],
    ]


@pytest.mark.parametrize(
    ("examples", "batch", "world"), [(10, 2, 2), (11, 2, 2), (9, 4, 1), (7, 2, 3)]
)
def test_process_batches_shard_the_data(examples, batch, world):
    from colbertkit.data import process_batches

    shards = [process_batches(examples, batch, world, rank) for rank in range(world)]
    assert len({len(shard) for shard in shards}) == 1  # the same number of steps everywhere
    seen = [i for shard in shards for r in shard for i in r]
    assert len(seen) == len(set(seen))  # disjoint
    assert examples - len(seen) < world  # at most world-1 left over
    for step in range(len(shards[0])):
        assert len({len(shard[step]) for shard in shards}) == 1


def test_parameter_groups_exclude_biases_and_norms(tiny_parts):
    from colbertkit.model import ColBERT
    from colbertkit.training import _parameter_groups

    encoder, _, head = tiny_parts
    model = ColBERT(encoder, head)
    decay, no_decay = _parameter_groups(model, 0.01, lr=1e-3)
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    decay_names = {names[id(p)] for p in decay["params"]}
    assert "head.bias" in no_decay_names and "head.weight" in decay_names
    assert "encoder.embeddings.LayerNorm.weight" in no_decay_names
    assert all(n.endswith("bias") or "LayerNorm" in n for n in no_decay_names)
    assert not any(n.endswith("bias") or "LayerNorm" in n for n in decay_names)
    assert no_decay["weight_decay"] == 0.0
    assert decay["lr"] == no_decay["lr"] == 1e-3


def test_encoder_gets_its_own_learning_rate(tiny_parts):
    from colbertkit.model import ColBERT
    from colbertkit.training import _parameter_groups

    encoder, _, head = tiny_parts
    model = ColBERT(encoder, head)
    groups = {group["name"]: group for group in _parameter_groups(model, 0.01, 1e-3, 1e-5)}
    assert set(groups) == {"head", "head_no_decay", "encoder", "encoder_no_decay"}
    names = {id(p): n for n, p in model.named_parameters()}
    members = {key: {names[id(p)] for p in group["params"]} for key, group in groups.items()}
    assert members["head"] == {"head.weight"} and members["head_no_decay"] == {"head.bias"}
    assert all(name.startswith("encoder.") for name in members["encoder"])
    assert (groups["head"]["lr"], groups["encoder"]["lr"]) == (1e-3, 1e-5)
    assert groups["encoder_no_decay"]["lr"] == 1e-5
    assert groups["encoder_no_decay"]["weight_decay"] == 0.0
    every = set().union(*members.values())
    assert every == {n for n, p in model.named_parameters() if p.requires_grad}


# --------------------------------------------------------------------------------------------
# Runs
# --------------------------------------------------------------------------------------------


def test_run_writes_config_metrics_and_a_scorable_model(tmp_path, colbertkit_dir, dataset):
    from colbertkit.checkpoint import load_checkpoint
    from colbertkit.scorer import score_pairs

    config = base_config(tmp_path, colbertkit_dir, dataset, save_reference_layout=True)
    result = train(config)
    out = Path(config["output_dir"])
    assert result.global_step == 6  # 24 examples / 4
    written = json.loads((out / "train_config.json").read_text())
    assert written["config"]["neg_nums"] == 3
    assert written["plan"]["negatives_per_query"] == 12
    metrics = read_metrics(out)
    assert [m["step"] for m in metrics] == [1, 2, 3, 4, 5, 6]
    assert all({"train/loss", "train/lr", "train/examples_per_second"} <= m.keys() for m in metrics)
    loaded = load_checkpoint(result.model_dir)
    assert loaded.source.kind == "colbertkit" and loaded.query_max_len == 16
    assert load_checkpoint(out / "model-reference").source.kind == "reference"
    scores = score_pairs(str(result.model_dir), [("cat fish", "the cat eats fish"), ("cat", "sky")])
    assert len(scores) == 2 and all(-1.0 <= s <= 1.0 for s in scores)
    # The trained weights differ from the start.
    assert not torch.equal(
        final_weights(result.model_dir)["head.weight"], final_weights(colbertkit_dir)["head.weight"]
    )


def test_same_seed_same_weights(tmp_path, colbertkit_dir, dataset):
    a = train(base_config(tmp_path / "a", colbertkit_dir, dataset))
    b = train(base_config(tmp_path / "b", colbertkit_dir, dataset))
    assert_same_weights(final_weights(a.model_dir), final_weights(b.model_dir))
    c = train(base_config(tmp_path / "c", colbertkit_dir, dataset, seed=8))
    assert not torch.equal(
        final_weights(a.model_dir)["head.weight"], final_weights(c.model_dir)["head.weight"]
    )


def test_refuses_to_overwrite_a_run(tmp_path, colbertkit_dir, dataset):
    config = base_config(tmp_path, colbertkit_dir, dataset, max_steps=1)
    train(config)
    with pytest.raises(
        UsageError, match=r"already holds a training run; resume it with `resume_from='latest'`"
    ):
        train(config)


def test_resume_from_a_checkpoint_gives_the_same_weights(tmp_path, colbertkit_dir, dataset):
    """A run resumed from step k's checkpoint ends where the uninterrupted run ends."""
    settings = dict(epochs=2, save_steps=4, num_max_checkpoints=None, gradient_accumulation_steps=1)
    full = train(base_config(tmp_path / "full", colbertkit_dir, dataset, **settings))
    assert [p.name for p in list_checkpoints(full.output_dir)] == [
        "step-00000004",
        "step-00000006",
        "step-00000008",
        "step-00000012",
    ]
    for checkpoint in ("step-00000004", "step-00000006"):  # mid-epoch, and an epoch boundary
        resumed_dir = tmp_path / f"resumed-{checkpoint}"
        shutil.copytree(
            full.output_dir / "checkpoints" / checkpoint, resumed_dir / "checkpoints" / checkpoint
        )
        config = base_config(
            tmp_path,
            colbertkit_dir,
            dataset,
            output_dir=str(resumed_dir),
            resume_from="latest",
            **settings,
        )
        resumed = train(config)
        assert resumed.global_step == 12
        assert_same_weights(final_weights(resumed.model_dir), final_weights(full.model_dir))


def test_resume_refuses_changed_settings(tmp_path, colbertkit_dir, dataset):
    config = base_config(tmp_path, colbertkit_dir, dataset, save_steps=2, max_steps=2)
    train(config)
    with pytest.raises(UsageError, match=r"settings differ .*lr: 0.001 -> 0.002"):
        train({**config, "resume_from": "latest", "lr": 2e-3})
    with pytest.raises(UsageError, match=r"not a training checkpoint"):
        train({**config, "resume_from": str(tmp_path)})


def test_rotation_keeps_the_newest(tmp_path, colbertkit_dir, dataset):
    result = train(
        base_config(
            tmp_path, colbertkit_dir, dataset, epochs=2, save_steps=1, num_max_checkpoints=2
        )
    )
    assert [p.name for p in list_checkpoints(result.output_dir)] == [
        "step-00000011",
        "step-00000012",
    ]
    state = json.loads(
        (result.output_dir / "checkpoints/step-00000012/trainer_state.json").read_text()
    )
    assert state["progress"]["step"] == 12 and state["world_size"] == 1
    assert state["model"]["colbert_dim"] == 16 and state["model"]["state_dict_prefix"] == "colbert."
    checkpoint = result.output_dir / "checkpoints/step-00000012"
    assert (checkpoint / "base" / "config.json").is_file()
    assert (checkpoint / "base" / "tokenizer_config.json").is_file()
    assert not (checkpoint / "config.json").exists()  # never mistaken for an encoder directory
    keys = load_file(str(checkpoint / "model.safetensors")).keys()
    assert (
        "colbert.head.weight" in keys
        and "colbert.encoder.embeddings.word_embeddings.weight" in keys
    )


def test_crash_while_saving_leaves_the_previous_checkpoint(
    tmp_path, colbertkit_dir, dataset, monkeypatch
):
    from accelerate import Accelerator

    real_save_state = Accelerator.save_state
    calls = {"n": 0}

    def failing_save_state(self, output_dir=None, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:  # the second checkpoint: write part of it, then die
            Path(output_dir).mkdir(parents=True, exist_ok=True)
            (Path(output_dir) / "model.safetensors").write_bytes(b"half")
            raise KeyboardInterrupt("killed while saving")
        return real_save_state(self, output_dir, **kwargs)

    monkeypatch.setattr(Accelerator, "save_state", failing_save_state)
    config = base_config(tmp_path, colbertkit_dir, dataset, save_steps=2)
    with pytest.raises(KeyboardInterrupt):
        train(config)
    out = Path(config["output_dir"])
    assert [p.name for p in list_checkpoints(out)] == ["step-00000002"]
    monkeypatch.setattr(Accelerator, "save_state", real_save_state)
    resumed = train({**config, "resume_from": "latest"})
    uninterrupted = train(base_config(tmp_path / "u", colbertkit_dir, dataset, save_steps=2))
    assert_same_weights(final_weights(resumed.model_dir), final_weights(uninterrupted.model_dir))
    assert [m["step"] for m in read_metrics(out)] == [1, 2, 3, 4, 5, 6]


def test_gradient_accumulation_counts_optimizer_steps(tmp_path, colbertkit_dir, dataset):
    result = train(base_config(tmp_path, colbertkit_dir, dataset, gradient_accumulation_steps=4))
    assert result.global_step == 2  # 6 micro-batches -> windows of 4 and 2


def test_head_only_training_freezes_the_encoder(tmp_path, colbertkit_dir, dataset):
    result = train(base_config(tmp_path, colbertkit_dir, dataset, train_head_only=True))
    before, after = final_weights(colbertkit_dir), final_weights(result.model_dir)
    for name in before:
        if name.startswith("head."):
            assert not torch.equal(before[name], after[name]), name
        else:
            assert torch.equal(before[name], after[name]), name


def test_head_warmup_freezes_the_encoder_then_trains_it(tmp_path, colbertkit_dir, dataset):
    """With head_warmup_steps 3 the encoder is bit-identical to the start after 3 steps (no
    update, no weight decay, no optimizer state) while the head moves; step 4 trains both."""
    from colbertkit.checkpoint.run import STATE_DICT_PREFIX

    config = base_config(
        tmp_path, colbertkit_dir, dataset, head_warmup_steps=3, max_steps=4, save_steps=1,
        num_max_checkpoints=None, encoder_lr=1e-3,
    )  # fmt: skip
    result = train(config)
    start = final_weights(colbertkit_dir)

    def at_step(step: int) -> dict[str, torch.Tensor]:
        path = result.output_dir / "checkpoints" / f"step-{step:08d}" / "model.safetensors"
        # Named like final_weights: encoder tensors without a prefix, head tensors as head.*
        return {
            k.removeprefix(STATE_DICT_PREFIX).removeprefix("encoder."): v
            for k, v in load_file(str(path)).items()
        }

    previous = start
    for step in (1, 2, 3, 4):
        weights = at_step(step)
        for name, value in start.items():
            moved = not torch.equal(value, weights[name])
            if name.startswith("head."):
                assert not torch.equal(previous[name], weights[name]), (step, name)
            elif step <= 3:
                assert not moved, (step, name)
        previous = weights
    encoder_moved = [n for n in start if not n.startswith("head.") and not torch.equal(
        start[n], previous[n])]  # fmt: skip
    assert "embeddings.word_embeddings.weight" in encoder_moved
    optimizer = torch.load(
        result.output_dir / "checkpoints" / "step-00000003" / "optimizer.bin", weights_only=True
    )
    # Only the head's two tensors have optimizer state before the encoder starts.
    assert len(optimizer["state"]) == 2


def test_head_warmup_resumes_exactly(tmp_path, colbertkit_dir, dataset):
    settings = dict(head_warmup_steps=2, max_steps=5, save_steps=1, num_max_checkpoints=None)
    full = train(base_config(tmp_path / "full", colbertkit_dir, dataset, **settings))
    resumed_dir = tmp_path / "resumed"
    checkpoint = "step-00000001"  # inside the warm-up
    shutil.copytree(
        full.output_dir / "checkpoints" / checkpoint, resumed_dir / "checkpoints" / checkpoint
    )
    resumed = train(
        base_config(
            tmp_path, colbertkit_dir, dataset, output_dir=str(resumed_dir), resume_from="latest",
            **settings,
        )
    )  # fmt: skip
    assert_same_weights(final_weights(resumed.model_dir), final_weights(full.model_dir))


def test_distillation_runs_trains_and_resumes(tmp_path, colbertkit_dir):
    """loss contrastive+kl on rows with teacher scores and graded rows (no neg)."""
    rows = toy_rows(16, seed=5)
    for index, row in enumerate(rows):
        row["pos_scores"] = [1.0]
        row["neg_scores"] = [0.1 * i for i in range(len(row["neg"]))]
        if index % 2:  # the distillation form: every passage graded, no neg
            row["pos"] = row["pos"] + row.pop("neg")
            row["pos_scores"] = row["pos_scores"] + row.pop("neg_scores")
    dataset = write_rows(tmp_path / "distill.jsonl", rows)
    settings = dict(
        loss="contrastive+kl", distill_weight=0.5, teacher_temperature=0.5, epochs=2,
        save_steps=3, num_max_checkpoints=None,
    )  # fmt: skip
    full = train(base_config(tmp_path / "full", colbertkit_dir, dataset, **settings))
    assert full.global_step == 8 and full.last_loss is not None and full.last_loss > 0
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(
        full.output_dir / "checkpoints" / "step-00000003",
        resumed_dir / "checkpoints" / "step-00000003",
    )
    resumed = train(
        base_config(
            tmp_path, colbertkit_dir, dataset, output_dir=str(resumed_dir), resume_from="latest",
            **settings,
        )
    )  # fmt: skip
    assert_same_weights(final_weights(resumed.model_dir), final_weights(full.model_dir))


def test_kl_needs_teacher_scores_on_every_row(tmp_path, colbertkit_dir, dataset):
    from colbertkit.errors import InputError

    config = base_config(tmp_path, colbertkit_dir, dataset, loss="kl", validate_data=False)
    with pytest.raises(
        InputError, match=r"train.jsonl:1: pos_scores is missing .* \(give every row"
    ):
        train(config)
    # With validation on, the validate-data report names the problem first.
    with pytest.raises(ColbertkitError, match=r"24 missing_scores"):
        train(base_config(tmp_path, colbertkit_dir, dataset, loss="kl"))


def test_fresh_head_from_a_bare_encoder(tmp_path, encoder_dir, dataset):
    result = train(base_config(tmp_path, encoder_dir, dataset, colbert_dim=8, max_steps=2))
    weights = final_weights(result.model_dir)
    assert weights["head.weight"].shape == (8, 32)


def test_gradient_checkpointing_and_grad_cache_match_the_plain_run(
    tmp_path, colbertkit_dir, dataset
):
    """Same chunks, same dropout masks: checkpointing and GradCache change memory, not maths."""

    def weights(name, **overrides):
        config = base_config(
            tmp_path / name, colbertkit_dir, dataset, max_steps=3, encode_chunk_size=3, **overrides
        )
        return final_weights(train(config).model_dir)

    plain = weights("plain")
    for name, overrides in {
        "checkpointing": {"gradient_checkpointing": True},
        "gradcache": {"grad_cache": True},
    }.items():
        other = weights(name, **overrides)
        for key in plain:
            torch.testing.assert_close(
                other[key], plain[key], rtol=1e-4, atol=1e-5, msg=f"{name}: {key}"
            )


@pytest.mark.parametrize(
    "overrides",
    [
        {"mixed_precision": "bf16"},
        {"other_positives_as_negatives": True, "neg_nums": 0, "progress_bar": True},
        {"negatives_sampling": "once", "encode_chunk_size": None, "pad_to_multiple_of": 8},
    ],
    ids=["bf16-on-cpu", "in-batch-positives-only", "sampling-once-unchunked"],
)
def test_option_combinations_run(tmp_path, colbertkit_dir, dataset, overrides):
    result = train(base_config(tmp_path, colbertkit_dir, dataset, max_steps=2, **overrides))
    assert result.global_step == 2 and result.last_loss is not None and result.last_loss > 0


@pytest.mark.slow
def test_toy_task_is_learned(tmp_path, colbertkit_dir):
    """The loss falls clearly and held-out MRR@10 rises on a task that needs learning."""
    train_file = write_rows(tmp_path / "train.jsonl", toy_rows(160, seed=1, negatives=6))
    eval_file = write_rows(tmp_path / "eval.jsonl", toy_rows(40, seed=2, negatives=6))
    result = train(
        base_config(
            tmp_path, colbertkit_dir, train_file, eval_dataset=str(eval_file), epochs=4,
            batch_size=8, neg_nums=4, lr=2e-3, warmup_proportion=0.05, eval_at_start=True,
            logging_steps=5,
        )
    )  # fmt: skip
    losses = [m["train/loss"] for m in read_metrics(result.output_dir) if "train/loss" in m]
    first, last = sum(losses[:2]) / 2, sum(losses[-2:]) / 2
    assert last < 0.5 * first, losses
    mrr = [entry["mrr@10"] for entry in result.eval_history]
    assert mrr[-1] > mrr[0] + 0.2, result.eval_history
    assert (result.output_dir / "best" / "colbertkit.json").is_file()
    assert result.best_metric == max(mrr)


@pytest.mark.parametrize("backend", ["tensorboard", "wandb"])
def test_trackers_write_next_to_metrics_jsonl(
    tmp_path, colbertkit_dir, dataset, backend, monkeypatch
):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    config = base_config(
        tmp_path, colbertkit_dir, dataset, log_with=backend, max_steps=2, run_name="toy"
    )
    result = train(config)
    assert [m["step"] for m in read_metrics(result.output_dir)] == [1, 2]
    if backend == "tensorboard":
        assert list((result.output_dir / "logs").rglob("events.out.tfevents.*"))
    else:
        assert list((result.output_dir / "wandb").glob("offline-run-*"))


@pytest.mark.slow
def test_minilm_trains_a_few_steps_and_the_result_scores(tmp_path):
    """The packaged all-MiniLM-L6-v2 (no head: a fresh one) trains on example_data/ and the
    saved model works in `colbertkit score`."""
    from typer.testing import CliRunner

    from colbertkit.cli.app import app

    example = Path(__file__).resolve().parents[1] / "example_data" / "train.jsonl"
    dataset = (
        example if example.is_file() else write_rows(tmp_path / "train.jsonl", toy_rows(8, seed=4))
    )
    config = base_config(
        tmp_path, Path("sentence-transformers/all-MiniLM-L6-v2"), dataset, batch_size=2, neg_nums=3,
        max_steps=3, lr=2e-5, query_max_len=32, passage_max_len=64, colbert_dim=128,
    )  # fmt: skip
    config["model"] = "sentence-transformers/all-MiniLM-L6-v2"
    result = train(config)
    assert result.global_step == 3 and result.last_loss is not None
    pairs = tmp_path / "pairs.tsv"
    pairs.write_text(
        "what is the capital of france\tParis is the capital of France.\n"
        "what is the capital of france\tThe cat sat on the mat.\n"
    )
    scored = CliRunner().invoke(
        app, ["score", str(result.model_dir), str(pairs), "--format", "tsv"]
    )
    assert scored.exit_code == 0, scored.output
    scores = [float(line.rsplit("\t", 1)[1]) for line in scored.stdout.splitlines()]
    assert len(scores) == 2 and scores[0] > scores[1]


def test_bad_data_stops_before_training(tmp_path, colbertkit_dir):
    from colbertkit.errors import ColbertkitError

    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        json.dumps({"query": "q", "pos": "a bare string", "neg": ["n"]}) + "\n" + "{not json\n"
    )
    with pytest.raises(ColbertkitError, match=r"2 errors .*colbertkit validate-data"):
        train(base_config(tmp_path, colbertkit_dir, bad))
    assert not (tmp_path / "run" / "train_config.json").exists()


def test_validation_can_be_left_to_the_launcher(tmp_path, colbertkit_dir, dataset, monkeypatch):
    import colbertkit.validation

    def fail(*args, **kwargs):
        raise AssertionError("validate_dataset ran although validate_data is off")

    monkeypatch.setattr(colbertkit.validation, "validate_dataset", fail)
    config = base_config(tmp_path, colbertkit_dir, dataset, max_steps=1, validate_data=False)
    assert train(config).output_dir.is_dir()
    with pytest.raises(AssertionError, match="validate_dataset ran"):
        train(base_config(tmp_path / "again", colbertkit_dir, dataset, max_steps=1))


def test_plan_counts_negatives_steps_and_warmup(tmp_path, dataset):
    from colbertkit.training import plan_training

    settings = {"model": "m", "dataset": str(dataset), "output_dir": "o", "neg_nums": 3}
    plan = plan_training({**settings, "batch_size": 4, "warmup_proportion": 0.5}, world_size=2)
    # 24 examples, global batch 8: 3 steps; 4 queries x 3 negatives seen per query, per process
    assert plan["total_steps"] == 3 and plan["warmup_steps"] == 1
    assert plan["negatives_per_query"] == 12 and plan["global_batch_size"] == 8
    gathered = plan_training(
        {**settings, "batch_size": 4, "gather_across_processes": True}, world_size=2
    )
    assert gathered["negatives_per_query"] == 24
    accumulated = plan_training({**settings, "batch_size": 2, "gradient_accumulation_steps": 3})
    assert accumulated["effective_batch_size"] == 6 and accumulated["negatives_per_query"] == 6
    assert accumulated["total_steps"] == 4  # 12 micro-batches / 3


# --------------------------------------------------------------------------------------------
# Precision: what really runs inside the forward
# --------------------------------------------------------------------------------------------


@pytest.fixture
def activation_dtypes():
    """(grad enabled?, output dtype) of every Linear forward (the encoder's projections and
    the head: where the arithmetic is) while the test runs.

    A process-wide forward hook (torch's own API): it sees the model train() builds inside.
    Layer outputs would not do: CPU autocast keeps LayerNorm in fp32.
    """
    seen: list[tuple[bool, torch.dtype]] = []

    def record(module, args, output):
        # Batches of one are the engine's probe for unused parameters (one fp32 forward before
        # training starts), not training or evaluation.
        if isinstance(module, torch.nn.Linear) and args[0].shape[0] > 1:
            seen.append((torch.is_grad_enabled(), output.dtype))

    handle = torch.nn.modules.module.register_module_forward_hook(record)
    yield seen
    handle.remove()


@pytest.mark.parametrize("mixed_precision", ["bf16", "no", "auto"])
def test_mixed_precision_really_runs_the_encoder_in_it(
    tmp_path, colbertkit_dir, dataset, activation_dtypes, mixed_precision
):
    from colbertkit.precision import resolve_mixed_precision

    expected = {"bf16": torch.bfloat16, "no": torch.float32}[
        resolve_mixed_precision(mixed_precision, "cpu")[0]
    ]
    result = train(
        base_config(tmp_path, colbertkit_dir, dataset, max_steps=2, mixed_precision=mixed_precision)
    )
    assert result.global_step == 2 and result.last_loss is not None
    training = [dtype for grad, dtype in activation_dtypes if grad]
    assert training and set(training) == {expected}


def test_eval_dtype_sets_the_evaluation_precision_of_an_fp32_run(
    tmp_path, colbertkit_dir, dataset, activation_dtypes
):
    config = base_config(
        tmp_path, colbertkit_dir, dataset, max_steps=1, eval_dataset=str(dataset), eval_dtype="bf16"
    )
    result = train(config)
    assert result.eval_history and 0 <= result.eval_history[-1]["mrr@10"] <= 1
    training = {dtype for grad, dtype in activation_dtypes if grad}
    evaluation = {dtype for grad, dtype in activation_dtypes if not grad}
    assert training == {torch.float32} and evaluation == {torch.bfloat16}


def test_eval_dtype_cannot_contradict_mixed_precision(tmp_path, colbertkit_dir, dataset):
    config = base_config(
        tmp_path,
        colbertkit_dir,
        dataset,
        max_steps=1,
        eval_dataset=str(dataset),
        mixed_precision="bf16",
        eval_dtype="fp32",
    )
    with pytest.raises(UsageError, match=r"eval_dtype fp32: evaluation runs in the training's"):
        train(config)


def test_without_head_warmup_the_schedule_is_transformers_cosine():
    from transformers import get_cosine_schedule_with_warmup

    from colbertkit.training import learning_rate_schedule

    def rates(make) -> list[list[float]]:
        groups = [
            {"name": n, "params": [torch.nn.Parameter(torch.zeros(1))]} for n in ("head", "encoder")
        ]
        optimizer = torch.optim.AdamW(groups, lr=1e-3)
        scheduler = make(optimizer)
        seen = []
        for _ in range(20):
            seen.append(scheduler.get_last_lr())
            optimizer.step()
            scheduler.step()
        return seen

    ours = rates(lambda o: learning_rate_schedule(o, 3, 20))
    assert ours == rates(lambda o: get_cosine_schedule_with_warmup(o, 3, 20))


def test_after_a_head_warmup_the_encoder_warms_up_on_its_own():
    from colbertkit.training import learning_rate_schedule

    groups = [
        {"name": name, "params": [torch.nn.Parameter(torch.zeros(1))], "lr": lr}
        for name, lr in (("head", 1e-3), ("head_no_decay", 1e-3), ("encoder", 2e-5))
    ]
    optimizer = torch.optim.AdamW(groups, lr=1e-3)
    scheduler = learning_rate_schedule(
        optimizer, 2, 25, head_warmup_steps=5, encoder_warmup_steps=2
    )
    head, encoder = [], []
    for _ in range(25):
        rates = scheduler.get_last_lr()
        head.append(rates[0])
        encoder.append(rates[2])
        optimizer.step()
        scheduler.step()
    assert head[:3] == [0.0, 5e-4, 1e-3]  # the head: its usual warm-up from step 0
    assert encoder[:6] == [0.0] * 6  # the encoder: nothing during the head warm-up ...
    assert encoder[6] == pytest.approx(1e-5) and encoder[7] == pytest.approx(
        2e-5
    )  # ... then a ramp
    assert encoder[7] > encoder[8] > encoder[24] > 0  # and the same cosine decay to the end


def test_eval_rows_without_negatives_are_left_out_not_counted_as_perfect(
    tmp_path, colbertkit_dir, dataset, capsys
):
    rows = [json.loads(line) for line in dataset.read_text().splitlines()][:6]
    ranked = write_rows(tmp_path / "ranked.jsonl", rows)
    mixed = write_rows(
        tmp_path / "mixed.jsonl",
        [
            *rows,
            {"query": "what is paris", "pos": ["paris is a city"]},  # nothing to rank against
            {"query": "cats", "pos": ["a cat", "the dog"], "pos_scores": [0.9, 0.2]},  # graded
        ],
    )
    results = [
        train(base_config(tmp_path / name, colbertkit_dir, dataset, max_steps=2,
                          eval_dataset=str(eval_file)))
        for name, eval_file in (("ranked", ranked), ("mixed", mixed))
    ]  # fmt: skip
    assert results[1].eval_history == results[0].eval_history  # the two rows changed nothing
    assert "2 of 8 eval rows have no negatives and are left out" in capsys.readouterr().err
