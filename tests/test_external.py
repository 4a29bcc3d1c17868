"""Models the kit did not train (issue 17, part 4): a state dict the test makes and saves, evaluated through
``advkit evaluate``, gives the numbers of evaluate_model on the model in memory, lands in a run folder that the
summaries, the explorer and load_run read beside trained runs, and every bad input is refused before anything is
written."""

import functools

import pytest
import torch
import torchvision

from advkit import cli, config, data, examples, explore, external, models, plots, results, run
from advkit.evaluate import evaluate_model
from advkit.rundir import RunDir

EVAL = ["-p", "preset", "test", "-p", "n_test", "64", "-p", "eval_checkpoints", "[1, 2]", "-p", "sanity_n", "0"]


@functools.cache
def _images() -> torch.Tensor:
    return next(iter(data.make_loader("fashion-mnist", "train", 128, n=128, seed=0)))[0].float() / 255


def _model(mean: float = 0.5, std: float = 0.25, seed: int = 0) -> torch.nn.Module:
    """small_resnet8 for Fashion-MNIST with its own input normalisation, its BN statistics set from training
    images (so that its predictions depend on the input and on the normalisation)."""
    torch.manual_seed(seed)
    model = models.build_model("small_resnet8", 10, "bn", in_channels=1, mean=(mean,), std=(std,),
                               zero_init_residual=False)
    with torch.no_grad():
        model.train()(_images())
    return model.eval()


def _evaluate(tmp_path, name: str, weights, *options: str, arch: str = "small_resnet8") -> int:
    return cli.main(["evaluate", "--arch", arch, "--weights", str(weights), "--name", name,
                     "-p", "runs_root", str(tmp_path), *EVAL, *options])


def _reference(model: torch.nn.Module, tmp_path):
    cfg = config.make_config("test", name="in-memory", runs_root=str(tmp_path / "reference"), n_test=64,
                             eval_checkpoints=[1, 2], sanity_n=0)
    return evaluate_model(model, cfg, show_progress=False)


def _same_numbers(folder: RunDir, reference) -> None:
    written = folder.results()
    columns = ["branch", "attack", "steps", "accuracy", "worst_accuracy", "n", "weights"]
    assert written[columns].equals(reference[columns]), (written[columns], reference[columns])


def test_evaluate_gives_evaluate_model_numbers_for_plain_prefixed_and_wrapped_state_dicts(tmp_path):
    model = _model()
    net = model.net.state_dict()  # torchvision-style names, no normaliser: the weights expect normalised inputs
    reference = _reference(model, tmp_path)
    files = {"plain": net, "ddp": {f"module.{k}": v for k, v in net.items()},
             "wrapped": {"state_dict": net, "epoch": torch.tensor(3)}}
    for name, content in files.items():
        torch.save(content, tmp_path / f"{name}.pt")
        assert _evaluate(tmp_path, name, tmp_path / f"{name}.pt", "--mean", "0.5", "--std", "0.25") == 0
        folder = RunDir(tmp_path / name)
        assert folder.finished()
        _same_numbers(folder, reference)  # the weights' digest too: the same parameters, buffers and normaliser
        saved = folder.config()[external.RECORD_KEY]
        assert saved["sha256"] == external.file_sha256(tmp_path / f"{name}.pt")
        assert (saved["normalization"], saved["mean"], saved["std"]) == ("given", [0.5], [0.25])
    assert _evaluate(tmp_path, "default-norm", tmp_path / "plain.pt") == 0  # the data set's mean/std: other numbers
    assert RunDir(tmp_path / "default-norm").results()["weights"][0] != reference["weights"][0]


def test_norm_inside_makes_the_kits_normaliser_the_identity_and_a_kit_state_dict_brings_its_own(tmp_path):
    model = _model(mean=0.0, std=1.0)  # a model that takes [0, 1] inputs as they are
    torch.save({"model": {f"module.{k}": v for k, v in model.net.state_dict().items()}}, tmp_path / "inside.pt")
    assert _evaluate(tmp_path, "inside", tmp_path / "inside.pt", "--norm-inside", "-p", "sanity_n", "8",
                     "-p", "tensorboard", "true") == 0
    folder = RunDir(tmp_path / "inside")
    _same_numbers(folder, _reference(model, tmp_path))
    assert folder.config()[external.RECORD_KEY]["normalization"] == "inside"
    assert folder.sanity_file.exists() and folder.tensorboard_eval.exists()
    kit = _model(mean=0.3, std=0.4, seed=1)
    torch.save(kit.state_dict(), tmp_path / "kit.pt")  # normalize.mean/std inside the file
    assert _evaluate(tmp_path, "kit", tmp_path / "kit.pt") == 0
    _same_numbers(RunDir(tmp_path / "kit"), _reference(kit, tmp_path))
    assert RunDir(tmp_path / "kit").config()[external.RECORD_KEY]["normalization"] == "weights file"


