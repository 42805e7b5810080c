"""The package's layering holds (`.importlinter`): command lines above sampling, above
files, above models, above the dispatch, above the Triton kernels; no cache imports an engine; the
families are independent; no import cycle at any depth, imports inside functions included.

import-linter reads a package from one folder, and the kernels live in `kernels/` at the
top of the repository, so the check runs on a copy laid out as setup.py installs it
(`kernels/` as `fastpixel/kernels/`)."""
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONTRACTS = ROOT / ".importlinter"


def installed_layout(folder: Path) -> Path:
    ignore = shutil.ignore_patterns("__pycache__", "weights")
    shutil.copytree(ROOT / "fastpixel", folder / "fastpixel", ignore=ignore)
    shutil.copytree(ROOT / "kernels", folder / "fastpixel" / "kernels", ignore=ignore)
    return folder / "fastpixel"


def lint_imports(folder: Path) -> subprocess.CompletedProcess:
    """import-linter on the package copy in `folder`, in a fresh process (whose fastpixel is the copy)."""
    code = ("import sys; from importlinter.cli import lint_imports; "
            f"sys.exit(lint_imports(config_filename={str(CONTRACTS)!r}, no_cache=True, no_logo=True))")
    return subprocess.run([sys.executable, "-c", code], cwd=folder, env={"PYTHONPATH": str(folder)},
                          capture_output=True, text=True, timeout=300)


def test_every_import_contract_is_kept(tmp_path):
    installed_layout(tmp_path)
    result = lint_imports(tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Contracts: 4 kept, 0 broken." in result.stdout


@pytest.mark.parametrize("module, line, broken", [
    # a model reaching up into sampling: an upward arrow, and a cycle (sampling imports models)
    ("models/config.py", "from ..sampling import noise", ["Command lines above sampling", "No import cycles"]),
    # a kernel using the library above it, inside a function as kernels/shifted_conv.py once did
    ("kernels/ops.py", "def _model():\n    from ..models.pixelcnnpp import model", ["Command lines above sampling",
                                                                            "No import cycles"]),
    # a cache picking its own engine, as cache.py once did
    ("sampling/caches/pixelcnnpp.py", "from ..engines import fused", ["Inside sampling", "No import cycles"]),
    # one family borrowing from the other
    ("models/masked/family.py", "from ..pixelcnnpp.layers import Nin", ["families are independent"]),
])
def test_a_forbidden_import_breaks_its_contracts(tmp_path, module, line, broken):
    package = installed_layout(tmp_path)
    with open(package / module, "a") as f:
        f.write(f"\n\n{line}  # deliberately against the layering\n")
    result = lint_imports(tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    for name in broken:
        assert status(result.stdout, name) == "BROKEN", result.stdout


def status(report: str, contract: str) -> str:
    """KEPT or BROKEN: what import-linter's report says of the contract whose name starts so."""
    flat = " ".join(report.split())  # it wraps long contract names
    return re.search(re.escape(contract) + r".*? (KEPT|BROKEN)\b", flat).group(1)
