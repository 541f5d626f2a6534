// What both GEMM families (linear.wgsl, f32 math; linear_f16.wgsl, f16 math) share, in one place: the uniform
// (one struct, so linear.wgsl's matmul_reduce finishes a split-K product of either family from the same params
// buffer), the workgroup order, the load of A (f32 activations in both) and the epilogue's arithmetic. The
// including file declares what these read: the bindings a (array<vec4<f32>>), c, bias and params, and the
// overrides VEC_A and GROUP_M.
struct Params {
    M: u32, N: u32, K: u32, lda: u32,
    ldb: u32, ldc: u32, a_off: u32, b_off: u32,
    c_off: u32, has_bias: u32, k_chunk: u32, splits: u32,
    row_stride: u32, alpha: f32, beta: f32, b_row_blocks: u32,
}

// This workgroup's tile of C: its origin and the vec4s per k-row of its A rows (m4 = BM / 4) and B columns.
struct Tile { row0: u32, col0: u32, m4: u32, n4: u32 }

fn workgroup_tile(wg: vec3<u32>, nwg: vec3<u32>, wide: bool, wide_n: bool) -> Tile {
    let BM = select(64u, 128u, wide);
    let BN = select(64u, 128u, wide_n);
    let origin = tile_origin(wg, nwg, BM, BN);
    return Tile(origin.x, origin.y, BM / 4u, BN / 4u);
}

// Origin (row0, col0) of this workgroup's BM × BN tile of C in the grouped order: consecutive workgroups walk
// GROUP_M tile rows down one tile column, then the next column, so the workgroups resident together share A rows
// and B columns in L2.
fn tile_origin(wg: vec3<u32>, nwg: vec3<u32>, BM: u32, BN: u32) -> vec2<u32> {
    let tiles_n = nwg.x;
    let tiles_m = nwg.y;
    let pid = wg.y * tiles_n + wg.x;
    let group_size = GROUP_M * tiles_n;
    let first_m = (pid / group_size) * GROUP_M;
    let rows_in_group = min(tiles_m - first_m, GROUP_M);
    return vec2<u32>((first_m + (pid % group_size) % rows_in_group) * BM, ((pid % group_size) / rows_in_group) * BN);
}

// The invocation's (column, row) block of the 16 × 16 in the tile. Plain: lid, so a warp (32 consecutive
// invocations) is 16 columns × 2 rows and reads 16 distinct B fragments per k (two shared-memory wavefronts).
// warp_8x4: a warp is 8 columns × 4 rows (one wavefront for A's 4 fragments and one for B's 8).
fn thread_coords(lid: vec3<u32>, li: u32, warp_8x4: bool) -> vec2<u32> {
    if (!warp_8x4) { return lid.xy; }
    return vec2<u32>((li & 7u) | (((li >> 5u) & 1u) << 3u), ((li >> 3u) & 3u) | ((li >> 6u) << 2u));
}

// Lanes j of a run starting at column `col` that lie before `col_end`, for masking a run at the edge.
fn run_mask(col: u32, col_end: u32) -> vec4<bool> {
    return vec4<u32>(col) + vec4<u32>(0u, 1u, 2u, 3u) < vec4<u32>(col_end);
}

fn a_elem(e: u32) -> f32 {
    return a[e >> 2u][e & 3u];
}

// 4 elements of stored A row `row` from column `col` (stored [M, K], or [K, M] with TRANS_A); 0 outside. Lanes
// past the row's end are clamped to its last element, so no lane reads past it, then masked.
fn a_run(row: u32, col: u32, row_end: u32, col_end: u32) -> vec4<f32> {
    if (row >= row_end || col >= col_end) { return vec4<f32>(0.0); }
    let e = params.a_off + row * params.lda + col;
    var v: vec4<f32>;
    if (VEC_A) {
        v = a[e >> 2u];
    } else {
        let last = e + col_end - col - 1u;
        v = vec4<f32>(a_elem(e), a_elem(min(e + 1u, last)), a_elem(min(e + 2u, last)), a_elem(min(e + 3u, last)));
    }
    if (col + 3u < col_end) { return v; }
    return select(vec4<f32>(0.0), v, run_mask(col, col_end));
}

// C[idx] (column n) = alpha · sum (+ bias[n]) (+ beta · C[idx]).
fn finish(idx: u32, n: u32, sum: f32) {
    var r = params.alpha * sum;
    if (params.has_bias != 0u) { r += bias[n]; }
    if (params.beta != 0.0) { r += params.beta * c[idx]; }
    c[idx] = r;
}
