"""The GEMM autotune: measured tiles are kept per adapter on disk, read back without timing, never change a
product's values, never write the model's buffers and never count in the memory plan."""
import json

import numpy as np
import pytest

from engine.backends.wgpu.kernels.linear import TILES, GemmShape, Matmul, choose_tile
from engine.backends.wgpu.tuning import CACHE_FILE, TUNE_ENV, GemmTuner, adapter_identity

pytestmark = pytest.mark.gpu


@pytest.fixture
def tuned(gpu_device, tmp_path, monkeypatch):
    """gpu_device with a tuner writing tmp_path's cache (lavapipe is tuned only when asked)."""
    monkeypatch.setenv(TUNE_ENV, "1")
    gpu_device.gemm_tuner = GemmTuner.for_context(gpu_device, tmp_path / CACHE_FILE)
    yield gpu_device
    gpu_device.gemm_tuner.release()
    gpu_device.gemm_tuner = None


def product(ctx, rng, M=67, N=45, K=131, **kw):
    a = rng.standard_normal((M, K)).astype(np.float32)
    b = rng.standard_normal((N, K)).astype(np.float32)
    c0 = rng.standard_normal((M, N)).astype(np.float32)
    c = ctx.upload(c0, "c")
    mm = Matmul(ctx, c, ctx.upload(a, "a"), ctx.upload(b, "b"), GemmShape(M, N, K, trans_b=True), alpha=0.5,
                beta=1.0, **kw)
    return mm, c, 0.5 * a @ b.T + c0


def run(ctx, mm, c, M, N):
    enc = ctx.encoder()
    mm.encode(enc)
    enc.submit()
    return ctx.read(c, count=M * N).reshape(M, N)


