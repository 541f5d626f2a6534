"""weight_formats.wgsl's <format>_load4 (through dequant_rows) against numpy and gguf-py, for every format.

Bit for bit: the GPU widens the f16 scales exactly and combines them in the numpy (and gguf-py) order. On
lavapipe every case below is bit-equal, including q4_1's d·q + m and the k-quants' ds·q − dm, which a driver
could fuse into one fma (one rounding instead of two). Should a driver do that, the difference is one f32
rounding of the result; this test would show it, and the tolerance to state would be 1 ulp of |ds·q| + |dm|.
"""
import numpy as np
import pytest

from engine.backends.wgpu.kernels.dequant import dequantize_on_gpu, upload_weight
from engine.model.weight_formats import FORMATS, WeightFormat, dequantize
from tests.weight_format_cases import gguf_bytes, gguf_dequantize, random_blocks, sample_weight

pytestmark = pytest.mark.gpu


def bits(a):
    return np.ascontiguousarray(a, np.float32).view(np.uint32)


def shapes(fmt):
    """Odd row counts, several blocks a row; plain formats also get a width that is not a multiple of 4."""
    info = FORMATS[fmt]
    if not info.is_block:
        return [(5, 37), (3, 64)]
    return [(5, 3 * info.block_size), (7, 2 * info.block_size), (1, info.block_size)]


@pytest.mark.parametrize("fmt", list(WeightFormat), ids=lambda f: f.name)
def test_wgsl_dequant_equals_numpy_and_gguf(gpu_device, fmt):
    for i, (rows, cols) in enumerate(shapes(fmt)):
        cases = {"quantized": gguf_bytes(sample_weight(rows, cols, seed=i), fmt),
                 "random blocks": random_blocks(rows, cols, fmt, seed=100 + i)}
        for what, raw in cases.items():
            buf, info = upload_weight(gpu_device, raw, fmt, (rows, cols), f"w.{fmt.name}")
            assert info.format is fmt and buf.size >= info.gpu_nbytes((rows, cols))
            got = dequantize_on_gpu(gpu_device, buf, fmt, (rows, cols))
            want = dequantize(raw, fmt, (rows, cols))
            np.testing.assert_array_equal(bits(want), bits(gguf_dequantize(raw, fmt, (rows, cols))))
            np.testing.assert_array_equal(bits(got), bits(want), err_msg=f"{fmt.name} {rows}x{cols} {what}")


def test_upload_refuses_rows_of_partial_blocks(gpu_device):
    with pytest.raises(ValueError, match=r"wq: weight of shape \(3, 48\) cannot be stored as q4_k"):
        upload_weight(gpu_device, bytes(3 * 48), "q4_k", (3, 48), "wq")
