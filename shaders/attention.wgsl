// Causal multi-head attention with grouped KV heads, flash-attention style (online softmax, tiles in
// workgroup memory, the [T, T] score matrix never stored).
//   q, out, dout, dq: [B, T, NH, HD]    k, v, dk, dv: [B, T, NKV, HD]    lse, dsum: [B, NH, T]
// Query head h reads KV head h / (NH / NKV). Scores are scaled by params.scale (1/sqrt(HD), or Gemma's
// query_pre_attn_scalar^-1/2).
// Sliding window (WINDOW > 0, Mistral / Qwen2 / Gemma 3 sliding layers): query t sees the keys
// t − WINDOW < kv <= t, transformers' sliding_window_overlay on the causal mask. WINDOW is an override constant,
// so the plain causal layers (WINDOW 0) compile without the window's checks and tile bounds.
// Soft-capping (SOFTCAP > 0, Gemma 2's attn_logit_softcapping): the scaled score s becomes SOFTCAP·tanh(s / SOFTCAP)
// before the mask and softmax; the backward multiplies dS by its derivative 1 − tanh², kept in `slope`.
//
// Work split (forward, dq and dk/dv kernels share it): a workgroup owns ROWS rows (query rows, or key rows in
// the dk/dv kernels) of one head; TPR threads share a row, each holding up to 4 vec4 chunks of it in registers
// (chunks c, c + TPR, c + 2 TPR, c + 3 TPR of the HD/4 chunks, so HD <= 256). The other operand streams
// through workgroup memory BT rows at a time. A dot product between a register row and a tile row is summed
// in two steps: each thread's partial over its chunks goes to `red`, then one thread per (row, tile row) adds
// the TPR partials in a fixed order (deterministic, no atomics).
// Accumulators are vec4 variables, never runtime-indexed private arrays (slow on NVIDIA).
// Workgroup memory is BT * (32 HD4 + 4 ROWS (TPR + 1) + 8) bytes, plus 4 ROWS BT for `slope` with SOFTCAP; the twin (engine/backends/wgpu/kernels/attention.py)
// picks ROWS, BT from measurements and the adapter's limit.
struct Params {
    batch: u32,
    seq_len: u32,    // T
    n_heads: u32,    // NH
    n_kv: u32,       // NKV
    ratio: u32,      // NH / NKV
    scale: f32,      // 1 / sqrt(HD) unless the model says otherwise
    dsum_stride: u32,  // invocations per dispatch row of attention_backward_dsum (grid folded into y)
    sum_stride: u32,   // the same for attention_backward_dkdv_sum
}

override ROWS: u32 = 16u;       // register rows per workgroup
override HD4: u32 = 16u;        // head_dim / 4
override TPR: u32 = 4u;         // threads per row: ceil(HD4 / 4)
override BT: u32 = 6u;          // rows per tile loaded into workgroup memory
override WG: u32 = 64u;         // ROWS * TPR
override WINDOW: u32 = 0u;      // sliding window in keys; 0: none (plain causal). The twin keeps it < T.
override SOFTCAP: f32 = 0.0;    // attention-logit soft-capping; 0: none
override SLOPES: u32 = 1u;      // ROWS * BT with SOFTCAP (slope's size), else 1: no workgroup memory spent on it

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> q: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> k: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read> v: array<vec4<f32>>;
@group(0) @binding(4) var<storage, read_write> out: array<vec4<f32>>;
@group(0) @binding(5) var<storage, read_write> lse: array<f32>;
@group(0) @binding(6) var<storage, read> dout: array<vec4<f32>>;
@group(0) @binding(7) var<storage, read_write> dsum: array<f32>;     // D = rowsum(dout * out)
@group(0) @binding(8) var<storage, read_write> dq: array<vec4<f32>>;
@group(0) @binding(9) var<storage, read_write> dk: array<vec4<f32>>;
@group(0) @binding(10) var<storage, read_write> dv: array<vec4<f32>>;
@group(0) @binding(11) var<storage, read_write> dk_heads: array<vec4<f32>>;  // [B, T, NH, HD] per query head
@group(0) @binding(12) var<storage, read_write> dv_heads: array<vec4<f32>>;  // (GQA only; summed into dk, dv)

