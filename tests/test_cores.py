"""The thread count a CPU draw takes from the cores other programs leave idle
(fastpixel/cores.py): read right, applied row by row, restored after, and never a change
to any image."""
import pytest
import torch

import fastpixel
from fastpixel import cores
from tests.conftest import tiny_model


def test_busy_elsewhere_counts_runnable_threads_less_this_processs_own(tmp_path):
    (tmp_path / "loadavg").write_text("0.50 0.40 0.30 5/312 4242\n")
    for tid, state in ((101, "R"), (102, "S"), (103, "R")):
        (tmp_path / "self" / "task" / str(tid)).mkdir(parents=True)
        name = "(python (a) R b)"  # a name may hold spaces, parentheses and state letters
        (tmp_path / "self" / "task" / str(tid) / "stat").write_text(f"{tid} {name} {state} 1 2 3\n")
    assert cores.busy_elsewhere(str(tmp_path)) == 3
    (tmp_path / "loadavg").write_text("garbled\n")
    assert cores.busy_elsewhere(str(tmp_path)) is None
    assert cores.busy_elsewhere(str(tmp_path / "missing")) is None


def _masked_model():
    torch.manual_seed(0)
    config = fastpixel.GatedConfig(image_size=(6, 7), channels=1, hidden_fmaps=64, hidden_layers=2)
    return fastpixel.GatedPixelCNN(config).eval()


@pytest.fixture
def chosen(monkeypatch):
    """The thread counts fastpixel.cores sets, in order, from torch at 2 threads (restored after)."""
    threads_before, real_set, counts = torch.get_num_threads(), torch.set_num_threads, []
    real_set(2)
    monkeypatch.setattr(cores.torch, "set_num_threads", lambda n: (counts.append(n), real_set(n)))
    yield counts
    real_set(threads_before)


@pytest.mark.parametrize("family, backend, batch", [("pixelcnnpp", "cext", 3), ("pixelcnnpp", "cext", 8),
                                                   ("gated", "cext", 3), ("gated", "cext", 8)])
def test_busy_cores_take_fewer_threads_and_change_no_image(monkeypatch, chosen, family, backend, batch):
    """Wide enough layers that the products run in parallel (3 images: the C++ engine shares
    each product among two threads; 8, PixelCNN++: each thread takes 4 images through every
    op): the same images with one thread (every core looks busy) as with two (all idle), and
    torch's count restored."""
    model = tiny_model(dtype=torch.float32, nr_filters=64) if family == "pixelcnnpp" else _masked_model()
    images = {}
    for idle in (0, 2):
        monkeypatch.setattr(cores, "idle_cores", lambda idle=idle: idle)
        chosen.clear()
        images[idle] = fastpixel.sample(model, batch, seed=3, backend=backend)
        assert set(chosen[:-1]) == {max(1, idle)} and chosen[-1] == 2  # every row, then restored
        assert torch.get_num_threads() == 2
    assert torch.equal(images[0], images[2])


@pytest.mark.parametrize("engine", ["torch", "cext"])
def test_a_codec_stream_decodes_whatever_the_cores_are_doing(monkeypatch, chosen, engine):
    """Encoded on idle cores, decoded with every core busy: the same images. The C++ engine
    takes one thread then, and sums alike; PyTorch's engine keeps torch's count (its
    libraries' sums may follow the thread count: on the project's AMD EPYC VM this failed
    when it took one thread)."""
    from tests.test_codec import images_of
    model = tiny_model(dtype=torch.float32, nr_filters=64)
    images = images_of(model, 3)
    monkeypatch.setattr(cores, "idle_cores", lambda: 2)
    data = fastpixel.encode(model, images, backend=engine)
    monkeypatch.setattr(cores, "idle_cores", lambda: 0)
    chosen.clear()
    assert torch.equal(fastpixel.decode(model, data), images)
    assert set(chosen[:-1]) == ({1} if engine == "cext" else set())
