enable f16;
// Half-precision-math GEMM for the frozen-weight products: C[M, N] = alpha · A[M, K] · op(B)[K, N] (+ bias)
// (+ beta · C), with A f32 activations and B a frozen weight held f16 or bf16.
//   forward          y  = x · Wᵀ     A = x [M, K],  B = W [N, K] read transposed (TRANS_B)
//   input gradient   dx = dy · W     A = dy [M, N], B = W [N, K] as stored
// The f32 GEMM (linear.wgsl) stays the reference and computes every other product (LoRA and its gradients).
// A second file because `enable f16;` must open a module and cannot depend on an override constant; the adapter
// needs "shader-f16" (GpuContext.has_f16); with math f16 the projections (LinearF16) and the LM head use this
// family only where engine.backends.wgpu.kernels.linear_f16.f16_math_ok says the weight fits (docstring there).
//
// Numerics. Per run of F16_RUN = 16 k (a workgroup-memory step of BK = 16 or 32 holds one or two) each
// invocation multiplies f16 operands with vec4<f16> FMAs (packed two per instruction where the GPU has it) into
// f16 partial sums, and adds those into f32 accumulators at the end of the run: f16 rounding only within 16
// products, f32 across K. Every row of A is scaled by a power of two
// (row_scale, computed by the `row_scale` entry point over the whole row) so that its largest |value| lies in
// [128, 256): small gradients do not underflow f16 and large activations do not overflow it; the f32 result
// is multiplied back by the exact inverse. With |w| <= F16_WEIGHT_LIMIT (15) a step's partial sum stays below
// 16 · 256 · 15 = 61440 < 65504 (f16's largest finite value), so nothing overflows silently.
//
// Tiling as linear.wgsl's default (its header has the measurements): 16×16 invocations, a 64×64 tile of C
// (WIDE 128 rows, WIDE_N 128 columns), each invocation a 4×4 block (8×8 at 128×128) in vec4 accumulators,
// never a runtime-indexed array. Workgroup memory holds a_tile [BK][BM] and b_tile [BK][BN] as vec4<f16>:
// half the bytes of the f32 tiles, per k one 8-byte fragment of A rows and one of B columns per invocation.
// Split-K as linear.wgsl: with splits > 1, c is the partials scratch and linear.wgsl's matmul_reduce finishes.
//
// Measured on lavapipe (tests/backends/wgpu/kernels/test_linear_f16.py, bench/matmul.py --quick): RMS error
// 6.6-7.1e-4 of the RMS of C against the float64 product of the held weights, for A at unit scale and at 1e-6
// (f16 and bf16 weights, K 576-2048); the f32 GEMM's is ~3e-7, and rounding the weights to bf16 alone moves C by
// 1.8e-3. Speed on one NVIDIA H200 (Vulkan, bench/matmul.py, bench/results/matmul-h200-f16math.json, its
// row-scale pass included): 23.5 TFLOP/s at 4096³ NT against 21.1 for the f32 GEMM (torch fp32 50), 17.6 against
// 14.9 at 512×3072×1024; median 0.44× torch fp32 over the training-shape products (f32 GEMM 0.37×), both with
// naga's runtime checks. Without them, every variant × tile timed after all were compiled (bench/matmul.py
// --sweep 6, bench/results/matmul-h200-sweep.json, bf16 weights): BK 32 (kernels.linear_f16.F16_DEFAULT_KERNEL)
// 29.8 at 4096³ (128×128), 31.6 at 4096×8192×2048 (128×64), 26.8 at 4096×1024×1024, 23.4 at 512×3072×1024
// (64×64); BK 16 2-6% slower at four of six shapes, 1-3% faster at two; WARP_8X4 +-2%. The f32 GEMM reaches
// 27.5 / 30.6 / 25.6 / 20.8 at the same shapes: half-precision FMAs gain only 3-12%, because what limits both
// is the latency of the global loads of each K step (linear.wgsl's header), not the arithmetic.
#include "gemm_common.wgsl"