var<workgroup> tile_a: array<vec4<f32>, BT * HD4>;      // K (forward, dq) or Q (dkdv) rows
var<workgroup> tile_b: array<vec4<f32>, BT * HD4>;      // V (forward, dq) or dO (dkdv) rows
var<workgroup> red: array<f32, ROWS * BT * TPR>;        // partial dot products
var<workgroup> prob: array<f32, ROWS * BT>;             // scores, then P, then dS
var<workgroup> slope: array<f32, SLOPES>;               // d(capped score)/d(score) (dkdv, with SOFTCAP)
var<workgroup> tile_lse: array<f32, BT>;                // lse of the tile's query rows (dkdv)
var<workgroup> tile_d: array<f32, BT>;                  // D of the tile's query rows (dkdv)

// Row `t` of head `head` in a [B, T, heads, HD] tensor, as a vec4 index of chunk 0.
fn row_base(b: u32, t: u32, head: u32, heads: u32) -> u32 {
    return ((b * params.seq_len + t) * heads + head) * HD4;
}

// The first key query t sees: 0 without a window, t + 1 − WINDOW with one.
fn first_key(t: u32) -> u32 {
    if (WINDOW == 0u || t < WINDOW) { return 0u; }
    return t + 1u - WINDOW;
}

// The soft-capped score, and its derivative from the capped value c: 1 − tanh² = 1 − (c / SOFTCAP)². tanh's
// argument is clamped where tanh is 1 in f32 already, so no implementation overflows inside it.
fn capped(s: f32) -> f32 {
    if (SOFTCAP == 0.0) { return s; }
    return SOFTCAP * tanh(clamp(s / SOFTCAP, -15.0, 15.0));
}

fn cap_slope(c: f32) -> f32 {
    if (SOFTCAP == 0.0) { return 1.0; }
    let t = c / SOFTCAP;
    return 1.0 - t * t;
}

// Clamped chunk index: a thread's chunks past HD4 hold zeros in registers, so any finite tile value will do.
fn chunk(c: u32, i: u32) -> u32 {
    return min(c + i * TPR, HD4 - 1u);
}

fn chunk_ok(c: u32, i: u32) -> bool {
    return c + i * TPR < HD4;
}

// Chunks (c + i*TPR) of a tensor row as four vec4 registers, zero past HD4.
struct Row4 { x0: vec4<f32>, x1: vec4<f32>, x2: vec4<f32>, x3: vec4<f32> }

fn zero_row() -> Row4 {
    return Row4(vec4<f32>(0.0), vec4<f32>(0.0), vec4<f32>(0.0), vec4<f32>(0.0));
}

fn load_q(base: u32, c: u32) -> Row4 {
    var r = zero_row();
    if (chunk_ok(c, 0u)) { r.x0 = q[base + chunk(c, 0u)]; }
    if (chunk_ok(c, 1u)) { r.x1 = q[base + chunk(c, 1u)]; }
    if (chunk_ok(c, 2u)) { r.x2 = q[base + chunk(c, 2u)]; }
    if (chunk_ok(c, 3u)) { r.x3 = q[base + chunk(c, 3u)]; }
    return r;
}

fn load_k(base: u32, c: u32) -> Row4 {
    var r = zero_row();
    if (chunk_ok(c, 0u)) { r.x0 = k[base + chunk(c, 0u)]; }
    if (chunk_ok(c, 1u)) { r.x1 = k[base + chunk(c, 1u)]; }
    if (chunk_ok(c, 2u)) { r.x2 = k[base + chunk(c, 2u)]; }
    if (chunk_ok(c, 3u)) { r.x3 = k[base + chunk(c, 3u)]; }
    return r;
}

