// Linear layers as one tiled GEMM: C[M, N] = alpha · op(A)[M, K] · op(B)[K, N] (+ bias[N]) (+ beta · C).
//
// Every matrix product of the engine is the one entry point `matmul` with a different layout (Linear and
// LoraBranch in the Python twin pick them):
//   forward          y  = x · Wᵀ + b        A = x [M, K],  B = W [N, K] read transposed (TRANS_B)
//   input gradient   dx = dy · W (+ dx)     A = dy [M, N], B = W [N, K] as stored
//   weight gradient  dW = dyᵀ · x (+ dW)    A = dy [M, N] read transposed (TRANS_A)  (LoRA dA, dB)
// Strides (lda/ldb/ldc) and element offsets let the chunked LM head address a column range of a wider matrix.
//
// Split-K: a weight gradient has a small C ([r, in] for LoRA's dA) and a huge K (B·T), and a small batch's
// projections have few rows, so their few tiles would leave most of a GPU idle. With splits > 1, workgroup z
// covers K range [z·k_chunk, (z+1)·k_chunk) and writes its raw partial product into c as partials [splits, M, N];
// matmul_reduce then sums the partials into the real C with alpha, bias and beta. No atomics: deterministic.
//
// Tiling: a 16×16 workgroup computes a 64×64 tile of C, each invocation a 4×4 block held in four vec4
// accumulators (never a runtime-indexed private array: measured 50× slower on NVIDIA); WIDE doubles the tile's
// rows (the invocation also takes rows 64 + lid.y·4..), WIDE_N its columns (columns 64 + lid.x·4..), up to a
// 128×128 tile with an 8×8 block in sixteen vec4s. K advances in steps of BK = 16 through workgroup memory.
//
// Operand loads: both operands are read from global memory as runs of 4 consecutive stored elements (one vec4
// load when VEC_A / VEC_B say the stride and offset are multiples of 4, else 4 scalar loads: the fallback for
// odd strides; either way elements past the matrix edge read as 0, so no size needs to be a multiple of
// anything). Workgroup memory always holds a_tile [BK][BM] and b_tile [BK][BN] (M and N contiguous), so the
// inner loop is one layout: per k, a vec4 of A rows and a vec4 of B columns, broadcast or consecutive across a
// warp's lanes (no bank conflicts). A run along M or N (TRANS_A's A, plain B) is stored as one vec4; a run
// along K (plain A, TRANS_B's B) is scattered as 4 scalars into 4 k-rows, with the 32 lanes of a warp on 32
// consecutive rows/columns so the scattered stores hit 32 different banks. The next K step's runs are loaded
// into registers while the current step computes (register double buffering: one 16 KiB tile pair, the
// portable workgroup-memory minimum). Workgroups are numbered in groups of GROUP_M tile rows so that the
// workgroups resident together share A rows and B columns in L2.
//
// Frozen weights in their storage format (B_FORMAT, the GGML type id: engine.model.weight_formats.WeightFormat):
// B is bound as array<vec4<u32>> (and, for the block formats, the same buffer again as `weights`, array<u32>)
// whatever its format, and `b_run` is the ONE place that turns stored B into f32: 0 = f32 (bitcast); 1 = f16
// and 30 = bf16, two per u32 (element 2i in the low half), widened in the load; every other value is a GGUF
// block format (Q8_0, Q4_0, Q4_1, Q4_K, Q5_K, Q6_K) read through shaders/weight_formats.wgsl's
// weight_load4(format, row_blocks, row, col) from its GPU layout (rows of whole blocks: b_off = 0, ldb = the
// row length, b_row_blocks = ldb / block size). The tiles and the arithmetic stay f32 (no shader-f16 feature).
// col is always a multiple of 4 (k0 and tile origins are), so a run never straddles a block of 32; a stored row
// is a run of whole blocks along the weight's input dimension in both layouts that read B (TRANS_B forward: a
// row is W[n, :]; input gradient: a row is W[k, :]).
//
// Measured on one NVIDIA H200 (Vulkan, driver 580.159.04, wgpu-native 0.32), bench/matmul.py, TFLOP/s of
// f32 products; torch 2.11 fp32 with TF32 off measured ~50 at the big shapes in the same runs
// (bench/results/matmul-h200*.json):
//   - vec4 runs + one tile layout + grouped order, 128×64 tile, BK 16, no prefetch (the default): 21.2 at
//     4096³ NT, 21.4 at 4096×8192×2048 NN, 19.6 at 16384×576×1536 NT; 0.24-0.75× torch fp32 over all
//     training shapes (median 0.39). The old kernel measured 8.7-25.5 (issue 16's table).
//   - 128×128 (8×8 per invocation): 14.8-17.1 at every sweep shape, below 128×64 (4×8) with every K walk, while
//     naga's runtime checks were compiled in; without them (trusted modules, below) it is the best tile at
//     4096 rows: 25.4 vs 20.9 at 4096×1024×1024. 64×64: 13-18.5 (checked).
//   - register prefetch of the next K step (PREFETCH): 17.7-19.2 vs 21.4-22.0 without, at 128×64.
//   - two workgroup-memory stages, BK 8 (DOUBLE): 16.7-18.3; BK 8 single stage: 20.4-21.6.
//   - next k's fragments read while k computes (FRAG): 21.6 / 21.4 vs 21.4 / 22.0 (no gain).
//   - GROUP_M 8 vs 1 (plain row order): 15.6 vs 15.3 at 4096×8192×2048 (128×128); kept, harmless.
//   - f16 / bf16 weights (B_FORMAT 1 / 2): the same speed as f32 or up to 10% faster (half the B bytes).
//   - "4096³ is 3× slower" was the first product timed with the clocks down: 4.2 then 15.7 for the same
//     pipeline in one run; after a warm-up 4096³ measures like its neighbours.
//   - split-K below 256 tiles to ~512 workgroups: LM head d(hidden) 341×1024×151936 10.6 → 12.4 (1024: 14.5).
//   - naga's runtime checks off (engine/backends/wgpu/context.py create_module: no index clamps into a_tile/b_tile
//     and the accumulators, no loop-bounding counter in the K loops): +25-30% at every shape, 4096³ 21.3 → 27.2,
//     512×3072×1024 14.9 → 20.6 (matmul-h200-checked.json against matmul-h200-trusted.json, one session).
//   - the tile per product measured by engine/backends/wgpu/tuning.py: median 0.54× torch fp32 over the training
//     shapes (0.51× with choose_tile's rule), 27.1 at 4096³ (matmul-h200-tuned.json).
//   - Sweep of every variant without runtime checks, each timed after all were compiled, round-robin, best of
//     three (bench/matmul.py --sweep 6, bench/results/matmul-h200-sweep.json; the earlier sweeps timed each
//     variant right after its compile, with the clocks down: matmul-h200-sweep-noisy.json, 2-5× off at random).
//     The default (BK 16, no prefetch) is the best or within 2% at every shape: 4096³ NT 27.5 (128×64 and
//     128×128), 4096×8192×2048 NN 30.6 (128×64), 4096×1024×1024 25.6 (128×128), 512×3072×1024 20.8 (64×64).
//     PREFETCH: -1 to -35% at 128×64 and 64×64, +-3% at 128×128. FRAG: +-2%. DOUBLE (BK 8): -2 to -40%.
//     WARP_8X4 (a warp 8 × 4 invocations, fewer shared-memory wavefronts): +-2%. BK 32: -25 to -50%.
//   - Where the time goes (the DIAG rows): the inner loop alone (DIAG 2: no loads, no stores) reaches 47.5 at
//     128×64 (70% of the 67 TFLOP/s FP32 peak) but only 37 at 128×128 and 64×64; without the global loads but
//     with the workgroup stores (DIAG 1) 128×64 reaches 43. So the global loads take 128×64 from ~43 to ~30:
//     their latency, not bandwidth (12 KiB per 262 kFLOP step). Hiding it costs registers (PREFETCH holds 12-16
//     more), and with them a workgroup per multiprocessor: PREFETCH loses at 128×64 and 64×64, where occupancy
//     hid the latency, and breaks even at 128×128, which already ran two. BK 32's inner loop alone is as fast as
//     BK 16's at 128×64 (44.7 once its K loop runs in steps of 16: a loop of 32 measured 35.7), so its loss is
//     in the staging of four runs per operand per invocation.
//   - matmul_specialized (LOADERS invocations stage the next step while 256 compute; entry point below), 4096³ NT
//     (matmul-h200-sweep-loaders.jsonl): 64 loaders 12.8 / 9.2 / 7.6 at 128×128 / 128×64 / 64×64, 128 loaders
//     23.6 / 14.4 / 9.7, 256 loaders 28.3 / 18.1 / 13.2, against 28.7 / 27.3 / 20.7 for `matmul` in the same run:
//     the loaders' own loads are then the bottleneck (each loader walks its runs one after another), so it is a
//     sweep variant only (not one of the autotune's candidates).
//   - The block of C as one struct (Block, multiply, store_block) instead of sixteen locals: 28.7 against 27.5 at
//     4096³ 128×128, 27.3 against 27.4 at 128×64 (same session's figures above); the compiler keeps it in registers.
// Not reached: the issue's 0.7× torch fp32 (≈ 35 TFLOP/s at the large shapes). The inner loop leaves room (47.5);
// what would reach it is overlapping the loads with the FMAs without spending registers (no asynchronous copy
// to workgroup memory in WGSL) — not found here.
#include "gemm_common.wgsl"
#include "weight_formats.wgsl"

