"""Data loading: every format read back exactly from small files written here, broken files refused
with their name, downloads checked and never left half-done, and the real MNIST files when present.
No test touches the network: _fetch is replaced in every test."""
import gzip
import hashlib
import io
import os
import pickle
import re
import tarfile
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch

from fastpixel.io import data
from fastpixel.io.data import DATASETS, DataError, load_dataset
from tests.conftest import idx_bytes, write_idx

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
REAL_FETCH = data._fetch  # kept before the autouse fixture replaces it


@pytest.fixture(autouse=True)
def _no_network(monkeypatch):
    """Any download fails the test, unless the test installs its own fake _fetch."""
    def refuse(url, dest):
        pytest.fail(f"tried to download {url}")
    monkeypatch.setattr(data, "_fetch", refuse)


def random_uint8(*shape) -> np.ndarray:
    return torch.randint(0, 256, shape, dtype=torch.uint8).numpy()


def random_labels(n: int, low: int, high: int) -> np.ndarray:
    return torch.randint(low, high, (n,)).numpy()


def files_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


# MNIST and Fashion-MNIST

@pytest.mark.parametrize("n", [3, 7])
@pytest.mark.parametrize("gz", [True, False])
@pytest.mark.parametrize("split", ["train", "test"])
def test_idx_files_round_trip_exactly_for_any_count_gzipped_or_not(tmp_path, n, gz, split):
    images, labels = random_uint8(n, 28, 28), random_labels(n, 0, 10)
    write_idx(tmp_path, split, images, labels, gz)
    got = load_dataset("mnist", tmp_path, split, download=False)
    assert got.images.dtype == torch.uint8 and got.images.shape == (n, 1, 28, 28)
    assert got.labels.dtype == torch.int64 and got.num_classes == 10
    assert np.array_equal(got.images[:, 0].numpy(), images) and np.array_equal(got.labels.numpy(), labels)


@pytest.mark.parametrize("name, folder", [("mnist", "mnist"), ("fashion_mnist", "fashion-mnist"),
                                          ("fashion_mnist", "fashion_mnist")])
def test_idx_files_are_found_in_the_data_sets_own_folder(tmp_path, name, folder):
    images, labels = random_uint8(4, 28, 28), random_labels(4, 0, 10)
    write_idx(tmp_path / folder, "test", images, labels)
    assert np.array_equal(load_dataset(name, tmp_path, "test", download=False).images[:, 0].numpy(), images)


def test_mnist_and_fashion_mnist_side_by_side_each_load_their_own_files(tmp_path):
    digits, clothes = random_uint8(2, 28, 28), random_uint8(5, 28, 28)
    write_idx(tmp_path / "mnist", "train", digits, random_labels(2, 0, 10))
    write_idx(tmp_path / "fashion-mnist", "train", clothes, random_labels(5, 0, 10))
    assert np.array_equal(load_dataset("mnist", tmp_path, download=False).images[:, 0].numpy(), digits)
    assert np.array_equal(load_dataset("fashion_mnist", tmp_path, download=False).images[:, 0].numpy(), clothes)


def _cut_bytes(images_path, labels_path):
    raw = gzip.decompress(images_path.read_bytes())
    images_path.write_bytes(gzip.compress(raw[:-100]))
    return images_path


def _wrong_magic(images_path, labels_path):
    images_path.write_bytes(gzip.compress(b"\x12\x34\x56\x78" + gzip.decompress(images_path.read_bytes())[4:]))
    return images_path


def _labels_for_images(images_path, labels_path):
    images_path.write_bytes(labels_path.read_bytes())
    return images_path


def _bad_gzip(images_path, labels_path):
    images_path.write_bytes(b"this is not gzip data at all")
    return images_path


def _cut_gzip(images_path, labels_path):
    images_path.write_bytes(images_path.read_bytes()[:-20])
    return images_path


def _one_label_short(images_path, labels_path):
    labels_path.write_bytes(gzip.compress(idx_bytes(random_labels(5, 0, 10))))
    return labels_path


def _label_out_of_range(images_path, labels_path):
    labels_path.write_bytes(gzip.compress(idx_bytes(np.array([0, 1, 2, 3, 4, 10]))))
    return labels_path


def _wrong_image_size(images_path, labels_path):
    images_path.write_bytes(gzip.compress(idx_bytes(random_uint8(6, 32, 32))))
    return images_path


@pytest.mark.parametrize("corrupt", [_cut_bytes, _wrong_magic, _labels_for_images, _bad_gzip, _cut_gzip,
                                     _one_label_short, _label_out_of_range, _wrong_image_size])
