"""``to_device``: the values, dtype and device a plain copy gives; on a GPU, without a host sync.
``to_device_views``: each part's values, each view 16-byte aligned whatever the parts' lengths."""
from __future__ import annotations

import pytest
import torch

from hypothesis import given, strategies as st

from kvscope.device_copy import to_device, to_device_views


def test_lists_and_tensors_on_the_cpu():
    t = to_device([3, 1, 2], torch.device("cpu"), torch.int32)
    assert t.dtype == torch.int32 and t.tolist() == [3, 1, 2]
    assert to_device([1.5, 2.0], torch.device("cpu")).dtype == torch.float32  # torch.tensor's inference
    src = torch.arange(4)
    assert torch.equal(to_device(src, torch.device("cpu"), torch.int16), src.to(torch.int16))
    assert to_device([[1, 2], [3, 4]], torch.device("cpu"), torch.long).shape == (2, 2)


@given(st.lists(st.lists(st.integers(-2**31, 2**31 - 1), max_size=40), min_size=1, max_size=6),
       st.sampled_from([torch.int32, torch.int64]))
def test_views_hold_each_part_and_start_16_byte_aligned(parts, dtype):
    views = to_device_views(parts, torch.device("cpu"), dtype)
    assert [v.tolist() for v in views] == parts and all(v.dtype == dtype for v in views)
    assert all(v.data_ptr() % 16 == 0 for v in views)
    assert len({v.untyped_storage().data_ptr() for v in views}) == 1  # one copy


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_copy_equals_a_plain_copy_and_never_syncs():
    dev = torch.device("cuda")
    big = torch.randn(4096, 4096, device=dev)
    for _ in range(8):  # queue work, so a synchronizing copy would have something to wait for
        big = big @ big / 64
    data = list(range(1000))
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = to_device(data, dev, torch.long)
        from_tensor = to_device(torch.arange(10, dtype=torch.int32), dev)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert got.tolist() == data and from_tensor.tolist() == list(range(10)) and from_tensor.dtype == torch.int32
