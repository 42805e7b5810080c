"""kernels/column_copy.py against its reference: the columns it reads and writes follow the
pixel position held on the device, and nothing else in the destination changes."""
import pytest
import torch

from tests.conftest import DEVICE

column_copy = pytest.importorskip("fastpixel.kernels.column_copy")
Column = column_copy.Column


@pytest.mark.parametrize("position", [0, 13, 47])
@pytest.mark.parametrize("src_at, dst_at, count", [
    (Column(), Column(scale=1, offset=1), 5),                                   # a pixel into a padded cache row
    (Column(level=1, scale=1, row_mask=1, row_columns=6), Column(), 7),         # (row parity, column) of a coarser level
    (Column(), Column(level=1, scale=2, offset=12), 10),                        # half a 2x2 block, across two columns
    (Column(scale=1, row_mask=-1, row_columns=12), Column(), 3),                # the flat pixel index
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_copy_matches_reference(position, src_at, dst_at, count, dtype):
    width, batch = 12, 3
    src = torch.randn(batch, 64, 7, dtype=dtype, device=DEVICE)
    dst = torch.randn(batch, 30, 5, dtype=dtype, device=DEVICE)
    expected = dst.clone()
    column_copy.reference(src, expected, position, count, width=width, src_at=src_at, dst_at=dst_at)
    pos = torch.tensor([position], dtype=torch.int32, device=DEVICE)
    column_copy.ColumnCopy(pos, src, dst, count, width=width, src_at=src_at, dst_at=dst_at)()
    assert torch.equal(dst, expected)


def test_a_source_without_batch_is_broadcast():
    constants = torch.randn(1, 20, 3, device=DEVICE)
    dst = torch.zeros(4, 1, 3, device=DEVICE)
    pos = torch.tensor([9], dtype=torch.int64, device=DEVICE)
    column_copy.ColumnCopy(pos, constants, dst, 3, width=5, src_at=Column(scale=1, row_mask=-1, row_columns=5))()
    assert torch.equal(dst, constants[:, 9:10].expand(4, 1, 3))


def test_bad_buffers_are_refused_with_a_reason():
    pos = torch.zeros(1, dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="share a dtype"):
        column_copy.ColumnCopy(pos, torch.zeros(2, 3, 4, device=DEVICE), torch.zeros(2, 3, 4, dtype=torch.float64, device=DEVICE), 4, width=3)
    with pytest.raises(ValueError, match="batch 2 or 1"):
        column_copy.ColumnCopy(pos, torch.zeros(3, 3, 4, device=DEVICE), torch.zeros(2, 3, 4, device=DEVICE), 4, width=3)