fn load_v(base: u32, c: u32) -> Row4 {
    var r = zero_row();
    if (chunk_ok(c, 0u)) { r.x0 = v[base + chunk(c, 0u)]; }
    if (chunk_ok(c, 1u)) { r.x1 = v[base + chunk(c, 1u)]; }
    if (chunk_ok(c, 2u)) { r.x2 = v[base + chunk(c, 2u)]; }
    if (chunk_ok(c, 3u)) { r.x3 = v[base + chunk(c, 3u)]; }
    return r;
}

fn load_dout(base: u32, c: u32) -> Row4 {
    var r = zero_row();
    if (chunk_ok(c, 0u)) { r.x0 = dout[base + chunk(c, 0u)]; }
    if (chunk_ok(c, 1u)) { r.x1 = dout[base + chunk(c, 1u)]; }
    if (chunk_ok(c, 2u)) { r.x2 = dout[base + chunk(c, 2u)]; }
    if (chunk_ok(c, 3u)) { r.x3 = dout[base + chunk(c, 3u)]; }
    return r;
}

// Partial dot of register row x with row j of tile_a / tile_b over this thread's chunks.
fn dot_a(j: u32, c: u32, x: Row4) -> f32 {
    let base = j * HD4;
    return dot(x.x0, tile_a[base + chunk(c, 0u)]) + dot(x.x1, tile_a[base + chunk(c, 1u)])
         + dot(x.x2, tile_a[base + chunk(c, 2u)]) + dot(x.x3, tile_a[base + chunk(c, 3u)]);
}

fn dot_b(j: u32, c: u32, x: Row4) -> f32 {
    let base = j * HD4;
    return dot(x.x0, tile_b[base + chunk(c, 0u)]) + dot(x.x1, tile_b[base + chunk(c, 1u)])
         + dot(x.x2, tile_b[base + chunk(c, 2u)]) + dot(x.x3, tile_b[base + chunk(c, 3u)]);
}

// acc += w * (row j of tile_a / tile_b), over this thread's chunks.
fn axpy_a(acc: Row4, w: f32, j: u32, c: u32) -> Row4 {
    let base = j * HD4;
    return Row4(acc.x0 + w * tile_a[base + chunk(c, 0u)], acc.x1 + w * tile_a[base + chunk(c, 1u)],
                acc.x2 + w * tile_a[base + chunk(c, 2u)], acc.x3 + w * tile_a[base + chunk(c, 3u)]);
}

fn axpy_b(acc: Row4, w: f32, j: u32, c: u32) -> Row4 {
    let base = j * HD4;
    return Row4(acc.x0 + w * tile_b[base + chunk(c, 0u)], acc.x1 + w * tile_b[base + chunk(c, 1u)],
                acc.x2 + w * tile_b[base + chunk(c, 2u)], acc.x3 + w * tile_b[base + chunk(c, 3u)]);
}

fn scaled(x: Row4, s: f32) -> Row4 {
    return Row4(x.x0 * s, x.x1 * s, x.x2 * s, x.x3 * s);
}

// Sum of the TPR partials of (row r, tile row j) in a fixed order.
fn reduce_partials(r: u32, j: u32) -> f32 {
    var s = 0.0;
    let base = (r * BT + j) * TPR;
    for (var i = 0u; i < TPR; i++) { s += red[base + i]; }
    return s;
}

// Rows t0 .. t0+BT-1 of one head, fetched into registers one tile ahead (so the global loads of the next tile
// overlap this tile's arithmetic) and then stored to tile_a / tile_b. Each thread carries at most two vec4 of
// each tensor: the twin keeps BT * HD4 <= 2 * WG. Rows past T read as zero. (One fetch function per tensor
// pair: a shared one taking "which tensor" would make every entry point use every binding, past the limit of 8.)
struct Fetch { a0: vec4<f32>, a1: vec4<f32>, b0: vec4<f32>, b1: vec4<f32> }