override TRANS_A: bool = false;   // A stored [K, M] instead of [M, K]
override TRANS_B: bool = false;   // B stored [N, K] instead of [K, N]
override WIDE: bool = false;      // 128-row tiles (8 rows per invocation): more FMAs per load, fewer tiles
override WIDE_N: bool = false;    // 128-column tiles (8 columns per invocation)
override VEC_A: bool = false;     // lda and a_off are multiples of 4: one vec4 load per run of A
override VEC_B: bool = false;     // ldb and b_off are multiples of 4: one 16-byte (f32) or 8-byte (16-bit) load
override B_FORMAT: u32 = 0u;      // FMT_*: 0 f32, 1 f16, 30 bf16 (two per u32), else a GGUF block format
override GROUP_M: u32 = 8u;       // tile rows per group of the workgroup order (L2 reuse)
override BK: u32 = 16u;           // K step through workgroup memory: 8, 16 or 32 (32: 32 KiB of tiles)
override DOUBLE: bool = false;    // two tile stages in workgroup memory: one barrier per K step (BK 8 only)
override PREFETCH: bool = true;   // load the next K step's runs into registers while this one computes
override FRAG: bool = false;      // read the next k's fragments from workgroup memory while this k computes
override TILE_VECS: u32 = 512u;   // vec4s per tile array: stages · BK · 32 (the twin sets it with BK)
override WARP_8X4: bool = false;  // a warp covers 8 × 4 invocations of the 16 × 16 (else 16 × 2)
override LOADERS: u32 = 64u;      // matmul_specialized: invocations that only stage operands (the rest compute)
override DIAG: u32 = 0u;          // measurement only (bench/matmul.py --sweep), C is wrong: 1 no global loads,
                                  // 2 no staging at all (the inner loop and barriers alone)

