"""Python twin of shaders/linear.wgsl: the tiled GEMM every matrix product of the engine goes through.

`Matmul` binds one product C = alpha·op(A)·op(B) (+ bias) (+ beta·C) to its buffers once; `Linear` is the frozen
projection y = x·Wᵀ + b with its input gradient dx = dy·W (frozen weights need no weight gradient).
A buffer argument is a wgpu buffer or a (buffer, byte offset, byte size) sub-range.

B (the frozen weight of Linear) may be stored in 16 bits: `pack_weight` / `upload_weight` make the buffer
(f16, or bf16 rounded to nearest-even), and `b_format` / `weight_format` tell the shader (B_FORMAT) to widen it.
A frozen weight may also be held in a GGUF block format (engine.model.weight_formats: its GPU layout, uploaded by
engine.backends.wgpu.weights); the shader then dequantizes it in the same load.
"""
from __future__ import annotations

from dataclasses import dataclass
import numpy as np

from engine.backends.wgpu.context import UNIFORM, GpuContext, StepEncoder
from engine.backends.wgpu.kernels.grids import grid_1d
from engine.backends.wgpu.uniforms import uniform_struct
from engine.model.weight_formats import FORMATS, WeightFormat, bf16_bits

TILE_M = 64   # rows of C per workgroup (BM in the shader)
TILE_N = 64   # columns of C per workgroup (BN)
TILE_K = 16   # K step through workgroup memory (BK)
SPLIT_TARGET_WORKGROUPS = 512   # split K until about this many workgroups run (a large GPU's worth)
SPLIT_MAX_TILES = 256           # products with this many 64×64 tiles already fill a GPU: never split
SPLIT_MIN_K = 128               # never give a split less K than this
SPLIT_PARTIAL_FLOATS = 1 << 22  # 16 MiB of partial products, shared by every product of a backend
TILES = ((128, 128), (128, 64), (TILE_M, TILE_N))   # (rows, columns) of C per workgroup, largest first
WIDE_MIN_WORKGROUPS = 256       # tiles above 64×64 only where they still leave this many workgroups (a large GPU busy)
WIDE_MAX_PADDING = 1.15         # ... and where their padding past C's edge adds at most 15% of the work
GROUP_M = 8                     # tile rows per group of the workgroup order (L2 reuse between resident tiles)
PLAIN_B_FORMATS = (WeightFormat.F32, WeightFormat.F16, WeightFormat.BF16)   # addressed by element (ldb, b_off)


@dataclass(frozen=True)
class GemmKernel:
    """How the shader walks K (its BK, DOUBLE and PREFETCH constants) and maps invocations; the tile is chosen
    separately. `diag` is for bench/matmul.py's sweep only: its products are wrong by design (linear.wgsl DIAG)."""
    bk: int = 16              # K step through workgroup memory (8, 16, or 32: then 32 KiB of tiles)
    double: bool = False      # two tile stages in workgroup memory, one barrier per step (bk 8 only: 16 KiB)
    prefetch: bool = False    # next step's operand runs loaded into registers while this one computes
    frag: bool = False        # next k's fragments read from workgroup memory while this k computes
    warp_8x4: bool = False    # a warp covers 8 × 4 invocations (fewer shared-memory wavefronts per k)
    diag: int = 0             # 1: no global loads, 2: no staging at all (measurement of the inner loop alone)
    loaders: int = 0          # > 0: matmul_specialized, this many invocations stage operands a step ahead

    def __post_init__(self):
        if self.bk not in (8, 16, 32) or (self.double and self.bk != 8) or (self.bk == 32 and self.prefetch):
            raise ValueError(f"GEMM kernel bk={self.bk} double={self.double} prefetch={self.prefetch}: bk must be "
                             "8, 16 or 32, double needs bk 8, prefetch holds at most two runs (bk <= 16)")
        if self.loaders and (self.loaders % 32 or self.bk != 16 or self.double or self.prefetch or self.frag
                             or self.diag):
            raise ValueError(f"GEMM kernel loaders={self.loaders}: the specialized kernel walks K by 16 in two "
                             "stages of its own, with a multiple of 32 loaders and no other option")

    @property
    def tile_vecs(self) -> int:
        """vec4s of each workgroup tile array: stages · BK k-rows of up to 128 floats."""
        return (2 if self.double or self.loaders else 1) * self.bk * 32

    @property
    def entry_point(self) -> str:
        return "matmul_specialized" if self.loaders else "matmul"

    @property
    def name(self) -> str:
        return (f"bk{self.bk}{'-double' if self.double else ''}{'-prefetch' if self.prefetch else ''}"
                f"{'-frag' if self.frag else ''}{'-warp8x4' if self.warp_8x4 else ''}"
                f"{f'-diag{self.diag}' if self.diag else ''}{f'-loaders{self.loaders}' if self.loaders else ''}")

    def constants(self) -> dict:
        return {"BK": self.bk, "DOUBLE": int(self.double), "PREFETCH": int(self.prefetch), "FRAG": int(self.frag),
                "TILE_VECS": self.tile_vecs, "WARP_8X4": int(self.warp_8x4), "DIAG": self.diag,
                **({"LOADERS": self.loaders} if self.loaders else {})}