fn fetch_kv(b: u32, t0: u32, head: u32, lid: u32) -> Fetch {
    var f = Fetch(vec4<f32>(0.0), vec4<f32>(0.0), vec4<f32>(0.0), vec4<f32>(0.0));
    let i0 = lid;
    let i1 = lid + WG;
    if (i0 < BT * HD4 && t0 + i0 / HD4 < params.seq_len) {
        let src = row_base(b, t0 + i0 / HD4, head, params.n_kv) + i0 % HD4;
        f.a0 = k[src];
        f.b0 = v[src];
    }
    if (i1 < BT * HD4 && t0 + i1 / HD4 < params.seq_len) {
        let src = row_base(b, t0 + i1 / HD4, head, params.n_kv) + i1 % HD4;
        f.a1 = k[src];
        f.b1 = v[src];
    }
    return f;
}

fn fetch_qdo(b: u32, t0: u32, head: u32, lid: u32) -> Fetch {
    var f = Fetch(vec4<f32>(0.0), vec4<f32>(0.0), vec4<f32>(0.0), vec4<f32>(0.0));
    let i0 = lid;
    let i1 = lid + WG;
    if (i0 < BT * HD4 && t0 + i0 / HD4 < params.seq_len) {
        let src = row_base(b, t0 + i0 / HD4, head, params.n_heads) + i0 % HD4;
        f.a0 = q[src];
        f.b0 = dout[src];
    }
    if (i1 < BT * HD4 && t0 + i1 / HD4 < params.seq_len) {
        let src = row_base(b, t0 + i1 / HD4, head, params.n_heads) + i1 % HD4;
        f.a1 = q[src];
        f.b1 = dout[src];
    }
    return f;
}

fn store_tiles(f: Fetch, lid: u32) {
    if (lid < BT * HD4) {
        tile_a[lid] = f.a0;
        tile_b[lid] = f.b0;
    }
    if (lid + WG < BT * HD4) {
        tile_a[lid + WG] = f.a1;
        tile_b[lid + WG] = f.b1;
    }
}

fn part(x: Row4, i: u32) -> vec4<f32> {
    if (i == 0u) { return x.x0; }
    if (i == 1u) { return x.x1; }
    if (i == 2u) { return x.x2; }
    return x.x3;
}

fn store_out(base: u32, c: u32, x: Row4) {
    for (var i = 0u; i < 4u; i++) { if (chunk_ok(c, i)) { out[base + chunk(c, i)] = part(x, i); } }
}

fn store_dq(base: u32, c: u32, x: Row4) {
    for (var i = 0u; i < 4u; i++) { if (chunk_ok(c, i)) { dq[base + chunk(c, i)] = part(x, i); } }
}

fn store_dk(base: u32, c: u32, x: Row4) {
    for (var i = 0u; i < 4u; i++) { if (chunk_ok(c, i)) { dk[base + chunk(c, i)] = part(x, i); } }
}

fn store_dv(base: u32, c: u32, x: Row4) {
    for (var i = 0u; i < 4u; i++) { if (chunk_ok(c, i)) { dv[base + chunk(c, i)] = part(x, i); } }
}