@group(0) @binding(0) var<storage, read_write> c: array<f32>;
@group(0) @binding(1) var<storage, read> a: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> b: array<vec4<u32>>;
@group(0) @binding(3) var<storage, read> bias: array<f32>;
@group(0) @binding(4) var<uniform> params: Params;
@group(0) @binding(5) var<storage, read> partials: array<f32>;   // matmul_reduce only
@group(0) @binding(6) var<storage, read> weights: array<u32>;    // B again, word by word, for the block formats

var<workgroup> a_tile: array<vec4<f32>, TILE_VECS>;  // [stages][BK][BM/4]
var<workgroup> b_tile: array<vec4<f32>, TILE_VECS>;  // [stages][BK][BN/4]

// One 16-bit weight of word `w` (half 0 = low bits) widened to f32.
fn widen(w: u32, high: bool) -> f32 {
    if (B_FORMAT == 1u) { return unpack2x16float(w)[u32(high)]; }
    return bitcast<f32>(select(w << 16u, w & 0xffff0000u, high));
}

fn widen2(w: u32) -> vec2<f32> {
    if (B_FORMAT == 1u) { return unpack2x16float(w); }
    return vec2<f32>(bitcast<f32>(w << 16u), bitcast<f32>(w & 0xffff0000u));
}

