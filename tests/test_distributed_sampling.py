"""`torchrun -m fastpixel.sample`: two CPU processes (gloo) split the images and rank 0 writes them."""
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

import fastpixel


def torchrun_sample(*args, cwd):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    return subprocess.run([*launcher, "-m", "fastpixel.sample", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=120, env=dict(os.environ, OMP_NUM_THREADS="1"))


# 7 images: unequal shares, and rank 1's start (4) is not a multiple of the 3 classes, so labels
# that did not follow the global index would show; 1 image: rank 1 draws none.
@pytest.mark.parametrize("n", [7, 1])
def test_two_processes_write_the_images_one_process_draws(checkpoint, tmp_path, n):
    out = torchrun_sample("--fast", "--checkpoint", checkpoint, "-n", n, "--seed", 3, "--npy", "two.npy", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("wrote") == 1 and f"wrote samples.png: {n} images" in out.stdout
    assert "2 processes" in out.stdout
    expected = fastpixel.sample(fastpixel.load(checkpoint), n, fast=True, seed=3)
    assert np.array_equal(np.load(tmp_path / "two.npy"), expected.numpy())


def test_error_seen_by_rank_0_alone_stops_every_rank_with_exit_2(checkpoint, tmp_path):
    """Only rank 0 writes, so only it checks the output path; the other rank must not wait
    for it. The two ranks are started by hand, as torchrun would, but without its agent,
    which would kill the survivor and hide a hang."""
    port = free_port()
    ranks = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), OMP_NUM_THREADS="1")
        ranks.append(subprocess.Popen([sys.executable, "-m", "fastpixel.sample", "--fast", "--checkpoint", str(checkpoint),
                                       "-n", "2", "--out", "no/such/dir/x.png"], cwd=tmp_path, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = [process.communicate(timeout=120) for process in ranks]
    assert [process.returncode for process in ranks] == [2, 2]
    errors = "".join(stderr for _, stderr in results)
    assert errors.count("python -m fastpixel.sample: error: cannot write no/such/dir/x.png") == 1
    assert list(tmp_path.iterdir()) == []


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