// Grid: (ceil(T / ROWS), NH, B). Writes out and lse = log-sum-exp of the scaled scores of each query row.
@compute @workgroup_size(WG)
fn attention_forward(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>,
        @builtin(num_workgroups) nwg: vec3<u32>) {
    // Causal work grows with the block index: hand out the longest blocks first so the tail is short.
    let blk = nwg.x - 1u - wid.x;
    let b = wid.z;
    let h = wid.y;
    let g = h / params.ratio;
    let T = params.seq_len;
    let r = lid / TPR;
    let c = lid % TPR;
    let t_q = blk * ROWS + r;
    let row_ok = t_q < T;
    let q_base = row_base(b, min(t_q, T - 1u), h, params.n_heads);
    let qr = scaled(load_q(q_base, c), params.scale);

    var m = -1e30;              // finite sentinel: exp(m_old - m_new) stays 0, never NaN
    var l = 0.0;
    var acc = zero_row();
    let keys = min(blk * ROWS + ROWS, T);          // causal: this block needs keys 0 .. keys-1
    let n_tiles = (keys + BT - 1u) / BT;
    let first_tile = first_key(blk * ROWS) / BT;   // a window: the tiles wholly before it are skipped
    var next = fetch_kv(b, first_tile * BT, g, lid);
    for (var tile = first_tile; tile < n_tiles; tile++) {
        let t0 = tile * BT;
        workgroupBarrier();                          // the previous tile is no longer read
        store_tiles(next, lid);
        workgroupBarrier();
        if (tile + 1u < n_tiles) { next = fetch_kv(b, t0 + BT, g, lid); }
        for (var j = 0u; j < BT; j++) { red[(r * BT + j) * TPR + c] = dot_a(j, c, qr); }
        workgroupBarrier();
        for (var j = c; j < BT; j += TPR) { prob[r * BT + j] = capped(reduce_partials(r, j)); }
        workgroupBarrier();
        // Online softmax over the keys first_key(t_q) <= t0 + j <= t_q. Every thread of the row does the same
        // arithmetic on the same scores, so their m and l agree without communicating.
        var n_valid = 0u;
        if (row_ok && t_q >= t0) { n_valid = min(t_q - t0 + 1u, BT); }
        var j_first = 0u;
        let lo = first_key(t_q);
        if (lo > t0) { j_first = min(lo - t0, BT); }
        var m_new = m;
        for (var j = j_first; j < n_valid; j++) { m_new = max(m_new, prob[r * BT + j]); }
        let alpha = exp(m - m_new);
        l *= alpha;
        acc = scaled(acc, alpha);
        for (var j = j_first; j < n_valid; j++) {
            let p = exp(prob[r * BT + j] - m_new);
            l += p;
            acc = axpy_b(acc, p, j, c);
        }
        m = m_new;
    }
    if (row_ok) {
        store_out(q_base, c, scaled(acc, 1.0 / l));
        if (c == 0u) { lse[(b * params.n_heads + h) * T + t_q] = m + log(l); }
    }
}

// Grid: ceil(B * NH * T / 64) workgroups, folded into y. D[b, h, t] = sum_d dout * out, used by both backward kernels.
@compute @workgroup_size(64)
fn attention_backward_dsum(@builtin(global_invocation_id) gid: vec3<u32>) {
    let n = gid.y * params.dsum_stride + gid.x;
    let T = params.seq_len;
    if (n >= params.batch * params.n_heads * T) { return; }
    let t = n % T;
    let h = (n / T) % params.n_heads;
    let b = n / (T * params.n_heads);
    let base = row_base(b, t, h, params.n_heads);
    var s = vec4<f32>(0.0);
    for (var i = 0u; i < HD4; i++) { s += dout[base + i] * out[base + i]; }
    dsum[n] = s.x + s.y + s.z + s.w;
}