fn b_elem(e: u32) -> f32 {
    if (B_FORMAT == 0u) { return bitcast<f32>(b[e >> 2u][e & 3u]); }
    return widen(b[e >> 3u][(e >> 1u) & 3u], (e & 1u) == 1u);
}

// THE load of B: 4 elements of stored B row `row` from column `col` (stored [K, N], or [N, K] with TRANS_B),
// widened to f32 from B_FORMAT; 0 outside. Block-quantized formats plug in here (see the header).
fn b_run(row: u32, col: u32, row_end: u32, col_end: u32) -> vec4<f32> {
    if (row >= row_end || col >= col_end) { return vec4<f32>(0.0); }
    if (B_FORMAT != FMT_F32 && B_FORMAT != FMT_F16 && B_FORMAT != FMT_BF16) {
        // Whole blocks along the row, so col..col+3 are inside it; past col_end (a split's K end) masked.
        let q = weight_load4(B_FORMAT, params.b_row_blocks, row, col);
        return select(vec4<f32>(0.0), q, run_mask(col, col_end));
    }
    let e = params.b_off + row * params.ldb + col;
    var v: vec4<f32>;
    if (VEC_B && B_FORMAT == 0u) {
        v = bitcast<vec4<f32>>(b[e >> 2u]);
    } else if (VEC_B) {
        let q = b[e >> 3u];
        let w = select(q.xy, q.zw, (e & 4u) != 0u);
        v = vec4<f32>(widen2(w.x), widen2(w.y));
    } else {
        let last = e + col_end - col - 1u;   // clamp so no lane reads past the row's end
        v = vec4<f32>(b_elem(e), b_elem(min(e + 1u, last)), b_elem(min(e + 2u, last)), b_elem(min(e + 3u, last)));
    }
    if (col + 3u < col_end) { return v; }
    return select(vec4<f32>(0.0), v, run_mask(col, col_end));
}

// Run r (0 .. BM·BK/4) of the A tile at (row0, k0): its global load, and its store into a_tile.
fn load_a(r: u32, row0: u32, k0: u32, k_end: u32, M4: u32) -> vec4<f32> {
    if (DIAG != 0u) { return vec4<f32>(f32(r)); }
    if (TRANS_A) { return a_run(k0 + r / M4, row0 + (r % M4) * 4u, k_end, params.M); }
    let BM = M4 * 4u;
    return a_run(row0 + r % BM, k0 + (r / BM) * 4u, params.M, k_end);
}

fn store_a(r: u32, v: vec4<f32>, M4: u32, stage: u32) {
    if (DIAG == 2u) { return; }
    let at = stage * BK * M4;
    if (TRANS_A) { a_tile[at + r] = v; return; }
    let BM = M4 * 4u;
    let m = r % BM;
    let k = (r / BM) * 4u + stage * BK;
    a_tile[k * M4 + m / 4u][m % 4u] = v.x;
    a_tile[(k + 1u) * M4 + m / 4u][m % 4u] = v.y;
    a_tile[(k + 2u) * M4 + m / 4u][m % 4u] = v.z;
    a_tile[(k + 3u) * M4 + m / 4u][m % 4u] = v.w;
}