def test_broken_idx_files_are_refused_naming_the_file(tmp_path, corrupt):
    paths = write_idx(tmp_path, "train", random_uint8(6, 28, 28), random_labels(6, 0, 10))
    broken = corrupt(*paths)
    with pytest.raises(DataError, match=re.escape(str(broken))):
        load_dataset("mnist", tmp_path, download=False)


# CIFAR-10

def cifar_batch_bytes(images: np.ndarray, labels: np.ndarray, module: str = "numpy.core.multiarray") -> bytes:
    """A python batch as distributed: a pickled dict, pixels one row per image (R, G, B planes),
    its arrays rebuilt by `module`._reconstruct (the real batches name numpy 1's numpy.core)."""
    batch = {b"batch_label": b"a test batch", b"labels": [int(label) for label in labels],
             b"data": images.reshape(len(images), 3072), b"filenames": [b"x.png"] * len(images)}
    # Protocol 3 names globals as plain text and stores bytes natively, as Python 2's pickles do.
    content = pickle.dumps(batch, protocol=3)
    return content.replace(b"numpy._core.multiarray\n", module.encode() + b"\n")


def cifar_batches(sizes=(2, 3, 1, 2, 4, 3)) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Random images (n, 3, 32, 32) and labels for data_batch_1..5 and test_batch."""
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    return {name: (random_uint8(n, 3, 32, 32), random_labels(n, 0, 10)) for name, n in zip(names, sizes)}


def cifar_tarball(batches) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, (images, labels) in batches.items():
            content = cifar_batch_bytes(images, labels)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
    return buffer.getvalue()


def assert_cifar_split(got, batches, split):
    names = [name for name in batches if (name == "test_batch") == (split == "test")]
    images = np.concatenate([batches[name][0] for name in names])
    assert got.images.shape == (len(images), 3, 32, 32) and got.num_classes == 10
    assert np.array_equal(got.images.numpy(), images)
    assert np.array_equal(got.labels.numpy(), np.concatenate([batches[name][1] for name in names]))


@pytest.mark.parametrize("folder", ["cifar-10-batches-py", ""])
@pytest.mark.parametrize("module", ["numpy.core.multiarray", "numpy._core.multiarray"])
def test_cifar_batches_put_pixel_of_channel_c_row_y_col_x_at_that_index(tmp_path, folder, module):
    batches = {name: (np.zeros((n, 3, 32, 32), np.uint8), random_labels(n, 0, 10))
               for name, n in zip([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"], (2, 1, 1, 1, 1, 3))}
    rows = np.zeros((3, 3072), np.uint8)
    rows[2, 1 * 1024 + 5 * 32 + 7] = 200  # green, row 5, column 7 of the third test image
    (tmp_path / folder).mkdir(exist_ok=True)
    for name, (images, labels) in batches.items():
        content = cifar_batch_bytes(rows.reshape(3, 3, 32, 32) if name == "test_batch" else images, labels, module)
        (tmp_path / folder / name).write_bytes(content)
    got = load_dataset("cifar10", tmp_path, "test", download=False)
    assert got.images.shape == (3, 3, 32, 32) and got.images[2, 1, 5, 7] == 200 and got.images.sum() == 200
    assert np.array_equal(got.labels.numpy(), batches["test_batch"][1])
    assert load_dataset("cifar10", tmp_path, "train", download=False).images.shape == (6, 3, 32, 32)


def test_cifar_tarball_is_extracted_and_read(tmp_path):
    batches = cifar_batches()
    (tmp_path / "cifar-10-python.tar.gz").write_bytes(cifar_tarball(batches))
    for split in ("train", "test"):
        assert_cifar_split(load_dataset("cifar10", tmp_path, split, download=False), batches, split)
    assert (tmp_path / "cifar-10-batches-py" / "data_batch_5").is_file()


def test_cifar_download_is_checked_then_extracted(tmp_path, monkeypatch):
    batches = cifar_batches()
    tarball = cifar_tarball(batches)
    monkeypatch.setitem(data._SPECS["cifar10"].md5, "cifar-10-python.tar.gz", hashlib.md5(tarball).hexdigest())
    urls = []

    def fetch(url, dest):
        urls.append(url)
        dest.write_bytes(tarball)
    monkeypatch.setattr(data, "_fetch", fetch)
    assert_cifar_split(load_dataset("cifar10", tmp_path, "train"), batches, "train")
    assert urls == ["https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"]


class _RunsShell:
    def __reduce__(self):
        return os.system, ("touch pwned",)


def test_cifar_pickle_that_names_os_system_is_refused_unrun(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "test_batch").write_bytes(pickle.dumps({b"data": _RunsShell(), b"labels": [0]}))
    with pytest.raises(DataError, match="test_batch.*system.*refusing"):
        load_dataset("cifar10", tmp_path, "test", download=False)
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("content", [b"garbage", pickle.dumps([1, 2, 3]),
                                     cifar_batch_bytes(np.zeros((2, 3, 32, 32), np.uint8), np.array([0, 10])),
                                     cifar_batch_bytes(np.zeros((2, 3, 32, 32), np.uint8), np.array([0]))])
def test_broken_cifar_batch_is_refused_naming_the_file(tmp_path, content):
    (tmp_path / "test_batch").write_bytes(content)
    with pytest.raises(DataError, match=re.escape(str(tmp_path / "test_batch"))):
        load_dataset("cifar10", tmp_path, "test", download=False)


def test_corrupt_cifar_tarball_is_refused_naming_it(tmp_path):
    (tmp_path / "cifar-10-python.tar.gz").write_bytes(cifar_tarball(cifar_batches())[:-300])
    with pytest.raises(DataError, match="cifar-10-python.tar.gz"):
        load_dataset("cifar10", tmp_path, "test", download=False)


# Downsampled ImageNet

def write_imagenet_npz(path: Path, images: np.ndarray, labels_1based: np.ndarray) -> None:
    """A batch in the official layout: rows of all red, then all green, then all blue pixels."""
    path.parent.mkdir(parents=True, exist_ok=True)
    n, size = len(images), images.shape[-1]
    np.savez(path, data=images.reshape(n, 3 * size * size), labels=labels_1based.tolist())


@pytest.mark.parametrize("size", [32, 64])
def test_imagenet_npz_is_channel_major_with_labels_made_zero_based(tmp_path, size):
    # The official zips unpack to folders of their own; ImageNet64's train set comes in two parts.
    def part(i):
        return "Imagenet32_train_npz" if size == 32 else f"Imagenet64_train_part{1 + (i > 5)}_npz"
    train = []
    for i in range(1, 11):
        images, labels = random_uint8(2, 3, size, size), random_labels(2, 1, 1001)
        write_imagenet_npz(tmp_path / part(i) / f"train_data_batch_{i}.npz", images, labels)
        train.append((images, labels))
    got = load_dataset(f"imagenet{size}", tmp_path, "train", download=False)
    assert got.images.shape == (20, 3, size, size) and got.num_classes == 1000
    assert np.array_equal(got.images.numpy(), np.concatenate([images for images, _ in train]))
    assert np.array_equal(got.labels.numpy(), np.concatenate([labels for _, labels in train]) - 1)

    rows = np.zeros((2, 3 * size * size), np.uint8)
    rows[1, 2 * size * size + 3 * size + 4] = 77  # blue, row 3, column 4 of the second image
    val_path = tmp_path / f"imagenet{size}" / "val_data.npz"
    write_imagenet_npz(val_path, rows.reshape(2, 3, size, size), np.array([1, 1000]))
    val = load_dataset(f"imagenet{size}", tmp_path, "test", download=False)
    assert val.images[1, 2, 3, 4] == 77 and val.images.sum() == 77
    assert val.labels.tolist() == [0, 999]


@pytest.mark.parametrize("labels, images", [([0, 5], random_uint8(2, 3072)),  # 0 is out of 1 .. 1000
                                            ([1, 1001], random_uint8(2, 3072)),
                                            ([1, 2, 3], random_uint8(2, 3072)),
                                            ([1, 2], random_uint8(2, 12288))])  # 64x64 rows in a 32x32 set
def test_broken_imagenet_npz_is_refused_naming_the_file(tmp_path, labels, images):
    np.savez(tmp_path / "val_data.npz", data=images, labels=labels)
    with pytest.raises(DataError, match="val_data.npz"):
        load_dataset("imagenet32", tmp_path, "test", download=False)


def test_imagenet_is_never_downloaded_and_the_error_says_what_to_put_where(tmp_path):
    write_imagenet_npz(tmp_path / "imagenet32" / "train_data_batch_3.npz", random_uint8(1, 3, 32, 32),
                       np.array([1]))
    with pytest.raises(DataError, match="login") as err:
        load_dataset("imagenet32", tmp_path, "train", download=True)
    message = str(err.value)
    assert str(tmp_path / "imagenet32") in message and "train_data_batch_10.npz" in message
    assert "train_data_batch_3.npz" not in message  # only the missing files are listed


# Downloads (all faked)

def test_offline_error_names_missing_files_and_folder_and_leaves_nothing(tmp_path, monkeypatch):
    def offline(url, dest):
        dest.write_bytes(b"half a file")
        raise urllib.error.URLError("Temporary failure in name resolution")
    monkeypatch.setattr(data, "_fetch", offline)
    with pytest.raises(DataError, match="offline") as err:
        load_dataset("fashion_mnist", tmp_path, "test")
    message = str(err.value)
    for expected in (str(tmp_path / "fashion_mnist"), "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz",
                     "fashion-mnist.s3-website"):
        assert expected in message
    assert files_under(tmp_path) == []


def test_cifar_offline_error_names_the_tarball_and_folder(tmp_path, monkeypatch):
    def offline(url, dest):
        raise TimeoutError("timed out")
    monkeypatch.setattr(data, "_fetch", offline)
    with pytest.raises(DataError, match=f"(?s)offline.*Put these files in {re.escape(str(tmp_path))}:\n  "
                                        "cifar-10-python.tar.gz"):
        load_dataset("cifar10", tmp_path, "train")


@pytest.mark.parametrize("name", [name for name in DATASETS if name != "codes"])
def test_download_false_never_fetches_and_says_what_is_missing(tmp_path, name):
    with pytest.raises(DataError, match=f"Put these files in {re.escape(str(tmp_path))}"):
        load_dataset(name, tmp_path, "test", download=False)  # the autouse fixture fails any fetch


def test_codes_are_read_from_npz_and_checked(tmp_path):
    with pytest.raises(DataError, match="train.npz and .*test.npz"):
        load_dataset("codes", tmp_path, "train")
    np.savez(tmp_path / "train.npz", codes=np.array([[[0, 3], [2, 1]]] * 2), labels=np.array([0, 2]), num_classes=4)
    codes = load_dataset("codes", tmp_path, "train")
    assert codes.images.shape == (2, 1, 2, 2) and codes.images.dtype == torch.int64 and codes.num_classes == 4
    np.savez(tmp_path / "test.npz", codes=np.zeros((2, 2, 2)))
    with pytest.raises(DataError, match="non-negative integers"):
        load_dataset("codes", tmp_path, "test")
    np.savez(tmp_path / "test.npz", codes=np.zeros((2, 2, 2), dtype=int), labels=np.array([0, 5]), num_classes=3)
    with pytest.raises(DataError, match="labels from 0 to 5"):
        load_dataset("codes", tmp_path, "test")


def test_download_with_wrong_checksum_is_refused_and_not_kept(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "_fetch", lambda url, dest: dest.write_bytes(b"<html>moved</html>"))
    with pytest.raises(DataError, match="md5"):
        load_dataset("mnist", tmp_path, "test")
    assert files_under(tmp_path) == []


def test_verified_download_is_kept_and_loaded(tmp_path, monkeypatch):
    images, labels = random_uint8(5, 28, 28), random_labels(5, 0, 10)
    served = {"t10k-images-idx3-ubyte.gz": gzip.compress(idx_bytes(images)),
              "t10k-labels-idx1-ubyte.gz": gzip.compress(idx_bytes(labels))}
    for file, content in served.items():
        monkeypatch.setitem(data._SPECS["mnist"].md5, file, hashlib.md5(content).hexdigest())
    monkeypatch.setattr(data, "_fetch", lambda url, dest: dest.write_bytes(served[url.rsplit("/", 1)[1]]))
    got = load_dataset("mnist", tmp_path, "test")
    assert np.array_equal(got.images[:, 0].numpy(), images) and np.array_equal(got.labels.numpy(), labels)
    assert files_under(tmp_path) == sorted(tmp_path / "mnist" / file for file in served)


def test_fetch_copies_what_the_url_serves(tmp_path):
    source = tmp_path / "served.bin"
    source.write_bytes(os.urandom(3 << 20))  # several read chunks
    REAL_FETCH(source.as_uri(), tmp_path / "copy.bin")  # a file:// URL: urllib, but no network
    assert (tmp_path / "copy.bin").read_bytes() == source.read_bytes()


@pytest.mark.parametrize("name, split", [("mnist2", "train"), ("mnist", "valid")])
def test_unknown_name_or_split_lists_the_allowed_values(tmp_path, name, split):
    with pytest.raises(ValueError, match="fashion_mnist" if name == "mnist2" else "train, test"):
        load_dataset(name, tmp_path, split)


# The real files, when this machine has them

@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"no shared data folder at {SHARED_DATA}")
@pytest.mark.parametrize("name", ["mnist", "fashion_mnist"])
def test_real_mnist_files_load_with_the_published_shapes_and_label_counts(name):
    train = load_dataset(name, SHARED_DATA, "train", download=False)
    test = load_dataset(name, SHARED_DATA, "test", download=False)
    assert train.images.shape == (60000, 1, 28, 28) and test.images.shape == (10000, 1, 28, 28)
    if name == "mnist":
        assert torch.bincount(train.labels).tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
        assert torch.bincount(test.labels).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    else:  # Fashion-MNIST is balanced
        assert torch.bincount(train.labels).tolist() == [6000] * 10
        assert torch.bincount(test.labels).tolist() == [1000] * 10
