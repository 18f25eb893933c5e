"""Typed configuration: recipes, overrides, helpful errors, config diffs."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest

import longtail
from longtail.config import diff_configs, find_recipe, load_config
from longtail.core.errors import LongtailError
from longtail.models import autotune, build_model

SHIPPED = sorted((Path(longtail.__file__).parent / "configs").glob("*.yaml"))


def error_of(*args, **kwargs) -> str:
    with pytest.raises(LongtailError) as e:
        load_config(*args, **kwargs)
    return str(e.value)


def test_defaults_load():
    cfg = load_config()
    assert cfg.optim.lr == 0.1 and cfg.model.name == "resnet32" and cfg.swa.swag_rank == 20


def test_override_sets_typed_value():
    cfg = load_config(None, ["optim.lr=0.05", "seed=3", "optim.milestones=[10,20]", "data.root=/d"])
    assert cfg.optim.lr == 0.05 and cfg.seed == 3 and cfg.data.root == "/d"
    assert list(cfg.optim.milestones) == [10.0, 20.0]


def test_unknown_override_key_suggests_closest():
    msg = error_of(None, ["optim.lrr=0.1"])
    assert "'optim.lrr'" in msg and "did you mean 'optim.lr'" in msg


def test_unknown_key_in_yaml_suggests_closest(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("optim:\n  lr: 0.05\n  momentun: 0.8\n")
    msg = error_of(path)
    assert "'optim.momentun'" in msg and "did you mean 'optim.momentum'" in msg


@pytest.mark.parametrize(("item", "key"), [("optim.lr=abc", "optim.lr"), ("seed=1.5", "seed")])
def test_wrong_type_names_the_key(item, key):
    msg = error_of(None, [item])
    assert f"'{key}'" in msg


def test_wrong_type_in_yaml_names_the_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("optim:\n  epochs: many\n")
    assert "'optim.epochs'" in error_of(path)


def test_bad_choice_lists_the_choices():
    msg = error_of(None, ["sampler.name=foo"])
    assert "'sampler.name'" in msg and "'foo'" in msg
    for choice in ["instance", "class_balanced", "sqrt", "q", "progressive"]:
        assert choice in msg


def test_out_of_range_value_names_the_key():
    assert "'swa.swag_rank'" in error_of(None, ["swa.swag_rank=1"])
    assert "'optim.lr'" in error_of(None, ["optim.lr=0"])


def test_override_without_equals_is_rejected():
    msg = error_of(None, ["optim.lr"])
    assert "'optim.lr'" in msg and "key=value" in msg


def test_invalid_yaml_is_a_user_error(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("optim: [unclosed\n")
    assert str(path) in error_of(path)


def test_recipes_are_shipped():
    names = {p.stem for p in SHIPPED}
    assert {"digits_lt", "fashion_mnist_lt"} <= names


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_shipped_recipe_loads(path):
    cfg = load_config(path)
    assert cfg.optim.epochs >= 1
    assert load_config(path.stem) == cfg  # also found by name


def test_recipe_values_override_defaults():
    cfg = load_config("digits_lt", ["optim.lr=0.02"])
    assert cfg.data.dataset == "digits" and cfg.optim.schedule == "cosine"
    assert cfg.optim.lr == 0.02  # the override wins over the recipe


def test_find_recipe_by_name_and_file_name():
    expected = Path(longtail.__file__).parent / "configs" / "digits_lt.yaml"
    assert find_recipe("digits_lt").resolve() == expected.resolve()
    assert find_recipe("digits_lt.yaml").resolve() == expected.resolve()


def test_find_recipe_unknown_lists_shipped():
    with pytest.raises(LongtailError) as e:
        find_recipe("no_such_recipe")
    assert "no_such_recipe" in str(e.value) and "digits_lt" in str(e.value)


def test_find_recipe_prefers_an_existing_path(tmp_path):
    path = tmp_path / "digits_lt.yaml"
    path.write_text("seed: 7\n")
    assert find_recipe(path) == path
    assert load_config(path).seed == 7


def test_diff_configs_lists_differing_dotted_keys():
    a = load_config("digits_lt")
    b = load_config("digits_lt", ["optim.lr=0.05", "swa.swag_rank=5", "optim.milestones=[1,2]"])
    diff = diff_configs(a, b)
    assert [d.split(":")[0] for d in diff] == ["optim.lr", "optim.milestones", "swa.swag_rank"]
    assert "optim.lr: 0.1 != 0.05" in diff


def test_diff_configs_identical_and_ignored():
    a = load_config("digits_lt")
    assert diff_configs(a, load_config("digits_lt")) == []
    b = load_config("digits_lt", ["optim.lr=0.05", "device=cpu"])
    assert diff_configs(a, b, ignore=("device", "optim")) == []
    assert [d.split(":")[0] for d in diff_configs(a, b, ignore=("optim",))] == ["device"]


def test_switch_env_overrides_config_and_bad_values_name_the_fix(monkeypatch):
    assert autotune.resolve_mode(None) == "auto"
    assert autotune.resolve_mode("off") == "off"
    monkeypatch.setenv(autotune.ENV, "ON")
    assert autotune.resolve_mode("off") == "on"
    assert build_model("resnet32", 10, kernels="off").kernels == "on"
    monkeypatch.setenv(autotune.ENV, "fast")
    with pytest.raises(LongtailError, match=r"\$LONGTAIL_KERNELS='fast'; choose one of auto"):
        build_model("resnet32", 10)
    monkeypatch.delenv(autotune.ENV)
    with pytest.raises(LongtailError, match="kernels='yes'"):
        build_model("resnet32", 10, kernels="yes")
    with pytest.raises(LongtailError, match="kernels.*'maybe'"):
        load_config(None, ["kernels=maybe"])


def test_old_config_keys_still_load_with_a_deprecation_warning(tmp_path):
    with pytest.warns(DeprecationWarning, match="fused_bn / fast_conv are deprecated"):
        assert load_config(None, ["fused_bn=false"]).kernels == "off"
    old = tmp_path / "config.yaml"  # a run directory written before the switch
    old.write_text("fused_bn: true\nfast_conv: true\nkernels: on\n")
    with pytest.warns(DeprecationWarning, match="kernels=unchanged"):
        cfg = load_config(old)
    assert cfg.kernels == "on" and "fused_bn" not in cfg and "fast_conv" not in cfg
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_config(None, ["kernels=off"]).kernels == "off"


def test_a_retired_key_in_an_old_run_directory_loads_with_a_deprecation_warning(tmp_path):
    """``log_every_steps`` never had an effect and is gone from the schema, but every
    config.yaml written before holds it: such a run directory still loads (and resumes)."""
    old = tmp_path / "config.yaml"
    old.write_text("seed: 3\nlog_every_steps: 50\ncheckpoint_every_steps: 7\n")
    with pytest.warns(DeprecationWarning, match="log_every_steps are no longer used") as got:
        cfg = load_config(old)
    assert str(old) in str(got[0].message)
    assert "log_every_steps" not in cfg and (cfg.seed, cfg.checkpoint_every_steps) == (3, 7)
    assert diff_configs(cfg, load_config(None, ["seed=3", "checkpoint_every_steps=7"])) == []
    with pytest.warns(DeprecationWarning, match="ignored; delete them"):
        assert "log_every_steps" not in load_config(None, ["log_every_steps=3"])
    with pytest.raises(LongtailError, match="unknown config key 'log_every_step'"):
        load_config(None, ["log_every_step=3"])
