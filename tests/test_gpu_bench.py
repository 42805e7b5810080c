"""benchmarks/gpu_bench.py runs end to end in its quick mode (on the CPU: the Triton backend
in the interpreter) and writes its table and JSON."""
import json
import subprocess
import sys
from pathlib import Path

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