fn load_b(r: u32, col0: u32, k0: u32, k_end: u32, N4: u32) -> vec4<f32> {
    if (DIAG != 0u) { return vec4<f32>(f32(r)); }
    if (!TRANS_B) { return b_run(k0 + r / N4, col0 + (r % N4) * 4u, k_end, params.N); }
    let BN = N4 * 4u;
    return b_run(col0 + r % BN, k0 + (r / BN) * 4u, params.N, k_end);
}

fn store_b(r: u32, v: vec4<f32>, N4: u32, stage: u32) {
    if (DIAG == 2u) { return; }
    let at = stage * BK * N4;
    if (!TRANS_B) { b_tile[at + r] = v; return; }
    let BN = N4 * 4u;
    let n = r % BN;
    let k = (r / BN) * 4u + stage * BK;
    b_tile[k * N4 + n / 4u][n % 4u] = v.x;
    b_tile[(k + 1u) * N4 + n / 4u][n % 4u] = v.y;
    b_tile[(k + 2u) * N4 + n / 4u][n % 4u] = v.z;
    b_tile[(k + 3u) * N4 + n / 4u][n % 4u] = v.w;
}

fn store_row(m: u32, n0: u32, v: vec4<f32>, split: u32) {
    if (m >= params.M) { return; }
    for (var j = 0u; j < 4u; j++) {
        let n = n0 + j;
        if (n < params.N && params.splits > 1u) {
            c[(split * params.M + m) * params.N + n] = v[j];
        } else if (n < params.N) {
            finish(params.c_off + m * params.ldc + n, n, v[j]);
        }
    }
}

// The invocation's block of C, in named vec4s (never a runtime-indexed array: measured 50× slower on NVIDIA):
// acc0-3 rows t.y·4.., acc4-7 rows 64 + t.y·4.. (WIDE), at columns t.x·4..; bcc0-7 the same rows at columns
// 64 + t.x·4.. (WIDE_N). Both GEMM entry points (matmul, matmul_specialized) accumulate and store through these.
struct Block {
    acc0: vec4<f32>, acc1: vec4<f32>, acc2: vec4<f32>, acc3: vec4<f32>,
    acc4: vec4<f32>, acc5: vec4<f32>, acc6: vec4<f32>, acc7: vec4<f32>,
    bcc0: vec4<f32>, bcc1: vec4<f32>, bcc2: vec4<f32>, bcc3: vec4<f32>,
    bcc4: vec4<f32>, bcc5: vec4<f32>, bcc6: vec4<f32>, bcc7: vec4<f32>,
}

// One k of the block: av/aw the A fragments (rows t.y·4.., 64 + t.y·4..), bv/bw the B fragments.
fn multiply(blk: ptr<function, Block>, av: vec4<f32>, aw: vec4<f32>, bv: vec4<f32>, bw: vec4<f32>) {
    (*blk).acc0 = fma(vec4<f32>(av.x), bv, (*blk).acc0);
    (*blk).acc1 = fma(vec4<f32>(av.y), bv, (*blk).acc1);
    (*blk).acc2 = fma(vec4<f32>(av.z), bv, (*blk).acc2);
    (*blk).acc3 = fma(vec4<f32>(av.w), bv, (*blk).acc3);
    if (WIDE_N) {
        (*blk).bcc0 = fma(vec4<f32>(av.x), bw, (*blk).bcc0);
        (*blk).bcc1 = fma(vec4<f32>(av.y), bw, (*blk).bcc1);
        (*blk).bcc2 = fma(vec4<f32>(av.z), bw, (*blk).bcc2);
        (*blk).bcc3 = fma(vec4<f32>(av.w), bw, (*blk).bcc3);
        if (WIDE) {
            (*blk).bcc4 = fma(vec4<f32>(aw.x), bw, (*blk).bcc4);
            (*blk).bcc5 = fma(vec4<f32>(aw.y), bw, (*blk).bcc5);
            (*blk).bcc6 = fma(vec4<f32>(aw.z), bw, (*blk).bcc6);
            (*blk).bcc7 = fma(vec4<f32>(aw.w), bw, (*blk).bcc7);
        }
    }
    if (WIDE) {
        (*blk).acc4 = fma(vec4<f32>(aw.x), bv, (*blk).acc4);
        (*blk).acc5 = fma(vec4<f32>(aw.y), bv, (*blk).acc5);
        (*blk).acc6 = fma(vec4<f32>(aw.z), bv, (*blk).acc6);
        (*blk).acc7 = fma(vec4<f32>(aw.w), bv, (*blk).acc7);
    }
}