KERNELS = (GemmKernel(16), GemmKernel(16, prefetch=True), GemmKernel(16, frag=True),
           GemmKernel(16, prefetch=True, frag=True), GemmKernel(8, True, True), GemmKernel(8, True, True, True),
           GemmKernel(32), GemmKernel(16, warp_8x4=True), GemmKernel(8, True, True, warp_8x4=True),
           GemmKernel(16, loaders=64), GemmKernel(16, loaders=128), GemmKernel(16, loaders=256))
DIAG_KERNELS = (GemmKernel(16, diag=1), GemmKernel(16, diag=2), GemmKernel(32, diag=2))
F16_KERNELS = (GemmKernel(16), GemmKernel(32), GemmKernel(16, warp_8x4=True), GemmKernel(32, warp_8x4=True))
DEFAULT_KERNEL = GemmKernel()


@dataclass(frozen=True)
class GemmShape:
    """C[M, N] += A[M, K]·B[K, N] with row strides and element offsets (defaults: dense, offset 0)."""
    M: int
    N: int
    K: int
    trans_a: bool = False   # A stored [K, M]
    trans_b: bool = False   # B stored [N, K]
    lda: int = 0            # 0: the dense stride (K, or M when transposed)
    ldb: int = 0
    ldc: int = 0
    a_off: int = 0
    b_off: int = 0
    c_off: int = 0

    def __post_init__(self):
        if min(self.M, self.N, self.K) < 1:
            raise ValueError(f"matmul sizes must be positive, got M={self.M} N={self.N} K={self.K}")

    def strides(self) -> tuple[int, int, int]:
        lda = self.lda or (self.M if self.trans_a else self.K)
        ldb = self.ldb or (self.K if self.trans_b else self.N)
        return lda, ldb, self.ldc or self.N