override TRANS_B: bool = false;   // B stored [N, K] instead of [K, N]
override WIDE: bool = false;      // 128-row tiles (8 rows per invocation)
override WIDE_N: bool = false;    // 128-column tiles (8 columns per invocation)
override VEC_A: bool = false;     // lda and a_off are multiples of 4: one vec4 load per run of A
override VEC_B: bool = false;     // ldb and b_off are multiples of 4: one 8-byte load per run of B
override B_BF16: bool = false;    // B held bf16 (else f16), two per u32, element 2i in the low half
override GROUP_M: u32 = 8u;       // tile rows per group of the workgroup order (L2 reuse)
override BK: u32 = 16u;           // K step through workgroup memory: 16 or 32
override WARP_8X4: bool = false;  // a warp covers 8 × 4 invocations of the 16 × 16 (gemm_common thread_coords)
const F16_RUN: u32 = 16u;         // products summed in f16 before they are added into the f32 accumulators
const A_EXP: i32 = 8;             // rows of A scaled to a largest |value| in [2^(A_EXP-1), 2^A_EXP)

@group(0) @binding(0) var<storage, read_write> c: array<f32>;
@group(0) @binding(1) var<storage, read> a: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> b: array<vec2<u32>>;
@group(0) @binding(3) var<storage, read> bias: array<f32>;
@group(0) @binding(4) var<uniform> params: Params;
@group(0) @binding(5) var<storage, read_write> row_scale: array<f32>;   // [M] power-of-two scale of A's rows

var<workgroup> a_tile: array<vec4<f16>, BK * 32u>;  // [BK][BM/4]
var<workgroup> b_tile: array<vec4<f16>, BK * 32u>;  // [BK][BN/4]
var<workgroup> row_max: array<f32, 256>;

// Element `e` of stored B as f16: an f16 through unpack2x16float (naga 0.32 rejects indexing
// bitcast<vec2<f16>>(u32): "Invalid access"), a bf16 through f32 (its range checked on the host).
fn b_half(e: u32) -> f16 {
    let w = b[e >> 2u][(e >> 1u) & 1u];
    let high = (e & 1u) == 1u;
    if (B_BF16) { return f16(bitcast<f32>(select(w << 16u, w & 0xffff0000u, high))); }
    return f16(unpack2x16float(w)[u32(high)]);
}

fn bf16_pair(w: u32) -> vec2<f32> {
    return vec2<f32>(bitcast<f32>(w << 16u), bitcast<f32>(w & 0xffff0000u));
}

// 4 elements of stored B row `row` from column `col` (stored [K, N], or [N, K] with TRANS_B); 0 outside.
fn b_run(row: u32, col: u32, row_end: u32, col_end: u32) -> vec4<f16> {
    if (row >= row_end || col >= col_end) { return vec4<f16>(0.0h); }
    let e = params.b_off + row * params.ldb + col;
    var v: vec4<f16>;
    if (VEC_B) {
        let q = b[e >> 2u];
        if (B_BF16) {
            v = vec4<f16>(vec4<f32>(bf16_pair(q.x), bf16_pair(q.y)));
        } else {
            v = vec4<f16>(vec4<f32>(unpack2x16float(q.x), unpack2x16float(q.y)));
        }
    } else {
        let last = e + col_end - col - 1u;
        v = vec4<f16>(b_half(e), b_half(min(e + 1u, last)), b_half(min(e + 2u, last)), b_half(min(e + 3u, last)));
    }
    if (col + 3u < col_end) { return v; }
    return select(vec4<f16>(0.0h), v, run_mask(col, col_end));
}

// Run r of the A tile at (row0, k0): 4 k of one row, scaled by its row_scale and rounded to f16, scattered
// into 4 k-rows of a_tile (the 32 lanes of a warp on 32 consecutive rows).
fn stage_a(r: u32, row0: u32, k0: u32, k_end: u32, M4: u32) {
    let BM = M4 * 4u;
    let m = r % BM;
    let row = row0 + m;
    var v = vec4<f16>(0.0h);
    if (row < params.M) { v = vec4<f16>(a_run(row, k0 + (r / BM) * 4u, params.M, k_end) * row_scale[row]); }
    let k = (r / BM) * 4u;
    a_tile[k * M4 + m / 4u][m % 4u] = v.x;
    a_tile[(k + 1u) * M4 + m / 4u][m % 4u] = v.y;
    a_tile[(k + 2u) * M4 + m / 4u][m % 4u] = v.z;
    a_tile[(k + 3u) * M4 + m / 4u][m % 4u] = v.w;
}