// The block into C (or into this split's partials) from its first row m and column n.
fn store_block(blk: Block, m: u32, n: u32, split: u32) {
    store_row(m, n, blk.acc0, split);
    store_row(m + 1u, n, blk.acc1, split);
    store_row(m + 2u, n, blk.acc2, split);
    store_row(m + 3u, n, blk.acc3, split);
    if (WIDE) {
        store_row(m + 64u, n, blk.acc4, split);
        store_row(m + 65u, n, blk.acc5, split);
        store_row(m + 66u, n, blk.acc6, split);
        store_row(m + 67u, n, blk.acc7, split);
    }
    if (WIDE_N) {
        store_row(m, n + 64u, blk.bcc0, split);
        store_row(m + 1u, n + 64u, blk.bcc1, split);
        store_row(m + 2u, n + 64u, blk.bcc2, split);
        store_row(m + 3u, n + 64u, blk.bcc3, split);
        if (WIDE) {
            store_row(m + 64u, n + 64u, blk.bcc4, split);
            store_row(m + 65u, n + 64u, blk.bcc5, split);
            store_row(m + 66u, n + 64u, blk.bcc6, split);
            store_row(m + 67u, n + 64u, blk.bcc7, split);
        }
    }
}

@compute @workgroup_size(16, 16)
fn matmul(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
          @builtin(local_invocation_id) lid: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let tile = workgroup_tile(wg, nwg, WIDE, WIDE_N);
    let row0 = tile.row0;
    let col0 = tile.col0;
    let M4 = tile.m4;
    let N4 = tile.n4;
    let t = thread_coords(lid, li, WARP_8X4);
    var blk: Block;   // zero
    let k_begin = wg.z * params.k_chunk;
    let k_end = min(params.K, k_begin + params.k_chunk);
    // Runs li and li + 256 of each tile (those below RA / RB: BM·BK/4 and BN·BK/4 runs).
    let RA = M4 * BK;   // runs of 4 in the A tile (BM · BK / 4)
    let RB = N4 * BK;
    var pa0 = vec4<f32>(0.0);
    var pa1 = vec4<f32>(0.0);
    var pb0 = vec4<f32>(0.0);
    var pb1 = vec4<f32>(0.0);
    if (PREFETCH || DOUBLE) {
        if (li < RA) { pa0 = load_a(li, row0, k_begin, k_end, M4); }
        if (li + 256u < RA) { pa1 = load_a(li + 256u, row0, k_begin, k_end, M4); }
        if (li < RB) { pb0 = load_b(li, col0, k_begin, k_end, N4); }
        if (li + 256u < RB) { pb1 = load_b(li + 256u, col0, k_begin, k_end, N4); }
    }
    if (DOUBLE) {
        if (li < RA) { store_a(li, pa0, M4, 0u); }
        if (li + 256u < RA) { store_a(li + 256u, pa1, M4, 0u); }
        if (li < RB) { store_b(li, pb0, N4, 0u); }
        if (li + 256u < RB) { store_b(li + 256u, pb1, N4, 0u); }
        workgroupBarrier();
    }
    var stage = 0u;
    for (var k0 = k_begin; k0 < k_end; k0 += BK) {
        let k1 = k0 + BK;
        if (!DOUBLE && !PREFETCH) {
            // Every run straight from global to workgroup memory (BK 32: four of A and B per invocation).
            // (constant trip counts, so the compiler can unroll them and keep every load in flight at once)
            for (var i = 0u; i < (RA + 255u) / 256u; i++) {
                let r = li + i * 256u;
                if (r < RA) { store_a(r, load_a(r, row0, k0, k_end, M4), M4, 0u); }
            }
            for (var i = 0u; i < (RB + 255u) / 256u; i++) {
                let r = li + i * 256u;
                if (r < RB) { store_b(r, load_b(r, col0, k0, k_end, N4), N4, 0u); }
            }
            workgroupBarrier();
        } else if (!DOUBLE) {
            if (li < RA) { store_a(li, pa0, M4, 0u); }
            if (li + 256u < RA) { store_a(li + 256u, pa1, M4, 0u); }
            if (li < RB) { store_b(li, pb0, N4, 0u); }
            if (li + 256u < RB) { store_b(li + 256u, pb1, N4, 0u); }
            workgroupBarrier();
        }
        if ((PREFETCH || DOUBLE) && k1 < k_end) {
            if (li < RA) { pa0 = load_a(li, row0, k1, k_end, M4); }
            if (li + 256u < RA) { pa1 = load_a(li + 256u, row0, k1, k_end, M4); }
            if (li < RB) { pb0 = load_b(li, col0, k1, k_end, N4); }
            if (li + 256u < RB) { pb1 = load_b(li + 256u, col0, k1, k_end, N4); }
        }
        let ab = stage * BK * M4;
        let bb = stage * BK * N4;
        // Fragments of step k: av/aw rows t.y·4.. and 64 + t.y·4.., bv/bw columns t.x·4.. and 64 + ...
        // FRAG reads step k + 1's while step k computes (hides workgroup-memory latency, 16 more registers).
        var av = vec4<f32>(0.0);
        var aw = vec4<f32>(0.0);
        var bv = vec4<f32>(0.0);
        var bw = vec4<f32>(0.0);
        if (FRAG) {
            av = a_tile[ab + t.y];
            bv = b_tile[bb + t.x];
            if (WIDE) { aw = a_tile[ab + 16u + t.y]; }
            if (WIDE_N) { bw = b_tile[bb + 16u + t.x]; }
        }
        // K in runs of at most 16 (a loop of 32 measured like a loop left rolled: bk32's inner loop alone 35.7
        // TFLOP/s against bk16's 47.5 at 128×64, bench/results/matmul-h200-sweep.json diag2 rows).
        for (var ks = 0u; ks < BK; ks += 16u) {
            for (var kk = 0u; kk < min(BK, 16u); kk++) {
                let k = ks + kk;
                let kf = select(k, min(k + 1u, BK - 1u), FRAG);
                let an = a_tile[ab + kf * M4 + t.y];
                let bn = b_tile[bb + kf * N4 + t.x];
                var awn = aw;
                var bwn = bw;
                if (WIDE) { awn = a_tile[ab + kf * M4 + 16u + t.y]; }
                if (WIDE_N) { bwn = b_tile[bb + kf * N4 + 16u + t.x]; }
                if (!FRAG) { av = an; aw = awn; bv = bn; bw = bwn; }
                multiply(&blk, av, aw, bv, bw);
                if (FRAG) { av = an; aw = awn; bv = bn; bw = bwn; }
            }
        }
        if (DOUBLE) {
            // The other stage was last read before the previous barrier: fill it while nobody reads it.
            stage = 1u - stage;
            if (k1 < k_end) {
                if (li < RA) { store_a(li, pa0, M4, stage); }
                if (li + 256u < RA) { store_a(li + 256u, pa1, M4, stage); }
                if (li < RB) { store_b(li, pb0, N4, stage); }
                if (li + 256u < RB) { store_b(li + 256u, pb1, N4, stage); }
            }
        }
        workgroupBarrier();
    }
    let m = row0 + t.y * 4u;
    let n = col0 + t.x * 4u;
    store_block(blk, m, n, wg.z);
}