def split_k(shape: GemmShape, partial_floats: int, tile: tuple[int, int] = (TILE_M, TILE_N)) -> int:
    """How many K slices a product gets: 1 unless its 64×64 tiles are too few to fill a GPU and K is long; then
    enough slices of `tile`-sized tiles for about SPLIT_TARGET_WORKGROUPS workgroups (a larger tile has fewer
    tiles, so more slices), never more than K / SPLIT_MIN_K or than `partial_floats` holds."""
    if -(-shape.N // TILE_N) * -(-shape.M // TILE_M) >= SPLIT_MAX_TILES:
        return 1
    tiles = -(-shape.N // tile[1]) * -(-shape.M // tile[0])
    splits = min(-(-SPLIT_TARGET_WORKGROUPS // tiles), shape.K // SPLIT_MIN_K,
                 partial_floats // (shape.M * shape.N))
    return max(1, splits)


def choose_tile(shape: GemmShape) -> tuple[int, int]:
    """The largest tile that still leaves WIDE_MIN_WORKGROUPS workgroups (a large GPU busy), else 64×64: the rule
    where no measurement is at hand (engine.backends.wgpu.tuning measures on a real GPU).

    On the H200 with trusted shaders (bench/results/matmul-h200-trusted.json) this picks within 5% of the best
    tile at every measured shape: 128×128 25.4 TFLOP/s at 4096×1024×1024 (128×64: 20.9), 64×64 20.8 at
    512×3072×1024 (128×128: 15.0, its 96 workgroups leave most of the GPU idle).
    """
    for rows, cols in TILES[:-1]:
        tiles_m, tiles_n = -(-shape.M // rows), -(-shape.N // cols)
        padded = tiles_m * rows * tiles_n * cols
        if tiles_m * tiles_n >= WIDE_MIN_WORKGROUPS and padded <= WIDE_MAX_PADDING * shape.M * shape.N:
            return rows, cols
    return TILES[-1]


def vec_loads(shape: GemmShape) -> tuple[bool, bool]:
    """Whether A and B are read as one vec4 (or 8-byte 16-bit) load per run of 4: stride and offset 4-aligned."""
    lda, ldb, _ = shape.strides()
    return lda % 4 == 0 and shape.a_off % 4 == 0, ldb % 4 == 0 and shape.b_off % 4 == 0


def tuned_plan(ctx: GpuContext, family: str, shape: GemmShape, partials, b_format: WeightFormat,
               build) -> tuple[tuple[int, int], bool] | None:
    """(tile, split over K) of a product as measured (ctx.gemm_tuner, engine.backends.wgpu.tuning), or None (no
    tuner, an output too big to time): then gemm_plan's rule decides. A product the rule would split is timed
    with each tile both split (each tile's own slice count, split_k, reduction included) and whole.
    build(scratch_c, tile, split): the same product so planned, writing scratch_c instead of its C."""
    tuner = ctx.gemm_tuner
    if tuner is None:
        return None
    vec_a, vec_b = vec_loads(shape)
    ldc = shape.strides()[2]
    splittable = partials is not None and split_k(shape, partials.size // 4) > 1
    key = (f"{family} {shape.M}x{shape.N}x{shape.K} {'T' if shape.trans_a else 'N'}{'T' if shape.trans_b else 'N'}"
           f" vec{int(vec_a)}{int(vec_b)} {b_format.name.lower()}"
           f"{f' partials{partials.size // 4}' if splittable else ''}")
    candidates = tuple((*tile, split) for tile in TILES for split in ((1, 0) if splittable else (0,)))
    choice = tuner.choose(key, shape.c_off + (shape.M - 1) * ldc + shape.N,
                          lambda scratch, c: build(scratch, (c[0], c[1]), bool(c[2])), candidates)
    return None if choice is None else ((choice[0], choice[1]), bool(choice[2]))


def pack_weight(array: np.ndarray, fmt: WeightFormat | str) -> np.ndarray:
    """The flat array a weight buffer of a plain format holds: f32 as is; f16/bf16 two per u32 (element 2i low),
    packed across rows, so any ldb and b_off address it (for rows of even length this is exactly
    engine.model.weight_formats' GPU layout).

    bf16 is the f32 rounded to nearest-even on its top 16 bits (NaN stays NaN), as torch's .to(bfloat16).
    """
    fmt = WeightFormat.parse(fmt)
    if fmt not in PLAIN_B_FORMATS:
        raise ValueError(f"weight format {fmt.name.lower()} is not packed by element; upload block formats with "
                         "engine.model.weight_formats.to_gpu_layout")
    flat = np.ascontiguousarray(array, np.float32).ravel()
    if fmt == WeightFormat.F32:
        return flat
    if fmt == WeightFormat.F16:
        half = flat.astype(np.float16).view(np.uint16)
    else:
        half = bf16_bits(flat)
    return np.concatenate([half, np.zeros(len(half) % 2, np.uint16)]).view(np.uint32)


def widen_weight(array: np.ndarray, fmt: WeightFormat | str) -> np.ndarray:
    """The f32 values the shader computes with for a weight stored as a plain `fmt` (the numpy reference)."""
    fmt = WeightFormat.parse(fmt)
    flat = np.ascontiguousarray(array, np.float32)
    if fmt == WeightFormat.F16:
        return flat.astype(np.float16).astype(np.float32)
    if fmt == WeightFormat.BF16:
        words = pack_weight(flat, fmt).view(np.uint16)[:flat.size].astype(np.uint32) << 16
        return words.view(np.float32).reshape(flat.shape)
    return flat


def upload_weight(ctx: GpuContext, array: np.ndarray, fmt: WeightFormat | str, label: str):
    """A weight buffer in `fmt` (pass the same fmt to Matmul's b_format / Linear's weight_format)."""
    return ctx.upload(pack_weight(array, fmt), label)


def _vec_binding(buf):
    """The binding of a vec4-typed operand: its byte size rounded up to 16 (within the buffer), so the array's
    last vec4 covers the last elements; GpuContext.buffer sizes are multiples of 16 and storage offsets of 256."""
    b, offset, size = buf if isinstance(buf, tuple) else (buf, 0, buf.size)
    return b, offset, min(-(-size // 16) * 16, b.size - offset)


def pack_gemm_params(shape: GemmShape, alpha: float, beta: float, has_bias: bool, k_chunk: int = 0,
                     splits: int = 1, row_stride: int = 0, b_row_blocks: int = 0) -> bytes:
    """The shader's Params uniform (linear.wgsl struct Params), packed by field name."""
    lda, ldb, ldc = shape.strides()
    return uniform_struct("linear", "Params").pack(
        M=shape.M, N=shape.N, K=shape.K, lda=lda, ldb=ldb, ldc=ldc, a_off=shape.a_off, b_off=shape.b_off,
        c_off=shape.c_off, has_bias=int(has_bias), k_chunk=k_chunk or shape.K, splits=splits, row_stride=row_stride,
        alpha=alpha, beta=beta, b_row_blocks=b_row_blocks)


def block_row_blocks(shape: GemmShape, fmt: WeightFormat) -> int:
    """Blocks per stored row of a block-format B, checking that B is a whole weight addressed from its start."""
    row = shape.K if shape.trans_b else shape.N
    info = FORMATS[fmt]
    if shape.b_off or shape.strides()[1] != row or row % info.block_size:
        raise ValueError(f"a {info.name} weight must be a whole matrix of rows of {info.block_size}-weight blocks "
                         f"(b_off 0, ldb = row length {row}); got b_off {shape.b_off}, ldb {shape.strides()[1]}")
    return row // info.block_size


def measured_plan(plan: tuple[tuple[int, int], bool] | None, partials):
    """(tile or None, partials or None) for gemm_plan from tuned_plan's answer: a product measured faster whole
    gets no partials (so it is not split); None (nothing measured) leaves both to the rule."""
    if plan is None:
        return None, partials
    tile, split = plan
    return tile, partials if split else None


def gemm_plan(shape: GemmShape, partials=None, tile: tuple[int, int] | None = None
              ) -> tuple[tuple[int, int], int, int, bool, bool]:
    """(tile, splits, k_chunk, vec_a, vec_b) of one product, for both GEMM families (Matmul, MatmulF16): split-K
    where a partials scratch is given and the product wants it (slices for the tile's count), K chunks whole BK
    steps, and vec4 loads where stride and offset are 4-aligned (one vec4, or 8-byte 16-bit, load per run of 4)."""
    split = partials is not None and split_k(shape, partials.size // 4) > 1
    # A split product takes the given (measured) tile, else 64×64: its slices already fill the GPU, and no
    # measurement yet says a larger tile wins there without a tuner.
    chosen = tile or ((TILE_M, TILE_N) if split else choose_tile(shape))
    if chosen not in TILES:
        raise ValueError(f"matmul tile {tile} is not one of {TILES}")
    splits = split_k(shape, partials.size // 4, chosen) if split else 1
    k_chunk = -(-(-(-shape.K // splits)) // TILE_K) * TILE_K
    return (chosen, -(-shape.K // k_chunk), k_chunk, *vec_loads(shape))


class Matmul:
    """One bound GEMM: c = alpha·op(a)·op(b) + bias + beta·c.

    Given `partials` (a scratch shared by many products), a product with few tiles and a long K is split over
    K (split_k, never needing more floats than `partials` holds) and finished by a reduction dispatch.
    """

    def __init__(self, ctx: GpuContext, c, a, b, shape: GemmShape, alpha: float = 1.0, beta: float = 0.0,
                 bias=None, partials=None, tile: tuple[int, int] | None = None, label: str = "matmul",
                 b_format: WeightFormat | str = WeightFormat.F32, group_m: int = GROUP_M,
                 kernel: GemmKernel | None = None):
        b_format = WeightFormat.parse(b_format)
        row_blocks = 0 if b_format in PLAIN_B_FORMATS else block_row_blocks(shape, b_format)
        self.ctx = ctx
        self.shape = shape
        if tile is None:
            family = "linear" if kernel in (None, DEFAULT_KERNEL) else f"linear {kernel.name}"

            def trial(scratch, trial_tile, split, whole_partials=partials):
                return Matmul(ctx, scratch, a, b, shape, alpha, beta, bias, whole_partials if split else None,
                              tile=trial_tile, label=f"{label}.tune", b_format=b_format, group_m=group_m,
                              kernel=kernel)
            tile, partials = measured_plan(tuned_plan(ctx, family, shape, partials, b_format, trial), partials)
        self.tile, self.splits, k_chunk, self.vec_a, self.vec_b = gemm_plan(shape, partials, tile)
        reduce_groups = grid_1d(ctx, shape.M * shape.N)
        self.kernel = kernel = kernel or DEFAULT_KERNEL
        self.pipeline = ctx.pipeline("linear", kernel.entry_point, {
            "TRANS_A": int(shape.trans_a), "TRANS_B": int(shape.trans_b), "WIDE": int(self.tile[0] == 128),
            "WIDE_N": int(self.tile[1] == 128), "VEC_A": int(self.vec_a), "VEC_B": int(self.vec_b),
            "B_FORMAT": b_format.value, "GROUP_M": group_m, **kernel.constants()})
        params = pack_gemm_params(shape, alpha, beta, bias is not None, k_chunk, self.splits, reduce_groups[2],
                                  row_blocks)
        self.params = ctx.upload(np.frombuffer(params, np.uint8), f"{label}.params", UNIFORM)
        # The layout always has a bias binding; without a bias, b stands in (read-only too, and never read).
        bias = bias if bias is not None else b
        a, b = _vec_binding(a), _vec_binding(b)
        self.groups = (-(-shape.N // self.tile[1]), -(-shape.M // self.tile[0]), self.splits)
        # Binding 6 is B again (the block formats' word view): in the layout whatever B_FORMAT is.
        operands = {1: a, 2: b, 3: bias, 4: self.params, 6: b}
        self.bind_group = ctx.bind_group(self.pipeline, {0: c if self.splits == 1 else partials, **operands}, label)
        self.reduce = SplitKReduce(ctx, c, bias, self.params, partials, reduce_groups, label) \
            if self.splits > 1 else None

    def encode(self, enc: StepEncoder) -> None:
        enc.dispatch(self.pipeline, self.bind_group, *self.groups)
        if self.reduce is not None:
            self.reduce.encode(enc)


class SplitKReduce:
    """linear.wgsl's matmul_reduce bound for one split-K product of either GEMM family (Matmul, MatmulF16): sums
    the partials into C with alpha, bias and beta from the product's own params."""

    def __init__(self, ctx: GpuContext, c, bias, params, partials, reduce_groups, label: str):
        self.pipeline = ctx.pipeline("linear", "matmul_reduce")
        self.bind_group = ctx.bind_group(self.pipeline, {0: c, 3: bias, 4: params, 5: partials}, f"{label}.reduce")
        self.groups = reduce_groups[:2]

    def encode(self, enc: StepEncoder) -> None:
        enc.dispatch(self.pipeline, self.bind_group, *self.groups)


class Linear:
    """Frozen projection out = scale·x·Wᵀ + b over M rows; backward writes (or with accumulate, adds)
    dx = scale·dy·W. (`scale`: Granite's residual_multiplier on o_proj and down_proj; 1 otherwise.)

    x [M, in], W [out, in], b [out] or None, out [M, out]; dy [M, out], dx [M, in]. With `partials`, products
    of few rows (small batches) are split over K to keep a large GPU busy. weight_format: how W is stored
    (upload_weight); activations, bias and outputs stay f32. (kernels.linear_f16.LinearF16: the same layer
    multiplying in half precision.)
    """
    math = "f32"   # the arithmetic of both products

    def __init__(self, ctx: GpuContext, out, x, weight, bias, M: int, in_features: int, out_features: int,
                 dy=None, dx=None, accumulate_dx: bool = False, partials=None, label: str = "linear",
                 weight_format: WeightFormat | str = WeightFormat.F32, scale: float = 1.0):
        if scale != 1.0 and bias is not None:
            raise ValueError(f"{label}: a scaled projection with a bias would leave the bias unscaled")
        self.forward = self.product(ctx, out, x, weight, GemmShape(M, out_features, in_features, trans_b=True),
                                    alpha=scale, bias=bias, partials=partials, label=f"{label}.fwd",
                                    b_format=weight_format)
        self.backward = None
        if dy is not None and dx is not None:
            self.backward = self.product(ctx, dx, dy, weight, GemmShape(M, in_features, out_features), alpha=scale,
                                         beta=1.0 if accumulate_dx else 0.0, partials=partials,
                                         label=f"{label}.bwd", b_format=weight_format)

    def product(self, ctx, c, a, b, shape: GemmShape, **kw):
        """The GEMM of one of the two products (LinearF16 overrides it)."""
        return Matmul(ctx, c, a, b, shape, **kw)

    def encode_forward(self, enc: StepEncoder) -> None:
        self.forward.encode(enc)

    def encode_backward(self, enc: StepEncoder) -> None:
        self.backward.encode(enc)
