"""The README runs as written. The quick start's two commands are the ones that work (CI runs
the test command; the main job's last step runs here); every other command block runs in one
scratch folder, in the README's order, with short settings (fewer images, two training
steps of a smaller model, the tests' small MNIST files for DATA); every Python block runs with small tensors for
the names it leaves to the reader; every `python -m fastpixel...` in the text parses, and every
`fastpixel.name...` it mentions exists after `import fastpixel`. A block this test does not know
fails it, so the README cannot drift from the code again."""
import importlib
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import fastpixel
from tests.test_convert import openai_variables, pclucas14_state_dict, write_bundle

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()

# Short settings: (pattern, replacement) for every command.
SHORTER = [(r"--data_dir (DATA|data)\b", "--data_dir {data}"), (r" -n (64|1024)\b", " -n 4"),
           (r"mnist:test:0-9999", "mnist:test:0-7"),
           (r"--nproc_per_node \d+", "--nproc_per_node 1")]  # one process: the multi-process runs have their own tests
TRAINING = ["--max_steps", "2", "--max_test_images", "20", "--num_samples", "4", "--no_download"]
SMALL = {"gated": ["--hidden-fmaps", "12", "--hidden-layers", "2"],  # the architecture, smaller
         "pixelcnnpp": ["--nr_resnet", "1", "--nr_filters", "16", "--nr_logistic_mix", "2"]}
# Commands that cannot run here, and why; their options are still parsed.
NOT_RUN = {"--rdzv_endpoint HOST": "needs two machines", "--data_set cifar10": "CIFAR-10 is not in the test data",
           "python -m pytest": "is this suite: CI runs it"}


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)\n```", README, re.S)


def commands(block: str) -> list[str]:
    """A block's commands: continuation lines joined, comments dropped, set-up steps (`&&`) kept apart."""
    lines = [re.sub(r"\s+#.*$", "", line) for line in block.replace("\\\n", " ").splitlines()]
    return [part.strip() for line in lines if line.strip() and not line.startswith("#") for part in line.split("&&")]


def argv(command: str, data: Path) -> list[str] | None:
    """How the test runs a README command (None: a set-up step, run by CI)."""
    words = shlex.split(command)
    if words[0] in ("python3", "pip", ".") or words[:2] == ["python3", "-m"]:
        return None
    for pattern, replacement in SHORTER:
        command = re.sub(pattern, replacement.format(data=data), command)
    words = shlex.split(command)
    if words[0] == "torchrun":
        words = ["python", "-m", "torch.distributed.run", *words[1:]]
    assert words[:2] == ["python", "-m"], f"the README runs something unknown: {command}"
    if "fastpixel.train" in words:
        words += TRAINING + SMALL["gated" if "gated" in words else "pixelcnnpp"]
    return [sys.executable, *words[1:]]


def tool_parse(words: list[str]) -> None:
    """Parse a fastpixel command line's options as its tool would (a drifted flag fails here)."""
    tool = next(w for w in words if w.startswith("fastpixel."))
    rest = words[words.index(tool) + 1:]
    importlib.import_module(tool).parse_args(rest)


def test_quick_start_has_two_commands_and_ci_runs_the_test_one():
    section = README.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    main_job, tests = re.findall(r"```bash\n(.*?)\n```", section, re.S)
    assert "pytest" in tests and tests in (ROOT / ".ci" / "run").read_text()
    assert "torch==2.13.0" in main_job and "torch==2.13.0" in tests


def test_main_job_draws_a_grid(tmp_path):
    main_job = blocks("bash")[0]
    last = shlex.split(main_job.split("&&")[-1])
    assert last[:3] == ["python", "-m", "fastpixel.sample"]
    result = subprocess.run([sys.executable, *last[1:]], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "wrote samples.png: 16 images" in result.stdout and "cached sampling, cext backend" in result.stdout
    assert Image.open(tmp_path / "samples.png").size == (4 * 30 + 2, 4 * 30 + 2)


def write_source_checkpoints(folder: Path) -> None:
    """The original code's files the conversion block names, small (1/8/2 instead of 5/160/10)."""
    (folder / "save").mkdir()
    write_bundle(folder / "save" / "params_cifar.ckpt", openai_variables(3, 1, 8, 2))
    (folder / "models").mkdir()
    state = {k: torch.as_tensor(v) for k, v in pclucas14_state_dict(3, 1, 8, 2).items()}
    torch.save(state, folder / "models" / "pcnn_lr.0.00040_nr-resnet5_nr-filters160_889.pth")


def test_every_command_block_runs(mnist_dir, tmp_path):
    write_source_checkpoints(tmp_path)
    fastpixel.save(fastpixel.load("mnist"), tmp_path / "runs" / "mnist" / "model.safetensors")  # `--checkpoint runs/mnist` before training
    ran = 0
    for block in blocks("bash")[2:]:  # after the quick start's two
        for command in commands(block):
            words = argv(command, mnist_dir)
            if words is None:
                continue
            skipped = [why for marker, why in NOT_RUN.items() if marker in command]
            if skipped:
                tool_parse(words)
                continue
            started = time.perf_counter()
            out = subprocess.run(words, capture_output=True, text=True, timeout=600, cwd=tmp_path)
            assert out.returncode == 0, f"{command}\n{out.stderr[-2000:]}"
            print(f"{time.perf_counter() - started:6.1f} s  {command}")
            ran += 1
    assert ran >= 15
    assert np.load(tmp_path / "mnist_test.npy").shape == (8, 1, 28, 28)  # the codec's round trip ran
    assert (tmp_path / "runs" / "mnist" / "test.json").is_file() and (tmp_path / "cifar.safetensors").is_file()


def test_every_python_block_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (16, 1, 28, 28), generator=generator, dtype=torch.uint8)
    given = {"x": images[:4].float() / 127.5 - 1, "first_batch": images[:4].float() / 127.5 - 1,
             "test_images_uint8": images[:4], "images_uint8": images}  # what the README leaves to the reader
    python = blocks("python")
    assert len(python) >= 2
    for block in python:
        exec(compile(block, "README.md", "exec"), dict(given))  # noqa: S102


def inline_spans() -> list[str]:
    return re.findall(r"`([^`\n]+)`", re.sub(r"```.*?```", "", README, flags=re.S))


def test_every_inline_import_name_and_command_works():
    checked = 0
    for span in inline_spans():
        if span.startswith(("from fastpixel", "import fastpixel")):
            exec(span, {})  # noqa: S102
        elif re.match(r"fastpixel\.[a-z_]", span):
            target = fastpixel
            for name in re.match(r"fastpixel((\.\w+)+)", span).group(1).strip(".").split("."):
                assert hasattr(target, name), f"`{span}`: fastpixel has no {name} there after `import fastpixel`"
                target = getattr(target, name)
        elif span.startswith("python -m fastpixel.") and "<" not in span:
            tool_parse(shlex.split(span))
        else:
            continue
        checked += 1
    assert checked >= 20


@pytest.mark.parametrize("marker", NOT_RUN)
def test_commands_not_run_are_still_in_the_readme(marker):
    assert any(marker in command for block in blocks("bash") for command in commands(block))
