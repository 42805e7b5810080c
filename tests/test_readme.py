"""The README's quick-start commands are the ones that work: CI runs the test command, and
this runs the main job's Python part."""
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def quick_start_commands() -> list[str]:
    section = (ROOT / "README.md").read_text().split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.*?)\n```", section, re.S)


def test_quick_start_has_two_commands_and_ci_runs_the_test_one():
    main_job, tests = quick_start_commands()
    assert "pytest" in tests and tests in (ROOT / ".ci" / "run").read_text()
    assert "torch==2.13.0" in main_job and "torch==2.13.0" in tests


def test_main_job_runs():
    main_job, _ = quick_start_commands()
    python = re.search(r'python -c "(.*)"$', main_job).group(1)
    result = subprocess.run([sys.executable, "-c", python], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert "torch.Size([4, 1, 8, 8])" in result.stdout
