"""The benchmark suite and its report run end to end, in the suite's quick mode."""
import os
import subprocess
import sys
from pathlib import Path

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
    assert (tmp_path / "quick.png").stat().st_size > 0