// Grid: (ceil(T / ROWS), NH, B). dq = scale * sum_j dS_ij k_j with P recomputed from lse and
// dS = P * (dO . v_j - D). Walks the key tiles like the forward.
@compute @workgroup_size(WG)
fn attention_backward_dq(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>,
        @builtin(num_workgroups) nwg: vec3<u32>) {
    // Causal work grows with the block index: hand out the longest blocks first so the tail is short.
    let blk = nwg.x - 1u - wid.x;
    let b = wid.z;
    let h = wid.y;
    let g = h / params.ratio;
    let T = params.seq_len;
    let r = lid / TPR;
    let c = lid % TPR;
    let t_q = blk * ROWS + r;
    let row_ok = t_q < T;
    let t_row = min(t_q, T - 1u);
    let base = row_base(b, t_row, h, params.n_heads);
    let qr = load_q(base, c);
    let dor = load_dout(base, c);
    let stat = (b * params.n_heads + h) * T + t_row;
    let lse_r = lse[stat];
    let d_r = dsum[stat];

    var acc = zero_row();
    let keys = min(blk * ROWS + ROWS, T);
    let n_tiles = (keys + BT - 1u) / BT;
    let first_tile = first_key(blk * ROWS) / BT;
    let lo = first_key(t_row);
    var next = fetch_kv(b, first_tile * BT, g, lid);
    for (var tile = first_tile; tile < n_tiles; tile++) {
        let t0 = tile * BT;
        workgroupBarrier();
        store_tiles(next, lid);
        workgroupBarrier();
        if (tile + 1u < n_tiles) { next = fetch_kv(b, t0 + BT, g, lid); }
        for (var j = 0u; j < BT; j++) { red[(r * BT + j) * TPR + c] = dot_a(j, c, qr); }
        workgroupBarrier();
        for (var j = c; j < BT; j += TPR) {
            let s = capped(reduce_partials(r, j) * params.scale);
            let ok = row_ok && t0 + j <= t_q && t0 + j >= lo;
            // masked: exp(-1e30) = 0. Only dS is needed here, so the cap's slope joins P at once.
            prob[r * BT + j] = exp(select(-1e30, s - lse_r, ok)) * cap_slope(s);
        }
        workgroupBarrier();
        for (var j = 0u; j < BT; j++) { red[(r * BT + j) * TPR + c] = dot_b(j, c, dor); }
        workgroupBarrier();
        for (var j = c; j < BT; j += TPR) {
            prob[r * BT + j] = prob[r * BT + j] * (reduce_partials(r, j) - d_r);
        }
        workgroupBarrier();
        for (var j = 0u; j < BT; j++) { acc = axpy_a(acc, prob[r * BT + j], j, c); }
    }
    if (row_ok) { store_dq(base, c, scaled(acc, params.scale)); }
}

// dk, dv of ROWS key rows of KV head g, summed over the query heads h_first .. h_end-1 (all of them or one):
// walks every query tile at or after the block's first key. dv = sum_i P_ij dO_i, dk = scale sum_i dS_ij q_i.
struct KeyGrads { dk: Row4, dv: Row4, base: u32, ok: bool }

fn dkdv_walk(lid: u32, b: u32, blk: u32, g: u32, h_first: u32, h_end: u32) -> KeyGrads {
    let T = params.seq_len;
    let r = lid / TPR;
    let c = lid % TPR;
    let t_k = blk * ROWS + r;
    let key_ok = t_k < T;
    let base = row_base(b, min(t_k, T - 1u), g, params.n_kv);
    let kr = load_k(base, c);
    let vr = load_v(base, c);

    var dk_acc = zero_row();
    var dv_acc = zero_row();
    let q_start = blk * ROWS;                         // earlier queries cannot see these keys
    var q_end = T;                                    // nor, with a window, queries at or past key + WINDOW
    if (WINDOW > 0u) { q_end = min(T, q_start + ROWS - 1u + WINDOW); }
    let n_tiles = (q_end - q_start + BT - 1u) / BT;
    var next = fetch_qdo(b, q_start, h_first, lid);
    for (var h = h_first; h < h_end; h++) {
        for (var tile = 0u; tile < n_tiles; tile++) {
            let t0 = q_start + tile * BT;
            workgroupBarrier();
            store_tiles(next, lid);
            for (var i = lid; i < BT; i += WG) {          // WG may be smaller than BT
                let stat = (b * params.n_heads + h) * T + min(t0 + i, T - 1u);
                tile_lse[i] = lse[stat];
                tile_d[i] = dsum[stat];
            }
            workgroupBarrier();
            if (tile + 1u < n_tiles) {
                next = fetch_qdo(b, t0 + BT, h, lid);
            } else if (h + 1u < h_end) {
                next = fetch_qdo(b, q_start, h + 1u, lid);
            }
            for (var i = 0u; i < BT; i++) { red[(r * BT + i) * TPR + c] = dot_a(i, c, kr); }
            workgroupBarrier();
            for (var i = c; i < BT; i += TPR) {
                let s = capped(reduce_partials(r, i) * params.scale);
                let ok = key_ok && t0 + i < T && t0 + i >= t_k && (WINDOW == 0u || t0 + i < t_k + WINDOW);
                // Masked entries may have s >> lse: exponentiate the sentinel instead, so no inf is ever made.
                prob[r * BT + i] = exp(select(-1e30, s - tile_lse[i], ok));
                if (SOFTCAP != 0.0) { slope[r * BT + i] = cap_slope(s); }
            }
            workgroupBarrier();
            for (var i = 0u; i < BT; i++) {
                dv_acc = axpy_b(dv_acc, prob[r * BT + i], i, c);
                red[(r * BT + i) * TPR + c] = dot_b(i, c, vr);
            }
            workgroupBarrier();
            for (var i = c; i < BT; i += TPR) {
                var ds = prob[r * BT + i] * (reduce_partials(r, i) - tile_d[i]);
                if (SOFTCAP != 0.0) { ds *= slope[r * BT + i]; }
                prob[r * BT + i] = ds;
            }
            workgroupBarrier();
            for (var i = 0u; i < BT; i++) { dk_acc = axpy_a(dk_acc, prob[r * BT + i], i, c); }
        }
    }
    return KeyGrads(scaled(dk_acc, params.scale), dv_acc, base, key_ok);
}