fn stage_b(r: u32, col0: u32, k0: u32, k_end: u32, N4: u32) {
    if (!TRANS_B) {
        b_tile[r] = b_run(k0 + r / N4, col0 + (r % N4) * 4u, k_end, params.N);
        return;
    }
    let BN = N4 * 4u;
    let n = r % BN;
    let k = (r / BN) * 4u;
    let v = b_run(col0 + n, k0 + k, params.N, k_end);
    b_tile[k * N4 + n / 4u][n % 4u] = v.x;
    b_tile[(k + 1u) * N4 + n / 4u][n % 4u] = v.y;
    b_tile[(k + 2u) * N4 + n / 4u][n % 4u] = v.z;
    b_tile[(k + 3u) * N4 + n / 4u][n % 4u] = v.w;
}

// Row m of the block, its A scale undone (exact: a power of two); a split writes its raw partial.
fn store_row(m: u32, n0: u32, acc: vec4<f32>, split: u32) {
    if (m >= params.M) { return; }
    let v = acc * (1.0 / row_scale[m]);
    for (var j = 0u; j < 4u; j++) {
        let n = n0 + j;
        if (n < params.N && params.splits > 1u) {
            c[(split * params.M + m) * params.N + n] = v[j];
        } else if (n < params.N) {
            finish(params.c_off + m * params.ldc + n, n, v[j]);
        }
    }
}