// Warp-specialized variant (kernels.linear.GemmKernel loaders > 0): 256 invocations compute exactly as `matmul`
// (same tile, same accumulators) while LOADERS more only move operands, a step ahead: while the computing ones
// multiply stage s of workgroup memory, the loaders fill stage 1 − s with the next K step, and one barrier per
// step swaps them. Why: in `matmul` every invocation waits for its own global loads before each step (the
// latency that holds 128×64 at ~30 of the 43 TFLOP/s its loop reaches without them, header); PREFETCH hides it
// in the computing invocations' registers and loses the occupancy that hid it before. Here the loads live in
// the loaders' registers only. BK 16, two stages: TILE_VECS = 2 · 16 · 32.
fn stage_step(loader: u32, row0: u32, col0: u32, k0: u32, k_end: u32, M4: u32, N4: u32, stage: u32) {
    let RA = M4 * BK;
    let RB = N4 * BK;
    // Constant trip counts (RA, RB and LOADERS are constants once the pipeline is built), so the loads of all
    // of a loader's runs can be issued together.
    for (var i = 0u; i < (RA + LOADERS - 1u) / LOADERS; i++) {
        let r = loader + i * LOADERS;
        if (r < RA) { store_a(r, load_a(r, row0, k0, k_end, M4), M4, stage); }
    }
    for (var i = 0u; i < (RB + LOADERS - 1u) / LOADERS; i++) {
        let r = loader + i * LOADERS;
        if (r < RB) { store_b(r, load_b(r, col0, k0, k_end, N4), N4, stage); }
    }
}

