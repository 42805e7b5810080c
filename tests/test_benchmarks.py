"""The benchmark suite and its report run end to end, in the suite's quick mode."""
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import write_random_mnist

ROOT = Path(__file__).resolve().parents[1]


def test_benchmarks_run_quickly_and_report(tmp_path):
    env = dict(os.environ, FASTPIXEL_BENCH_QUICK="1")
    result = subprocess.run([sys.executable, "-m", "pytest", "benchmarks/", "-q", "-p", "no:cacheprovider",
                             "--benchmark-json", str(tmp_path / "quick.json")],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    report = subprocess.run([sys.executable, "benchmarks/report.py", str(tmp_path / "quick.json"), "--out", str(tmp_path)],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert report.returncode == 0, report.stderr
    table = (tmp_path / "quick.md").read_text()
    assert "| tiny | 1 |" in table and "| tiny | 2 |" in table and "Check of the estimate" in table
    assert "vector extensions" in table  # every results file names the CPU's (benchmarks/machine.py)
    assert (tmp_path / "quick.png").stat().st_size > 0



def test_completion_and_odd_input_scripts_run_and_write_their_tables(tmp_path):
    """On random MNIST-format files (the scripts' numbers in benchmarks/results come from the real sets)."""
    for name in ("mnist", "fashion_mnist"):
        write_random_mnist(tmp_path / "data" / name, 0, 20, blobs=True)
    for script, extra, models in (("completion_speed.py", ["--repeats", "1"], ("mnist", "mnist-gated")),
                                  ("odd_inputs.py", ["--images", "10"], ("mnist", "fashion-mnist"))):
        out = tmp_path / script.removesuffix(".py")
        result = subprocess.run([sys.executable, f"benchmarks/{script}", "--data_dir", str(tmp_path / "data"),
                                 "--out", str(out), *extra], cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stdout + result.stderr
        table = Path(f"{out}.md").read_text()
        assert all(f"| `{model}` |" in table for model in models), table
        assert "vector extensions" in table, table
