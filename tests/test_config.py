"""Config validation: each test failed on the code before its fix (a review of config/data/models)."""

import dataclasses

import pytest

from advkit import config, run
from advkit.config import Config, make_config

TYPES = {f.name: str(f.type).split(" | ") for f in dataclasses.fields(Config)}
BOOL_FIELDS = [name for name, kinds in TYPES.items() if "bool" in kinds]  # a new bool field is covered
TINY = dict(epochs=1, n_train=128, n_test=64, batch_size=32, eval_batch_size=32, eval_checkpoints=[1, 2],
            sanity_n=0, bnstats_channels=0)


def test_the_bool_fields_are_derived_from_the_dataclass():
    assert {"eval_targeted", "zero_init_residual", "sync_bn", "eval_bf16", "compile", "nesterov", "attack_fold_bn",
            "finetune_bn", "bf16", "channels_last", "resume", "overwrite", "tensorboard"} <= set(BOOL_FIELDS)


@pytest.mark.parametrize("name", BOOL_FIELDS)
@pytest.mark.parametrize("value", ["false", "True", 0, 1, 2.0])
def test_a_bool_parameter_accepts_only_a_bool(name, value):
    """The string 'false' (plain ``papermill -p eval_targeted false``) counted as True."""
    with pytest.raises(ValueError, match=rf"^{name}={value!r} is not accepted; choose one of \[False, True"):
        make_config("test", **{name: value})


@pytest.mark.parametrize("name", BOOL_FIELDS)
def test_a_bool_parameter_accepts_false_and_none_where_its_type_allows(name):
    assert getattr(make_config("test", **{name: False}), name) is False
    if "None" in TYPES[name]:
        assert getattr(make_config("test", **{name: None}), name) is None
    else:
        with pytest.raises(ValueError, match=rf"{name}=None is not accepted"):
            make_config("test", **{name: None})


def test_a_bool_passed_as_text_through_the_notebook_is_refused_naming_it():
    with pytest.raises(ValueError, match=r"eval_targeted='false' is not accepted; choose one of \[False, True\]"):
        config.config_from_parameters({"eval_targeted": "false"})


@pytest.mark.parametrize("overrides, message", [
    (dict(n_test=20000), r"n_test=20000 is not accepted; .*Fashion-MNIST's test split has 10000 images"),
    (dict(n_train=60001), r"n_train=60001 is not accepted; .*Fashion-MNIST's training split has 60000 images"),
    (dict(n_test=None, eval_autoattack_n=10001), r"eval_autoattack_n=10001 is not accepted; .*10000"),
    (dict(sanity_n=10001), r"sanity_n=10001 is not accepted; .*10000"),
    (dict(dataset="cifar10", n_train=50001), r"n_train=50001 is not accepted; .*CIFAR-10's training split has 50000"),
    (dict(dataset="cifar10", n_test=10001), r"n_test=10001 is not accepted; .*CIFAR-10's test split has 10000"),
])
def test_sizes_beyond_the_data_set_are_refused_naming_the_parameter(overrides, message):
    """n_test=20000 trained, then failed naming 'n'; n_train > 60000 failed after the run folder was taken."""
    with pytest.raises(ValueError, match=message):
        make_config("test", **overrides)


def test_the_whole_splits_are_accepted():
    assert make_config("test", n_train=60000, n_test=10000, eval_autoattack_n=10000, sanity_n=10000).n_test == 10000
    assert make_config("test", n_train=None, n_test=None, eval_autoattack_n=10000).eval_autoattack_n == 10000
    assert make_config("paper", n_train=None, n_test=None).dataset == "imagenet"  # size unknown: not checked


def test_n_test_changes_only_the_evaluation():
    saved = make_config("test").to_dict()
    other = make_config("test", n_test=64, resume=True)
    assert config.resume_conflicts(saved, other) == []
    assert config.evaluation_changed(saved, other)
    assert not config.evaluation_changed(saved, make_config("test", resume=True))


def test_a_finished_run_resumed_with_another_n_test_is_evaluated_on_it(tmp_path):
    run.run(make_config("test", **TINY | dict(runs_root=str(tmp_path))), show_progress=False)
    table = run.run(make_config("test", **TINY | dict(runs_root=str(tmp_path), n_test=32, resume=True)),
                    show_progress=False)
    assert set(table["n"]) == {32}


@pytest.mark.parametrize("overrides, message", [
    (dict(momentum=0.0, nesterov=True), r"nesterov=True is not accepted with momentum=0.0"),
    (dict(optimizer="rmsprop", nesterov=True), r"nesterov=True is not accepted with optimizer='rmsprop'"),
    (dict(schedule="cosine", lr_decay_epochs=[1]), r"lr_decay_epochs=\[1\] is not accepted with schedule='cosine'"),
    (dict(schedule="exp", lr_decay_factor=0.5), r"lr_decay_factor=0.5 is not accepted with schedule='exp'"),
    (dict(exp_decay_rate=0.5), r"exp_decay_rate=0.5 is not accepted with schedule='step'"),
    (dict(dataset="imagenet", arch="resnet50", width_multiplier=2),
     r"width_multiplier=2 is not accepted with arch='resnet50'"),
])
def test_combinations_that_would_be_ignored_or_fail_late_are_refused(overrides, message):
    with pytest.raises(ValueError, match=message):
        make_config("test", **overrides)


@pytest.mark.parametrize("preset, overrides, cleared", [
    ("test", dict(schedule="cosine"), dict(lr_decay_epochs=[])),  # the test preset's lr_decay_epochs=[1]
    ("paper", dict(schedule="exp"), dict(lr_decay_epochs=[])),
    ("study", dict(momentum=0.0), dict(nesterov=False)),  # the study preset's nesterov=True
    ("demo", dict(optimizer="rmsprop"), dict(nesterov=False)),
])
def test_a_presets_own_value_does_not_refuse_an_override_it_no_longer_applies_to(preset, overrides, cleared):
    cfg = make_config(preset, **overrides)
    assert {k: getattr(cfg, k) for k in cleared} == cleared
    assert make_config(None, **cfg.to_dict()) == cfg  # the saved config.json reads back
    via_notebook = config.config_from_parameters({"preset": preset, **overrides})
    assert via_notebook == cfg
