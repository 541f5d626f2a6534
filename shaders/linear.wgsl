// Linear layers as one tiled GEMM: C[M, N] = alpha · op(A)[M, K] · op(B)[K, N] (+ bias[N]) (+ beta · C).
//
// Every matrix product of the engine is this kernel with a different layout:
//   linear_forward        y  = x · Wᵀ + b        A = x [M, K],  B = W [N, K] read transposed (TRANS_B)
//   linear_backward_input dx = dy · W (+ dx)     A = dy [M, N], B = W [N, K] as stored
//   weight-style grads    dW = dyᵀ · x (+ dW)    A = dy [M, N] read transposed (TRANS_A)  (LoRA dA, dB)
// Strides (lda/ldb/ldc) and element offsets let the chunked LM head address a column range of a wider matrix.
//
// Split-K: a weight-style gradient has a small C ([r, in] for LoRA's dA) and a huge K (B·T), so its few tiles
// would leave most of a GPU idle. With splits > 1, workgroup z covers K range [z·k_chunk, (z+1)·k_chunk) and
// writes its raw partial product into c as partials [splits, M, N]; matmul_reduce then sums the partials into
// the real C with alpha, bias and beta. No atomics, so results are deterministic.
//
// Tiling: a 16×16 workgroup computes a 64×64 tile of C, each invocation a 4×4 block held in four vec4
// accumulators (never a runtime-indexed private array: measured 50× slower on NVIDIA). K advances in steps of
// 16 through workgroup memory. Edges are zero-padded on load and masked on store, so no size needs to be a
// multiple of anything.
struct Params {
    M: u32, N: u32, K: u32, lda: u32,
    ldb: u32, ldc: u32, a_off: u32, b_off: u32,
    c_off: u32, has_bias: u32, k_chunk: u32, splits: u32,
    row_stride: u32, alpha: f32, beta: f32, _pad0: u32,
}

override TRANS_A: bool = false;   // A stored [K, M] instead of [M, K]
override TRANS_B: bool = false;   // B stored [N, K] instead of [K, N]

@group(0) @binding(0) var<storage, read_write> c: array<f32>;
@group(0) @binding(1) var<storage, read> a: array<f32>;
@group(0) @binding(2) var<storage, read> b: array<f32>;
@group(0) @binding(3) var<storage, read> bias: array<f32>;
@group(0) @binding(4) var<uniform> params: Params;

const BM: u32 = 64u;
const BN: u32 = 64u;
const BK: u32 = 16u;

var<workgroup> a_tile: array<f32, 1024>;  // [BK][BM]
var<workgroup> b_tile: array<f32, 1024>;  // [BK][BN]

fn load_a(m: u32, k: u32, k_end: u32) -> f32 {
    if (m >= params.M || k >= k_end) { return 0.0; }
    if (TRANS_A) { return a[params.a_off + k * params.lda + m]; }
    return a[params.a_off + m * params.lda + k];
}

fn load_b(k: u32, n: u32, k_end: u32) -> f32 {
    if (k >= k_end || n >= params.N) { return 0.0; }
    if (TRANS_B) { return b[params.b_off + n * params.ldb + k]; }
    return b[params.b_off + k * params.ldb + n];
}

fn finish(idx: u32, n: u32, sum: f32) {
    var r = params.alpha * sum;
    if (params.has_bias != 0u) { r += bias[n]; }
    if (params.beta != 0.0) { r += params.beta * c[idx]; }
    c[idx] = r;
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

@compute @workgroup_size(16, 16)
fn matmul(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>,
          @builtin(local_invocation_index) li: u32) {
    let row0 = wg.y * BM;
    let col0 = wg.x * BN;
    var acc0 = vec4<f32>(0.0);
    var acc1 = vec4<f32>(0.0);
    var acc2 = vec4<f32>(0.0);
    var acc3 = vec4<f32>(0.0);
    let k_begin = wg.z * params.k_chunk;
    let k_end = min(params.K, k_begin + params.k_chunk);
    for (var k0 = k_begin; k0 < k_end; k0 += BK) {
        // 1024 values per tile, 256 invocations: four each, walking the stored layout's fast axis so that
        // neighbouring invocations read neighbouring addresses.
        for (var i = 0u; i < 4u; i++) {
            let e = li + i * 256u;
            var kk: u32; var mm: u32;
            if (TRANS_A) { kk = e / BM; mm = e % BM; } else { mm = e / BK; kk = e % BK; }
            a_tile[kk * BM + mm] = load_a(row0 + mm, k0 + kk, k_end);
            var kb: u32; var nn: u32;
            if (TRANS_B) { nn = e / BK; kb = e % BK; } else { kb = e / BN; nn = e % BN; }
            b_tile[kb * BN + nn] = load_b(k0 + kb, col0 + nn, k_end);
        }
        workgroupBarrier();
        for (var kk = 0u; kk < BK; kk++) {
            let bo = kk * BN + lid.x * 4u;
            let bv = vec4<f32>(b_tile[bo], b_tile[bo + 1u], b_tile[bo + 2u], b_tile[bo + 3u]);
            let ao = kk * BM + lid.y * 4u;
            acc0 += a_tile[ao] * bv;
            acc1 += a_tile[ao + 1u] * bv;
            acc2 += a_tile[ao + 2u] * bv;
            acc3 += a_tile[ao + 3u] * bv;
        }
        workgroupBarrier();
    }
    let m = row0 + lid.y * 4u;
    let n = col0 + lid.x * 4u;
    store_row(m, n, acc0, wg.z);
    store_row(m + 1u, n, acc1, wg.z);
    store_row(m + 2u, n, acc2, wg.z);
    store_row(m + 3u, n, acc3, wg.z);
}

// Split-K's second half: C = alpha · Σ_z partials[z] (+ bias) (+ beta · C); partials are bound as `a`.
@compute @workgroup_size(256)
fn matmul_reduce(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = gid.y * params.row_stride + gid.x;
    let mn = params.M * params.N;
    if (i >= mn) { return; }
    var sum = 0.0;
    for (var z = 0u; z < params.splits; z++) { sum += a[z * mn + i]; }
    let m = i / params.N;
    let n = i % params.N;
    finish(params.c_off + m * params.ldc + n, n, sum);
}
