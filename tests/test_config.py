from __future__ import annotations

from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ConfigAttributeError, ValidationError

from benchmark.tracking.identity import run_params


def test_defaults_compose_to_the_documented_cell(make_cfg):
    cfg = make_cfg()
    assert (cfg.dataset.name, cfg.colour.name, cfg.strategy.name, cfg.backbone.name, cfg.seed) == (
        "hymenoptera",
        "rgb",
        "finetune",
        "efficientnet_lite0",
        0,
    )
    assert cfg.trainer["_target_"] == "lightning.pytorch.Trainer"
    assert cfg.trainer["accelerator"] == "auto"
    assert cfg.tracking.experiment == "benchmark"


def test_groups_switch_and_trainer_arguments_pass_through(make_cfg):
    cfg = make_cfg(
        "colour=gray",
        "strategy=freeze",
        "backbone=resnet18",
        "trainer.max_epochs=3",
        "trainer.limit_train_batches=2",
        "+trainer.fast_dev_run=1",
    )
    assert cfg.colour.grayscale and cfg.strategy.trainable_stages == 0
    assert cfg.backbone.name == "resnet18"
    assert (cfg.trainer["max_epochs"], cfg.trainer["limit_train_batches"]) == (3, 2)
    assert cfg.trainer["fast_dev_run"] == 1


def test_unknown_group_value_is_refused_with_the_choices(make_cfg):
    with pytest.raises(ConfigCompositionException) as error:
        make_cfg("strategy=finetunee")
    assert "finetune" in str(error.value) and "freeze" in str(error.value)


def test_misspelt_key_and_wrong_type_are_refused(make_cfg):
    with pytest.raises(ConfigCompositionException) as error:
        make_cfg("dataset.val_fractoin=0.3")
    assert isinstance(error.value.__cause__, ConfigAttributeError)
    with pytest.raises(ConfigCompositionException) as error:
        make_cfg("seed=abc")
    assert isinstance(error.value.__cause__, ValidationError)


def test_data_root_falls_back_to_the_environment(make_cfg, monkeypatch, tmp_path):
    monkeypatch.setenv("BENCHMARK_DATA_ROOT", str(tmp_path / "elsewhere"))
    cfg = make_cfg(data_root=None)
    assert cfg.paths.data_root == str(tmp_path / "elsewhere")


def test_run_params_have_flat_cell_names_and_the_full_config(make_cfg):
    params = run_params(make_cfg("colour=gray", "seed=3"))
    assert {k: params[k] for k in ("dataset", "colour", "strategy", "backbone", "seed")} == {
        "dataset": "hymenoptera",
        "colour": "gray",
        "strategy": "finetune",
        "backbone": "efficientnet_lite0",
        "seed": 3,
    }
    assert params["strategy.lr"] > 0 and "trainer.max_epochs" in params


def test_auto_precision_is_bf16_where_native_and_explicit_values_stay(make_cfg, monkeypatch):
    from benchmark.models import precision

    assert make_cfg().trainer["precision"] == "auto"  # the default: decided per machine
    for native, expected in ((True, "bf16-mixed"), (False, "32-true")):
        monkeypatch.setattr(precision, "native_bf16", lambda device, native=native: native)
        cfg = precision.resolve(make_cfg())
        assert cfg.trainer["precision"] == expected
        assert run_params(cfg)["trainer.precision"] == expected  # stated in the run's params
    cfg = make_cfg("trainer.precision=32-true")  # how a user turns the fast path off
    monkeypatch.setattr(precision, "native_bf16", lambda device: True)
    assert precision.resolve(cfg).trainer["precision"] == "32-true"


def test_native_bf16_is_read_from_the_processor():
    import torch

    from benchmark.models import precision

    flags = Path("/proc/cpuinfo").read_text().split()
    assert precision.native_bf16("cpu") == ("avx512_bf16" in flags or "amx_tile" in flags)
    assert precision.device_type("cpu") == "cpu" and precision.device_type("gpu") == "cuda"
    assert precision.native_bf16("cuda") == (
        torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    )


def test_two_machines_that_chose_different_precisions_never_share_a_cell(make_cfg, monkeypatch):
    """`auto` resolves before the key (cell.run.plan): a bf16 machine's cell and an fp32
    machine's are two cells, so their runs are never averaged together (issue 32 item 5)."""
    from benchmark.models import precision
    from benchmark.tracking.identity import cell_key

    keys = set()
    for native in (True, False):
        monkeypatch.setattr(precision, "native_bf16", lambda device, native=native: native)
        keys.add(cell_key(precision.resolve(make_cfg()), "0" * 64))
    assert len(keys) == 2


def test_a_rule_says_null_where_it_allows_null_and_a_probe_is_checked_once(make_cfg):
    from benchmark.config.rules import RULES, problems

    for rule in RULES:  # the refusal's words match what the rule does with null
        assert rule.requirement.startswith("null") == rule.nullable, rule.key
        assert rule.allows(None) == rule.nullable, rule.key
    said = problems(make_cfg("strategy=linear_probe", "strategy.probe_c=[]"))
    assert said == ["strategy.probe_c is empty: give the C values to choose from."]
    said = problems(make_cfg("strategy=lp_ft", "strategy.probe_c=[]", "protocol=study"))
    assert len(said) == 2 and said[0].startswith("strategy=lp_ft: strategy.probe_c is empty")
    assert "strategy=lp_ft's probe to choose its C on" in said[1]
