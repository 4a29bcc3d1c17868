import subprocess
import sys

import pandas as pd
import pytest

from advkit import bench, config, paths


def test_rows_pass_or_fail_by_their_target():
    assert bench.Row("a", "m", 0.9, 1.0).passed and not bench.Row("a", "m", 1.1, 1.0).passed
    assert bench.Row("b", "m", 6.0, 5.0, higher_is_better=True).passed
    assert bench.Row("c", "m", 1.0, None).passed is None and "info" in bench.Row("c", "m", 1.0, None).line()
    assert "ratio=0.900  target<=1  PASS" in bench.Row("a", "m", 0.9, 1.0).line()


def test_peak_memory_sees_a_large_allocation():
    """In a fresh process, as the bench measures: in a long-lived one the allocator reuses freed pages."""
    code = ("import torch; from advkit import bench; "
            "print(bench.peak_memory(lambda: torch.ones(16 * 2**20).sum(), torch.device('cpu')))")  # 64 MiB
    peak = int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                              cwd=paths.project_root()).stdout.split()[-1])
    assert 0.9 * 64 * 2**20 < peak < 3 * 64 * 2**20


def test_smoke_every_row_runs_in_quick_mode(tmp_path, capsys):
    """A smoke test: every row runs and prints (tiny sizes, no target checked); the ratios are make bench's."""
    out = tmp_path / "bench.csv"
    assert bench.main(["--quick", "--out", str(out)]) == 0
    table = pd.read_csv(out)
    expected = {"pgd_vs_floor", "pgd_vs_torchattacks", "pgd_folded_vs_unfolded", "pgd_channels_last_vs_default", "pgd_compiled_vs_default",
                "curve_one_pass", "train_step_vs_floor", "mbn_vs_bn", "eval_memory", "loader_vs_train",
                "imagenet_loader_vs_train"}  # imagenet_gpu_decode_vs_train: on CUDA only
    assert set(table["name"]) == expected
    assert (table["ratio"] > 0).all()
    printed = capsys.readouterr().out
    assert all(f"{name}[" in printed for name in expected)


def test_the_gpu_decoding_row_runs_its_code_on_the_cpu_with_workers():
    """The GPU path's row (on CUDA only in a real run) through the same code on the CPU, with a worker process
    reading the files' bytes: a smoke test of the row, not a measurement."""
    import torch

    (row,) = bench.imagenet_loader_rows(torch.device("cpu"), quick=True, num_workers=1, decodes=("gpu",))
    assert row.name == "imagenet_gpu_decode_vs_train" and row.model == "resnet50" and row.ratio > 0
    assert row.detail.startswith("cpu: ") and "1 workers read bytes" in row.detail


def test_a_negative_worker_count_is_refused(capsys):
    with pytest.raises(SystemExit):
        bench.main(["--quick", "--num-workers", "-1"])
    assert "--num-workers=-1 is not accepted" in capsys.readouterr().err


def test_the_floors_run_the_network_the_kits_attack_runs():
    """The floor of pgd_vs_floor is the BN-folded view the kit attacks (before: the unfolded model, which the
    attack beat by 40%, so a 1.05 target let an attack doing a third more work than needed pass). The training
    step's floor is k such steps plus one training forward-backward: the model's own BNs see exactly one pass."""
    import torch

    model = bench.bench_model("small_resnet8", torch.device("cpu")).eval()
    images, labels = bench.fashion_batch(8, torch.device("cpu"))
    bn = next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    modes = []
    bn.register_forward_hook(lambda m, args, out: modes.append(m.training))
    bench.floor_steps(model, images, labels, 3)
    assert modes == []  # every pass went through the folded view
    bench.training_floor(model, images, labels, labels, 2)
    assert modes == [True] and all(p.grad is None for p in model.parameters())