// row_scale[m] = 2^(A_EXP - e) where 2^(e-1) <= max_k |A[m, k]| < 2^e (frexp; an all-zero row gets 2^A_EXP,
// harmless), clamped to f32's normal powers of two. One workgroup per row, rows folded over x and y.
@compute @workgroup_size(256)
fn row_scales(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
              @builtin(local_invocation_index) li: u32) {
    let m = wg.y * nwg.x + wg.x;
    var biggest = 0.0;
    if (m < params.M) {
        let row = params.a_off + m * params.lda;
        for (var k = li; k < params.K; k += 256u) { biggest = max(biggest, abs(a_elem(row + k))); }
    }
    row_max[li] = biggest;
    workgroupBarrier();
    for (var half = 128u; half > 0u; half >>= 1u) {
        if (li < half) { row_max[li] = max(row_max[li], row_max[li + half]); }
        workgroupBarrier();
    }
    if (li == 0u && m < params.M) {
        let e = frexp(row_max[0]).exp;
        row_scale[m] = ldexp(1.0, clamp(A_EXP - e, -126, 126));
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
    // f32 accumulators across K, as linear.wgsl: acc columns lid.x·4.., bcc columns 64 + lid.x·4..; 0-3 rows
    // lid.y·4.., 4-7 rows 64 + lid.y·4.. .
    var acc0 = vec4<f32>(0.0);
    var acc1 = vec4<f32>(0.0);
    var acc2 = vec4<f32>(0.0);
    var acc3 = vec4<f32>(0.0);
    var acc4 = vec4<f32>(0.0);
    var acc5 = vec4<f32>(0.0);
    var acc6 = vec4<f32>(0.0);
    var acc7 = vec4<f32>(0.0);
    var bcc0 = vec4<f32>(0.0);
    var bcc1 = vec4<f32>(0.0);
    var bcc2 = vec4<f32>(0.0);
    var bcc3 = vec4<f32>(0.0);
    var bcc4 = vec4<f32>(0.0);
    var bcc5 = vec4<f32>(0.0);
    var bcc6 = vec4<f32>(0.0);
    var bcc7 = vec4<f32>(0.0);
    let k_begin = wg.z * params.k_chunk;
    let k_end = min(params.K, k_begin + params.k_chunk);
    let RA = M4 * BK;   // runs of 4 in the A tile (BM · BK / 4)
    let RB = N4 * BK;
    for (var k0 = k_begin; k0 < k_end; k0 += BK) {
        for (var r = li; r < RA; r += 256u) { stage_a(r, row0, k0, k_end, M4); }
        for (var r = li; r < RB; r += 256u) { stage_b(r, col0, k0, k_end, N4); }
        workgroupBarrier();
        for (var ks = 0u; ks < BK; ks += F16_RUN) {
            // This run's f16 partial sums (h*: acc*, g*: bcc*).
            var h0 = vec4<f16>(0.0h);
            var h1 = vec4<f16>(0.0h);
            var h2 = vec4<f16>(0.0h);
            var h3 = vec4<f16>(0.0h);
            var h4 = vec4<f16>(0.0h);
            var h5 = vec4<f16>(0.0h);
            var h6 = vec4<f16>(0.0h);
            var h7 = vec4<f16>(0.0h);
            var g0 = vec4<f16>(0.0h);
            var g1 = vec4<f16>(0.0h);
            var g2 = vec4<f16>(0.0h);
            var g3 = vec4<f16>(0.0h);
            var g4 = vec4<f16>(0.0h);
            var g5 = vec4<f16>(0.0h);
            var g6 = vec4<f16>(0.0h);
            var g7 = vec4<f16>(0.0h);
            for (var k = ks; k < ks + F16_RUN; k++) {
                let av = a_tile[k * M4 + t.y];
                let bv = b_tile[k * N4 + t.x];
                h0 = fma(vec4<f16>(av.x), bv, h0);
                h1 = fma(vec4<f16>(av.y), bv, h1);
                h2 = fma(vec4<f16>(av.z), bv, h2);
                h3 = fma(vec4<f16>(av.w), bv, h3);
                if (WIDE) {
                    let aw = a_tile[k * M4 + 16u + t.y];
                    h4 = fma(vec4<f16>(aw.x), bv, h4);
                    h5 = fma(vec4<f16>(aw.y), bv, h5);
                    h6 = fma(vec4<f16>(aw.z), bv, h6);
                    h7 = fma(vec4<f16>(aw.w), bv, h7);
                    if (WIDE_N) {
                        let bw = b_tile[k * N4 + 16u + t.x];
                        g4 = fma(vec4<f16>(aw.x), bw, g4);
                        g5 = fma(vec4<f16>(aw.y), bw, g5);
                        g6 = fma(vec4<f16>(aw.z), bw, g6);
                        g7 = fma(vec4<f16>(aw.w), bw, g7);
                    }
                }
                if (WIDE_N) {
                    let bw = b_tile[k * N4 + 16u + t.x];
                    g0 = fma(vec4<f16>(av.x), bw, g0);
                    g1 = fma(vec4<f16>(av.y), bw, g1);
                    g2 = fma(vec4<f16>(av.z), bw, g2);
                    g3 = fma(vec4<f16>(av.w), bw, g3);
                }
            }
            acc0 += vec4<f32>(h0);
            acc1 += vec4<f32>(h1);
            acc2 += vec4<f32>(h2);
            acc3 += vec4<f32>(h3);
            if (WIDE) {
                acc4 += vec4<f32>(h4);
                acc5 += vec4<f32>(h5);
                acc6 += vec4<f32>(h6);
                acc7 += vec4<f32>(h7);
            }
            if (WIDE_N) {
                bcc0 += vec4<f32>(g0);
                bcc1 += vec4<f32>(g1);
                bcc2 += vec4<f32>(g2);
                bcc3 += vec4<f32>(g3);
                if (WIDE) {
                    bcc4 += vec4<f32>(g4);
                    bcc5 += vec4<f32>(g5);
                    bcc6 += vec4<f32>(g6);
                    bcc7 += vec4<f32>(g7);
                }
            }
        }
        workgroupBarrier();
    }
    let m = row0 + t.y * 4u;
    let n = col0 + t.x * 4u;
    store_row(m, n, acc0, wg.z);
    store_row(m + 1u, n, acc1, wg.z);
    store_row(m + 2u, n, acc2, wg.z);
    store_row(m + 3u, n, acc3, wg.z);
    if (WIDE) {
        store_row(m + 64u, n, acc4, wg.z);
        store_row(m + 65u, n, acc5, wg.z);
        store_row(m + 66u, n, acc6, wg.z);
        store_row(m + 67u, n, acc7, wg.z);
    }
    if (WIDE_N) {
        store_row(m, n + 64u, bcc0, wg.z);
        store_row(m + 1u, n + 64u, bcc1, wg.z);
        store_row(m + 2u, n + 64u, bcc2, wg.z);
        store_row(m + 3u, n + 64u, bcc3, wg.z);
        if (WIDE) {
            store_row(m + 64u, n + 64u, bcc4, wg.z);
            store_row(m + 65u, n + 64u, bcc5, wg.z);
            store_row(m + 66u, n + 64u, bcc6, wg.z);
            store_row(m + 67u, n + 64u, bcc7, wg.z);
        }
    }
}
