"""Training profiles: validation messages, bundled lookup, precedence, generated configs."""

from __future__ import annotations

import re
import socket
from pathlib import Path

import pytest
import yaml

from colbertkit.errors import UsageError
from colbertkit.launcher import (
    accelerate_config,
    accelerate_config_for,
    layer_class_for_config,
    transformer_layer_class,
)
from colbertkit.profile import (
    bundled_profiles_dir,
    describe_sources,
    find_profile,
    parse_set_options,
    resolve_profile,
)

GOLDEN = Path(__file__).parent / "golden"
REQUIRED = {"model": "m", "dataset": "d.jsonl", "output_dir": "out"}
BASE = "model: m\ndataset: d\noutput_dir: o\n"


def write_profile(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "p.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (BASE + "learning_rat: 1e-5\n", "unknown setting 'learning_rat' (did you mean 'lr'?)"),
        (BASE + "learning_rate: 1e-5\n", "unknown setting 'learning_rate' (did you mean 'lr'?)"),
        (BASE + "distributed:\n  stratgy: ddp\n", "unknown setting 'distributed.stratgy' (did you mean 'distributed.strategy'?)"),
        (BASE + "expected_num_processes: 2\n", "colbertkit train sets it itself"),
        (BASE + "lr: fast\n", "invalid profile: lr: Input should be a valid number"),
        (BASE + "batch_size: 0\n", "batch_size: Input should be greater than or equal to 1"),
        (BASE + "distributed:\n  num_processes: 2\n", "strategy 'none' runs one process but num_processes x num_machines is 2"),
        (BASE + "distributed:\n  strategy: ddp\n  num_machines: 2\n", "num_machines > 1 needs main_process_ip"),
        (BASE + "grad_cache: true\nencode_chunk_size: null\n", "grad_cache needs encode_chunk_size"),
        ("model: m\noutput_dir: o\n", "dataset is not set in"),
        ("model: m\ndataset: d\noutput_dir: [o\n", "not valid YAML"),
        ("- a\n- b\n", "a profile is a mapping of settings, not a list"),
    ],
)  # fmt: skip
def test_profile_errors_name_the_setting_and_the_fix(tmp_path, text, message):
    path = write_profile(tmp_path, text)
    with pytest.raises(UsageError) as error:
        resolve_profile(str(path))
    assert message in str(error.value)
    assert str(error.value).startswith(str(path)) or "is not set in" in str(error.value)
    assert "\n" not in str(error.value)


def test_yaml_error_names_the_line(tmp_path):
    path = write_profile(tmp_path, "model: m\ndataset: d\n  bad: indent\n")
    with pytest.raises(UsageError, match=re.escape(f"{path.name}:3: not valid YAML")):
        resolve_profile(str(path))


def test_bundled_profiles_are_found_by_name_and_all_validate():
    names = sorted(p.stem for p in bundled_profiles_dir().glob("*.yaml"))
    assert names == ["bge-m3", "chinese-roberta-wwm-ext", "demo", "minilm"]
    for name in names:
        assert find_profile(name) == find_profile(f"{name}.yaml")
        resolved = resolve_profile(name, {"dataset": "d.jsonl"})
        profile = resolved.profile
        # Each bundled profile states its temperature and lengths itself.
        for key in ("temperature", "query_max_len", "passage_max_len"):
            assert resolved.sources[key] == "profile", (name, key)
        assert profile.train_config().expected_num_processes == profile.distributed.world_size


def test_a_path_wins_over_a_bundled_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("demo").write_text("model: mine\ndataset: d\noutput_dir: o\n")
    assert resolve_profile("demo").profile.model == "mine"


def test_unknown_profile_lists_the_bundled_ones():
    expected = "bundled: bge-m3.yaml, chinese-roberta-wwm-ext.yaml, demo.yaml, minilm.yaml"
    with pytest.raises(UsageError, match=re.escape(expected)):
        find_profile("nope")


def test_precedence_flags_over_profile_over_defaults(tmp_path):
    path = write_profile(tmp_path, BASE + "lr: 1.0e-5\nepochs: 3\n")
    overrides = parse_set_options(
        ["lr=2e-6", "distributed.strategy=ddp", "distributed.num_processes=2"]
    )
    resolved = resolve_profile(str(path), overrides)
    assert resolved.profile.lr == 2e-6
    assert resolved.profile.epochs == 3
    assert resolved.profile.temperature == 0.02
    sources = {key: source for key, _, source in describe_sources(resolved)}
    assert (sources["lr"], sources["epochs"], sources["temperature"]) == (
        "flag",
        "profile",
        "default",
    )
    assert sources["distributed.num_processes"] == "flag"
    assert "expected_num_processes" not in sources


