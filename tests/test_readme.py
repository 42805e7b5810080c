"""The README's quick-start commands are the ones that work: CI runs the test command, and
this runs the main job's last step (the set-up before it is what CI does too)."""
import re
import shlex
import subprocess
import sys
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def quick_start_commands() -> list[str]:
    section = (ROOT / "README.md").read_text().split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.*?)\n```", section, re.S)


def test_quick_start_has_two_commands_and_ci_runs_the_test_one():
    main_job, tests = quick_start_commands()
    assert "pytest" in tests and tests in (ROOT / ".ci" / "run").read_text()
    assert "torch==2.13.0" in main_job and "torch==2.13.0" in tests


def test_main_job_draws_a_grid(tmp_path):
    main_job, _ = quick_start_commands()
    last = shlex.split(main_job.split("&&")[-1])
    assert last[:3] == ["python", "-m", "fastpixel.sample"]
    result = subprocess.run([sys.executable, *last[1:]], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "wrote samples.png: 16 images" in result.stdout
    assert Image.open(tmp_path / "samples.png").size == (4 * 30 + 2, 4 * 30 + 2)