// Grid: (ceil(T / ROWS), NKV, B), for NH == NKV: a workgroup owns ROWS key rows of one head.
@compute @workgroup_size(WG)
fn attention_backward_dkdv(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>) {
    let g = wid.y;
    let grads = dkdv_walk(lid, wid.z, wid.x, g, g * params.ratio, (g + 1u) * params.ratio);
    if (grads.ok) {
        store_dk(grads.base, lid % TPR, grads.dk);
        store_dv(grads.base, lid % TPR, grads.dv);
    }
}

// Grid: (ceil(T / ROWS), NH, B), for GQA: one query head per workgroup (NH / NKV times the workgroups of
// walking the whole group in one), written per head; attention_backward_dkdv_sum then adds each group's heads
// in a fixed order, so dk/dv stay deterministic and are overwritten, with no atomics.
@compute @workgroup_size(WG)
fn attention_backward_dkdv_heads(@builtin(local_invocation_index) lid: u32,
                                 @builtin(workgroup_id) wid: vec3<u32>) {
    let h = wid.y;
    let grads = dkdv_walk(lid, wid.z, wid.x, h / params.ratio, h, h + 1u);
    if (grads.ok) {
        let c = lid % TPR;
        let t = wid.x * ROWS + lid / TPR;
        let base = row_base(wid.z, t, h, params.n_heads);
        for (var i = 0u; i < 4u; i++) {
            if (chunk_ok(c, i)) {
                dk_heads[base + chunk(c, i)] = part(grads.dk, i);
                dv_heads[base + chunk(c, i)] = part(grads.dv, i);
            }
        }
    }
}

// Grid: ceil(B * T * NKV * HD4 / 64) workgroups, folded into y: dk[b, t, g] = sum over the group's heads of dk_heads.
@compute @workgroup_size(64)
fn attention_backward_dkdv_sum(@builtin(global_invocation_id) gid: vec3<u32>) {
    let n = gid.y * params.sum_stride + gid.x;        // vec4 index into dk [B, T, NKV, HD4]
    if (n >= params.batch * params.seq_len * params.n_kv * HD4) { return; }
    let ch = n % HD4;
    let g = (n / HD4) % params.n_kv;
    let bt = n / (HD4 * params.n_kv);                 // b * T + t
    let first = (bt * params.n_heads + g * params.ratio) * HD4 + ch;
    var sk = vec4<f32>(0.0);
    var sv = vec4<f32>(0.0);
    for (var i = 0u; i < params.ratio; i++) {
        sk += dk_heads[first + i * HD4];
        sv += dv_heads[first + i * HD4];
    }
    dk[n] = sk;
    dv[n] = sv;
}
