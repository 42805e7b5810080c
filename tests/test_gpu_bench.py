"""benchmarks/gpu_bench.py and train_bench.py run end to end in their quick modes (on the
CPU: the Triton backend in the interpreter) and write their tables and JSON."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import DEVICE

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_benchmark_quick_mode_writes_table_and_json(tmp_path):
    result = subprocess.run([sys.executable, "benchmarks/gpu_bench.py", "--quick", "--out", str(tmp_path)],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    data = json.loads((tmp_path / "gpu.json").read_text())
    assert data["methods"] == ["torch", "triton"]
    (row,) = data["rows"]
    assert row["batch"] == 2 and row["images_differing"] == 0 and row["triton_s"] > 0
    assert "| tiny | 2 |" in (tmp_path / "gpu.md").read_text()


def test_training_benchmark_quick_mode_writes_table_and_json(tmp_path):
    result = subprocess.run([sys.executable, "benchmarks/train_bench.py", "--quick", "--out", str(tmp_path)],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    loss, step = json.loads((tmp_path / f"train_{DEVICE}.json").read_text())["rows"]
    assert loss["case"] == "loss" and 0 < loss["triton_saved_MB"] < loss["torch_saved_MB"]
    assert step["case"] == "step" and step["torch_s"] > 0 and step["triton_s"] > 0
    assert "| loss | 1/8/K2, 3x8 | 2 |" in (tmp_path / f"train_{DEVICE}.md").read_text()


def test_fused_loss_keeps_under_a_third_of_pytorchs_memory_for_the_backward_pass(tmp_path):
    """CIFAR-10 configuration, batch 64, counted on the meta device: the fused loss keeps its
    inputs (26 MB of parameters) and nothing of size B x K x C x H x W."""
    result = subprocess.run([sys.executable, "benchmarks/train_bench.py", "--memory", "--out", str(tmp_path)],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    (loss,) = json.loads((tmp_path / f"train_{DEVICE}.json").read_text())["rows"]
    assert loss["triton_saved_MB"] == pytest.approx((64 * 100 + 64 * 3) * 32 * 32 * 4 / 1e6)
    assert loss["triton_saved_MB"] < loss["torch_saved_MB"] / 3