@compute @workgroup_size(256 + LOADERS)
fn matmul_specialized(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                      @builtin(local_invocation_index) li: u32) {
    let tile = workgroup_tile(wg, nwg, WIDE, WIDE_N);
    let row0 = tile.row0;
    let col0 = tile.col0;
    let M4 = tile.m4;
    let N4 = tile.n4;
    let computes = li < 256u;
    let loader = li - 256u;   // (loaders only)
    let t = thread_coords(vec3<u32>(li % 16u, li / 16u, 0u), li, WARP_8X4);
    var blk: Block;   // zero
    let k_begin = wg.z * params.k_chunk;
    let k_end = min(params.K, k_begin + params.k_chunk);
    if (!computes) { stage_step(loader, row0, col0, k_begin, k_end, M4, N4, 0u); }
    workgroupBarrier();
    var stage = 0u;
    for (var k0 = k_begin; k0 < k_end; k0 += BK) {
        if (!computes) {
            if (k0 + BK < k_end) { stage_step(loader, row0, col0, k0 + BK, k_end, M4, N4, 1u - stage); }
        } else {
            let ab = stage * BK * M4;
            let bb = stage * BK * N4;
            for (var k = 0u; k < BK; k++) {
                let av = a_tile[ab + k * M4 + t.y];
                let bv = b_tile[bb + k * N4 + t.x];
                var aw = vec4<f32>(0.0);
                var bw = vec4<f32>(0.0);
                if (WIDE) { aw = a_tile[ab + k * M4 + 16u + t.y]; }
                if (WIDE_N) { bw = b_tile[bb + k * N4 + 16u + t.x]; }
                multiply(&blk, av, aw, bv, bw);
            }
        }
        // The loaders' next stage is complete and nobody reads the current one any more: swap.
        workgroupBarrier();
        stage = 1u - stage;
    }
    if (!computes) { return; }
    let m = row0 + t.y * 4u;
    let n = col0 + t.x * 4u;
    store_block(blk, m, n, wg.z);
}

// Split-K's second half: C = alpha · Σ_z partials[z] (+ bias) (+ beta · C).
@compute @workgroup_size(256)
fn matmul_reduce(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = gid.y * params.row_stride + gid.x;
    let mn = params.M * params.N;
    if (i >= mn) { return; }
    var sum = 0.0;
    for (var z = 0u; z < params.splits; z++) { sum += partials[z * mn + i]; }
    let m = i / params.N;
    let n = i % params.N;
    finish(params.c_off + m * params.ldc + n, n, sum);
}