def test_set_options_are_typed_and_nested():
    assert parse_set_options(["lr=2e-6", "grad_cache=true", "run_name=x", "max_steps=null"]) == {
        "lr": 2e-6, "grad_cache": True, "run_name": "x", "max_steps": None,
    }  # fmt: skip
    assert parse_set_options(["distributed.fsdp_cpu_offload=yes"]) == {
        "distributed": {"fsdp_cpu_offload": True}
    }
    with pytest.raises(UsageError, match="expected KEY=VALUE"):
        parse_set_options(["lr"])


def _golden_config(name: str) -> dict:
    from transformers import BertConfig, XLMRobertaConfig

    profile = resolve_profile(name, {"dataset": "d.jsonl"}).profile
    layer = None
    if profile.distributed.strategy == "fsdp":
        config = XLMRobertaConfig() if "bge" in name else BertConfig()
        layer = layer_class_for_config(config)
    return accelerate_config(profile, gpu=profile.distributed.device != "cpu", layer_class=layer)


@pytest.mark.parametrize("name", ["bge-m3", "chinese-roberta-wwm-ext", "demo"])
def test_generated_accelerate_configs_match_the_golden_files(name):
    generated = _golden_config(name)
    golden = yaml.safe_load((GOLDEN / f"accelerate-{name}.yaml").read_text())
    port = generated.pop("main_process_port", None)  # free now: differs between calls
    assert (port is None) == (generated["num_processes"] == 1)
    assert generated == golden


def test_one_machine_launches_take_a_free_port_and_machines_agree_on_29500():
    from colbertkit.profile import DistributedConfig

    def port(**settings) -> int:
        dist = DistributedConfig(strategy="ddp", device="cpu", **settings)
        return accelerate_config_for(dist, mixed_precision="no", gpu=False, layer_class=None)[
            "main_process_port"
        ]

    first = port(num_processes=2)
    with socket.socket() as taken:  # a port in use is never handed out
        taken.bind(("127.0.0.1", first))
        taken.listen()
        assert port(num_processes=2) != first
    assert port(num_processes=2, num_machines=2, main_process_ip="10.0.0.1") == 29500
    assert port(num_processes=2, main_process_port=29511) == 29511


def test_bge_m3_is_really_sharded():
    config = _golden_config("bge-m3")
    assert config["distributed_type"] == "FSDP"
    assert config["fsdp_config"]["fsdp_sharding_strategy"] == "FULL_SHARD"
    assert config["fsdp_config"]["fsdp_transformer_layer_cls_to_wrap"] == "XLMRobertaLayer"
    assert config["num_processes"] == 8


def test_layer_class_comes_from_the_model(encoder_dir):
    from transformers import BertConfig, XLMRobertaConfig

    assert layer_class_for_config(BertConfig()) == "BertLayer"
    assert layer_class_for_config(XLMRobertaConfig()) == "XLMRobertaLayer"
    assert transformer_layer_class(str(encoder_dir)) == "BertLayer"


def test_fsdp_on_cpu_is_refused():
    profile = resolve_profile(
        None, {**REQUIRED, "distributed": {"strategy": "fsdp", "num_processes": 2}}
    ).profile
    with pytest.raises(
        UsageError, match=r"strategy fsdp needs GPUs.*use distributed\.strategy ddp"
    ):
        accelerate_config(profile, gpu=False, layer_class="BertLayer")


def test_cpu_ddp_uses_torchrun_processes_joined_over_gloo():
    profile = resolve_profile(
        None, {**REQUIRED, "distributed": {"strategy": "ddp", "num_processes": 2}}
    ).profile
    config = accelerate_config(profile, gpu=False, layer_class=None)
    assert config["use_cpu"] is True
    assert config["distributed_type"] == "MULTI_GPU"  # accelerate starts N CPU processes only so
    assert config["num_processes"] == 2


def test_multi_node_counts_processes_over_all_machines():
    profile = resolve_profile(
        None,
        {
            **REQUIRED,
            "distributed": {
                "strategy": "ddp", "num_processes": 4, "num_machines": 2, "machine_rank": 1,
                "main_process_ip": "10.0.0.1", "main_process_port": 29501,
            },
        },
    ).profile  # fmt: skip
    config = accelerate_config(profile, gpu=True, layer_class=None)
    assert (config["num_processes"], config["num_machines"], config["machine_rank"]) == (8, 2, 1)
    assert (config["main_process_ip"], config["main_process_port"]) == ("10.0.0.1", 29501)
    assert profile.train_config().expected_num_processes == 8


def test_mixed_precision_auto_is_resolved_for_accelerate_on_the_launching_machine():
    from colbertkit.precision import resolve_mixed_precision

    profile = resolve_profile(None, {**REQUIRED, "mixed_precision": "auto"}).profile
    config = accelerate_config(profile, gpu=False, layer_class=None)
    assert config["mixed_precision"] == resolve_mixed_precision("auto", "cpu")[0]
    assert config["mixed_precision"] in ("no", "bf16")  # accelerate knows no "auto"
    assert profile.train_config().mixed_precision == "auto"  # each worker decides on its device
