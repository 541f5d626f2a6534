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
// projections have few rows, so their few tiles would leave most of a GPU idle. With splits > 1, workgroup z covers K range [z·k_chunk, (z+1)·k_chunk) and
// writes its raw partial product into c as partials [splits, M, N]; matmul_reduce then sums the partials into
// the real C with alpha, bias and beta. No atomics, so results are deterministic.
//
// Tiling: a 16×16 workgroup computes a 64×64 tile of C, each invocation a 4×4 block held in four vec4
// accumulators (never a runtime-indexed private array: measured 50× slower on NVIDIA); WIDE doubles the tile's
// rows (the invocation also takes rows 64 + lid.y·4..), WIDE_N its columns (columns 64 + lid.x·4..), up to a
// 128×128 tile with an 8×8 block in sixteen vec4s, for large products. K advances in steps of
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
override WIDE: bool = false;      // 128-row tiles (8 rows per invocation): more FMAs per load, fewer tiles
override WIDE_N: bool = false;    // 128-column tiles (8 columns per invocation)

@group(0) @binding(0) var<storage, read_write> c: array<f32>;
@group(0) @binding(1) var<storage, read> a: array<f32>;
@group(0) @binding(2) var<storage, read> b: array<f32>;
@group(0) @binding(3) var<storage, read> bias: array<f32>;
@group(0) @binding(4) var<uniform> params: Params;

const BK: u32 = 16u;

// Tiles hold vec4s along M (a) and N (b), so the inner loop reads one vec4 of each per k: 2 loads, 16 FMAs.
// 16 KiB together at the widest (WebGPU's portable workgroup-memory minimum).
var<workgroup> a_tile: array<vec4<f32>, 512>;  // [BK][BM/4]
var<workgroup> b_tile: array<vec4<f32>, 512>;  // [BK][BN/4]

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
    let BM = select(64u, 128u, WIDE);     // rows of the tile
    let BN = select(64u, 128u, WIDE_N);   // columns of the tile
    let M4 = BM / 4u;                     // vec4s per k-row of a_tile
    let N4 = BN / 4u;                     // vec4s per k-row of b_tile
    let row0 = wg.y * BM;
    let col0 = wg.x * BN;
    // acc: columns lid.x·4.., bcc: columns 64 + lid.x·4.. (WIDE_N); 0-3 rows lid.y·4.., 4-7 rows 64 + .. (WIDE).
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
    for (var k0 = k_begin; k0 < k_end; k0 += BK) {
        // Each invocation fills vec4s of the tiles (4 values along M or N at one k), choosing which so that
        // neighbouring invocations read neighbouring addresses of the stored layout.
        for (var idx = li; idx < BK * M4; idx += 256u) {
            var kk: u32; var m4: u32;
            if (TRANS_A) { m4 = idx % M4; kk = idx / M4; } else { kk = idx % BK; m4 = idx / BK; }
            let am = row0 + m4 * 4u;
            a_tile[kk * M4 + m4] = vec4<f32>(load_a(am, k0 + kk, k_end), load_a(am + 1u, k0 + kk, k_end),
                                             load_a(am + 2u, k0 + kk, k_end), load_a(am + 3u, k0 + kk, k_end));
        }
        for (var idx = li; idx < BK * N4; idx += 256u) {
            var kb: u32; var n4: u32;
            if (TRANS_B) { kb = idx % BK; n4 = idx / BK; } else { n4 = idx % N4; kb = idx / N4; }
            let bn = col0 + n4 * 4u;
            b_tile[kb * N4 + n4] = vec4<f32>(load_b(k0 + kb, bn, k_end), load_b(k0 + kb, bn + 1u, k_end),
                                             load_b(k0 + kb, bn + 2u, k_end), load_b(k0 + kb, bn + 3u, k_end));
        }
        workgroupBarrier();
        for (var k = 0u; k < BK; k++) {
            let bv = b_tile[k * N4 + lid.x];
            let av = a_tile[k * M4 + lid.y];
            acc0 += av.x * bv;
            acc1 += av.y * bv;
            acc2 += av.z * bv;
            acc3 += av.w * bv;
            if (WIDE_N) {
                let bw = b_tile[k * N4 + 16u + lid.x];
                bcc0 += av.x * bw;
                bcc1 += av.y * bw;
                bcc2 += av.z * bw;
                bcc3 += av.w * bw;
                if (WIDE) {
                    let aw = a_tile[k * M4 + 16u + lid.y];
                    bcc4 += aw.x * bw;
                    bcc5 += aw.y * bw;
                    bcc6 += aw.z * bw;
                    bcc7 += aw.w * bw;
                }
            }
            if (WIDE) {
                let aw = a_tile[k * M4 + 16u + lid.y];
                acc4 += aw.x * bv;
                acc5 += aw.y * bv;
                acc6 += aw.z * bv;
                acc7 += aw.w * bv;
            }
        }
        workgroupBarrier();
    }
    let m = row0 + lid.y * 4u;
    let n = col0 + lid.x * 4u;
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