def test_autoattack_rows_and_checks_are_written_as_for_a_trained_run(tmp_path, monkeypatch):
    from advkit import autoattack

    monkeypatch.setattr(autoattack, "REFERENCE_ITERATIONS", 5)  # the reference budget cut: seconds
    torch.save(_model().net.state_dict(), tmp_path / "w.pt")
    assert _evaluate(tmp_path, "aa", tmp_path / "w.pt", "--mean", "0.5", "--std", "0.25", "-p", "n_test", "16",
                     "-p", "eval_autoattack_n", "8") == 0
    folder = RunDir(tmp_path / "aa")
    table = folder.results().set_index("attack")
    assert table.loc[["apgd-ce", "apgd-t", "autoattack"], "n"].tolist() == [8, 8, 8]
    sanity = folder.sanity_file.read_text()
    assert "AutoAttack not weaker than untargeted PGD-5" in sanity


REFUSALS = {  # case -> (extra arguments, weights file content or None for no file, words the message must hold)
    "missing file": ([], None, ["weights=", "no such file"]),
    "keys that do not fit": (["arch=small_resnet14"], "net", ["small_resnet14", "missing key(s)", "layer1.1."]),
    "unexpected keys": ([], "net+extra", ["unexpected key(s)", "net.head.weight"]),
    "another shape": ([], "5 classes", ["of another shape", "net.fc.weight is (5, 64)", "10 classes"]),
    "an arch the kit does not know": (["arch=resnet999"], "net", ["arch='resnet999'", "small_resnet8"]),
    "mean of the wrong length": (["--mean", "0.5,0.5", "--std", "0.2,0.2"], "net", ["mean=[0.5, 0.5]", "1 channel"]),
    "mean without std": (["--mean", "0.5"], "net", ["std=None", "give both"]),
    "arch given twice": (["-p", "arch", "small_resnet14"], "net", ["arch is given twice"]),
    "mean that is no number": (["--mean", "a", "--std", "1"], "net", ["--mean='a'", "numbers"]),
    "norm inside and mean": (["--norm-inside", "--mean", "0.5", "--std", "0.2"], "net", ["norm_inside", "together"]),
    "not a state dict": ([], "list", ["not a state dict"]),
    "a pickled module (code)": ([], "module", ["weights_only", "cannot read"]),
    "a kit state dict with a mean": (["--mean", "0.5", "--std", "0.2"], "kit", ["carries its own input normalis"]),
}


@pytest.mark.parametrize("case", REFUSALS)
def test_bad_input_is_refused_by_name_before_anything_is_written(case, tmp_path, capsys):
    arguments, content, words = REFUSALS[case]
    model = _model()
    made = {"net": model.net.state_dict(), "list": [1, 2], "module": model, "kit": model.state_dict(),
            "net+extra": model.net.state_dict() | {"head.weight": torch.zeros(2)},
            "5 classes": model.net.state_dict() | {"fc.weight": torch.zeros(5, 64), "fc.bias": torch.zeros(5)}}
    weights = tmp_path / "weights.pt"
    if content is not None:
        torch.save(made[content], weights)
    arch = [a.removeprefix("arch=") for a in arguments if a.startswith("arch=")] or ["small_resnet8"]
    options = [a for a in arguments if not a.startswith("arch=")]
    code = _evaluate(tmp_path, "refused", weights, *options, arch=arch[0])
    message = capsys.readouterr().err
    assert code == 2 and all(w in message for w in words), message
    assert not (tmp_path / "refused").exists()