def test_a_tuned_tile_is_measured_once_kept_on_disk_and_computes_the_same(tuned, tmp_path):
    ctx, rng = tuned, np.random.default_rng(3)
    before = ctx.bytes_allocated
    mm, c, want = product(ctx, rng)
    # Only the product's own buffers count: the trial products and the timing scratch are left out.
    assert ctx.bytes_allocated - before == sum(-(-n * 4 // 16) * 16 for n in (67 * 131, 45 * 131, 67 * 45)) \
        + mm.params.size
    assert ctx.gemm_tuner.measured == 1 and mm.tile in TILES
    # beta = 1: the timing never touched c (it wrote the scratch), so the result is exactly one product.
    np.testing.assert_allclose(run(ctx, mm, c, 67, 45), want, rtol=1e-4, atol=1e-4)
    assert not (tmp_path / CACHE_FILE).exists()          # written once, when the model is built (release)
    ctx.gemm_tuner.release()
    saved = json.loads((tmp_path / CACHE_FILE).read_text())
    assert list(saved[adapter_identity(ctx)].values()) == [[*mm.tile, 0]]   # (rows, columns, not split)

    again = GemmTuner.for_context(ctx, tmp_path / CACHE_FILE)
    ctx.gemm_tuner = again
    mm2, c2, want2 = product(ctx, np.random.default_rng(4))
    assert again.measured == 0 and mm2.tile == mm.tile
    np.testing.assert_allclose(run(ctx, mm2, c2, 67, 45), want2, rtol=1e-4, atol=1e-4)


def test_a_forced_tile_is_not_timed_and_a_split_product_is_timed_split_and_whole(tuned):
    ctx, rng = tuned, np.random.default_rng(5)
    product(ctx, rng, tile=(64, 64))
    assert ctx.gemm_tuner.measured == 0
    partials = ctx.buffer(4 << 16, "partials")
    mm, c, want = product(ctx, rng, M=5, N=7, K=700, partials=partials)
    # Each tile timed split (its own slices, reduction into the scratch) and whole; c (beta = 1) holds one product.
    assert ctx.gemm_tuner.measured == 1 and mm.tile in TILES
    (key, choice), = ctx.gemm_tuner.table.items()
    assert " partials" in key and choice == [*mm.tile, int(mm.splits > 1)]
    np.testing.assert_allclose(run(ctx, mm, c, 5, 7), want, rtol=1e-4, atol=1e-4)
    for split in (True, False):   # whichever the clock chose, the other plan computes the same product
        ctx.gemm_tuner.table[key] = [*mm.tile, int(split)]
        again, c2, want2 = product(ctx, np.random.default_rng(6), M=5, N=7, K=700, partials=partials)
        assert (again.splits > 1) == split
        np.testing.assert_allclose(run(ctx, again, c2, 5, 7), want2, rtol=1e-4, atol=1e-4)


def test_an_unreadable_cache_is_measured_again(gpu_device, tmp_path, monkeypatch):
    monkeypatch.setenv(TUNE_ENV, "1")
    (tmp_path / CACHE_FILE).write_text("{not json")
    tuner = GemmTuner.for_context(gpu_device, tmp_path / CACHE_FILE)
    assert tuner.table == {}
    gpu_device.gemm_tuner = tuner
    try:
        product(gpu_device, np.random.default_rng(6))
    finally:
        tuner.release()
        gpu_device.gemm_tuner = None
    assert tuner.measured == 1 and json.loads((tmp_path / CACHE_FILE).read_text())


def test_software_adapters_and_the_switch_use_the_rule(gpu_device, monkeypatch):
    monkeypatch.delenv(TUNE_ENV, raising=False)
    assert GemmTuner.for_context(gpu_device) is None          # lavapipe: its timings say nothing about a GPU
    monkeypatch.setenv(TUNE_ENV, "0")
    assert GemmTuner.for_context(gpu_device) is None


@pytest.mark.parametrize("M,N,want", [(4096, 1024, (128, 128)), (4096, 512, (128, 64)), (512, 3072, (64, 64)),
                                      (70, 5000, (64, 64))])
def test_the_rule_takes_the_largest_tile_that_leaves_the_gpu_busy(M, N, want):
    assert choose_tile(GemmShape(M, N, 64)) == want


def test_a_failed_measurement_falls_back_to_the_rule(tuned):
    ctx = tuned
    ctx.gemm_tuner.table["stale"] = [96, 96, 0]       # not a variant of this version: ignored, measured again

    def broken(scratch, choice):
        raise MemoryError("no room for the scratch")

    assert ctx.gemm_tuner.choose("stale", 10, broken, ((64, 64, 0),)) is None
    assert ctx.gemm_tuner.failed and ctx.gemm_tuner.measured == 0
    mm, c, want = product(ctx, np.random.default_rng(7))
    assert mm.tile == choose_tile(mm.shape) and ctx.gemm_tuner.measured == 0
    np.testing.assert_allclose(run(ctx, mm, c, 67, 45), want, rtol=1e-4, atol=1e-4)


def test_shaders_compute_the_same_with_and_without_runtime_checks(gpu_device, monkeypatch):
    """create_module's two paths (trusted by default, LORA_LAB_SHADER_CHECKS=1 checked) on a fresh context each."""
    from engine.backends.wgpu.context import SHADER_CHECKS_ENV, GpuContext
    results = []
    for checks in ("0", "1"):
        monkeypatch.setenv(SHADER_CHECKS_ENV, checks)
        ctx = GpuContext(adapter=gpu_device.adapter, device=gpu_device.device, label=gpu_device.label)
        mm, c, want = product(ctx, np.random.default_rng(8), M=70, N=129, K=33)
        results.append(run(ctx, mm, c, 70, 129))
        np.testing.assert_allclose(results[-1], want, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(results[0], results[1])


@pytest.mark.parametrize("backend", ["Metal", "D3D12", "OpenGL"])
def test_backends_without_robust_buffer_access_keep_the_checks(backend):
    from engine.backends.wgpu.context import create_module

    class Device:   # stands in for a wgpu device: records which entry point compiled the module
        def __init__(self):
            self.checked = []

        def create_shader_module(self, label, code):
            self.checked.append(label)
            return "checked module"

    device = Device()
    assert create_module(device, "linear", "// code", backend) == "checked module" and device.checked == ["linear"]