def test_an_evaluated_run_is_listed_beside_trained_runs_loads_back_and_is_never_overwritten(tmp_path, capsys):
    trained = config.make_config("test", name="trained", runs_root=str(tmp_path), epochs=1, n_train=64,
                                 batch_size=32, n_test=64, eval_checkpoints=[1, 2], sanity_n=0, bnstats_channels=0)
    run.run(trained, show_progress=False)
    model = _model()
    torch.save(model.net.state_dict(), tmp_path / "w.pt")
    assert _evaluate(tmp_path, "external", tmp_path / "w.pt", "--mean", "0.5", "--std", "0.25") == 0
    finished, others = results.scan_runs(tmp_path)
    assert others.empty
    strategies = {folder.name: cfg["strategy"] for folder, cfg, _, _ in finished}
    assert strategies == {"trained": trained.strategy, "external": external.EXTERNAL_STRATEGY}
    summary = results.summary_table(tmp_path)
    assert set(summary["strategy"]) == {trained.strategy, external.EXTERNAL_STRATEGY}
    frame = explore.explorer_frame(tmp_path)
    kit = frame[frame["source"] == "kit"]
    assert set(plots._plain_adversarial(kit)["run"]) == {"trained"}  # no figure takes it for a kit strategy
    explorer = explore.make_explorer(frame, show=False, runs_root=tmp_path, attack=examples.adversarial_examples)
    explorer.filters["strategy"].value = external.EXTERNAL_STRATEGY
    assert explorer.error is None and set(explorer.selection["run"]) == {"external"}
    explore.compute_examples(explorer, force=True)  # the viewer attacks it: load_run reads the weights file
    assert explorer.error is None and explorer.drawn["examples"] is not None
    cfg, loaded = run.load_run(tmp_path / "external")
    assert models.weights_digest(loaded) == RunDir(tmp_path / "external").results()["weights"][0]

    before = (tmp_path / "external" / "results.csv").read_bytes()
    torch.save(_model(seed=1).net.state_dict(), tmp_path / "other.pt")
    assert _evaluate(tmp_path, "external", tmp_path / "other.pt") == 2
    assert "already holds a run" in capsys.readouterr().err
    assert _evaluate(tmp_path, "external", tmp_path / "other.pt", "-p", "resume", "true") == 2
    assert "sha256" in capsys.readouterr().err
    assert _evaluate(tmp_path, "trained", tmp_path / "w.pt", "-p", "resume", "true") == 2
    assert "holds a trained run" in capsys.readouterr().err
    assert (tmp_path / "external" / "results.csv").read_bytes() == before
    assert _evaluate(tmp_path, "external", tmp_path / "w.pt", "--mean", "0.5", "--std", "0.25",
                     "-p", "resume", "true") == 0  # the same weights: evaluated again, from its saved batches
    assert (tmp_path / "external" / "results.csv").read_bytes() == before
    (tmp_path / "w.pt").write_bytes((tmp_path / "other.pt").read_bytes())
    with pytest.raises(ValueError, match="changed since"):
        run.load_run(tmp_path / "external")


def test_torchvision_resnet_weights_load_into_the_kits_imagenet_resnets(tmp_path):
    """torchvision's ResNet-50 state dict gives the kit's ResNet-50 torchvision's function on normalised inputs;
    ResNet-101/152's names and shapes fit as well (checked on the meta device)."""
    torch.manual_seed(0)
    reference = torchvision.models.resnet50().eval()
    torch.save(reference.state_dict(), tmp_path / "r50.pt")
    cfg = config.make_config("test", name="r50", runs_root=str(tmp_path), arch="resnet50", dataset="imagenet")
    model, record = external.load_weights(cfg, tmp_path / "r50.pt")
    assert record["normalization"] == "dataset"
    x = torch.rand(2, 3, 64, 64)
    mean, std = torch.tensor(record["mean"]).view(1, 3, 1, 1), torch.tensor(record["std"]).view(1, 3, 1, 1)
    with torch.no_grad():
        assert torch.allclose(model(x), reference((x - mean) / std), rtol=1e-4, atol=1e-5)
    for depth in (101, 152):
        with torch.device("meta"):
            state = getattr(torchvision.models, f"resnet{depth}")().state_dict()
            kit = models.build_model(f"resnet{depth}", 1000, "bn")
        external.check_fit(external.kit_names(state), kit, f"resnet{depth}")
