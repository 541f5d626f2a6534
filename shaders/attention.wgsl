// Causal multi-head attention with grouped KV heads, flash-attention style (online softmax, tiles in
// workgroup memory, the [T, T] score matrix never stored).
//   q, out, dout, dq: [B, T, NH, HD]    k, v, dk, dv: [B, T, NKV, HD]    lse, dsum: [B, NH, T]
// Query head h reads KV head h / (NH / NKV). Scores are scaled by 1/sqrt(HD).
//
// Work split (all four entry points share it): a workgroup owns ROWS rows (query rows, or key rows in
// attention_backward_dkdv) of one head; TPR threads share a row, each holding up to 4 vec4 chunks of it in
// registers (chunks c, c + TPR, c + 2 TPR, c + 3 TPR of the HD/4 chunks, so HD <= 256). A dot product between
// a register row and a tile row is summed in two steps: each thread's partial over its chunks goes to `red`,
// then one thread per (row, tile row) adds the TPR partials in a fixed order (deterministic, no atomics).
// Accumulators are vec4 variables, never runtime-indexed private arrays (slow on NVIDIA).
// Workgroup memory: 3 x 4 KiB + 2 KiB + 256 B = 14.25 KiB, under the 16 KiB WebGPU minimum.
struct Params {
    batch: u32,
    seq_len: u32,    // T
    n_heads: u32,    // NH
    n_kv: u32,       // NKV
    ratio: u32,      // NH / NKV
    scale: f32,      // 1 / sqrt(HD)
    _pad0: u32, _pad1: u32,
}

const ROWS: u32 = 16u;          // register rows per workgroup
override HD4: u32 = 16u;        // head_dim / 4
override TPR: u32 = 4u;         // threads per row: ceil(HD4 / 4)
override BT: u32 = 16u;         // rows per tile loaded into workgroup memory (<= 32, BT * HD4 <= 256)
override WG: u32 = 64u;         // ROWS * TPR

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

var<workgroup> tile_a: array<vec4<f32>, 256>;   // [BT, HD4]: K (forward, dq) or Q (dkdv)
var<workgroup> tile_b: array<vec4<f32>, 256>;   // [BT, HD4]: V (forward, dq) or dO (dkdv)
var<workgroup> red: array<f32, 1024>;           // [ROWS, BT, TPR] partial dot products
var<workgroup> prob: array<f32, 512>;           // [ROWS, BT] scores, then P, then dS
var<workgroup> tile_lse: array<f32, 32>;        // [BT] lse of the tile's query rows (dkdv)
var<workgroup> tile_d: array<f32, 32>;          // [BT] D of the tile's query rows (dkdv)

// Row `t` of head `head` in a [B, T, heads, HD] tensor, as a vec4 index of chunk 0.
fn row_base(b: u32, t: u32, head: u32, heads: u32) -> u32 {
    return ((b * params.seq_len + t) * heads + head) * HD4;
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

// Rows t0 .. t0+BT-1 of one head into tile_a / tile_b, zero past T. (One function per tensor pair: a shared
// helper taking "which tensor" would make every entry point use every binding, past the 8-buffer limit.)
fn load_tiles_kv(b: u32, t0: u32, head: u32, lid: u32) {
    for (var i = lid; i < BT * HD4; i += WG) {
        let t = t0 + i / HD4;
        var a = vec4<f32>(0.0);
        var bb = vec4<f32>(0.0);
        if (t < params.seq_len) {
            let src = row_base(b, t, head, params.n_kv) + i % HD4;
            a = k[src];
            bb = v[src];
        }
        tile_a[i] = a;
        tile_b[i] = bb;
    }
}

fn load_tiles_qdo(b: u32, t0: u32, head: u32, lid: u32) {
    for (var i = lid; i < BT * HD4; i += WG) {
        let t = t0 + i / HD4;
        var a = vec4<f32>(0.0);
        var bb = vec4<f32>(0.0);
        if (t < params.seq_len) {
            let src = row_base(b, t, head, params.n_heads) + i % HD4;
            a = q[src];
            bb = dout[src];
        }
        tile_a[i] = a;
        tile_b[i] = bb;
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
fn attention_forward(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>) {
    let b = wid.z;
    let h = wid.y;
    let g = h / params.ratio;
    let T = params.seq_len;
    let r = lid / TPR;
    let c = lid % TPR;
    let t_q = wid.x * ROWS + r;
    let row_ok = t_q < T;
    let q_base = row_base(b, min(t_q, T - 1u), h, params.n_heads);
    let qr = scaled(load_q(q_base, c), params.scale);

    var m = -1e30;              // finite sentinel: exp(m_old - m_new) stays 0, never NaN
    var l = 0.0;
    var acc = zero_row();
    let keys = min(wid.x * ROWS + ROWS, T);          // causal: this block needs keys 0 .. keys-1
    let n_tiles = (keys + BT - 1u) / BT;
    for (var tile = 0u; tile < n_tiles; tile++) {
        let t0 = tile * BT;
        workgroupBarrier();                          // the previous tile is no longer read
        load_tiles_kv(b, t0, g, lid);
        workgroupBarrier();
        for (var j = 0u; j < BT; j++) { red[(r * BT + j) * TPR + c] = dot_a(j, c, qr); }
        workgroupBarrier();
        for (var j = c; j < BT; j += TPR) { prob[r * BT + j] = reduce_partials(r, j); }
        workgroupBarrier();
        // Online softmax over the keys t0 + j <= t_q. Every thread of the row does the same arithmetic on the
        // same scores, so their m and l agree without communicating.
        var n_valid = 0u;
        if (row_ok && t_q >= t0) { n_valid = min(t_q - t0 + 1u, BT); }
        var m_new = m;
        for (var j = 0u; j < n_valid; j++) { m_new = max(m_new, prob[r * BT + j]); }
        let alpha = exp(m - m_new);
        l *= alpha;
        acc = scaled(acc, alpha);
        for (var j = 0u; j < n_valid; j++) {
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

// Grid: ceil(B * NH * T / 64) workgroups. D[b, h, t] = sum_d dout * out, used by both backward kernels.
@compute @workgroup_size(64)
fn attention_backward_dsum(@builtin(global_invocation_id) gid: vec3<u32>) {
    let n = gid.x;
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
fn attention_backward_dq(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>) {
    let b = wid.z;
    let h = wid.y;
    let g = h / params.ratio;
    let T = params.seq_len;
    let r = lid / TPR;
    let c = lid % TPR;
    let t_q = wid.x * ROWS + r;
    let row_ok = t_q < T;
    let t_row = min(t_q, T - 1u);
    let base = row_base(b, t_row, h, params.n_heads);
    let qr = load_q(base, c);
    let dor = load_dout(base, c);
    let stat = (b * params.n_heads + h) * T + t_row;
    let lse_r = lse[stat];
    let d_r = dsum[stat];

    var acc = zero_row();
    let keys = min(wid.x * ROWS + ROWS, T);
    let n_tiles = (keys + BT - 1u) / BT;
    for (var tile = 0u; tile < n_tiles; tile++) {
        let t0 = tile * BT;
        workgroupBarrier();
        load_tiles_kv(b, t0, g, lid);
        workgroupBarrier();
        for (var j = 0u; j < BT; j++) { red[(r * BT + j) * TPR + c] = dot_a(j, c, qr); }
        workgroupBarrier();
        for (var j = c; j < BT; j += TPR) {
            let s = reduce_partials(r, j) * params.scale;
            let ok = row_ok && t0 + j <= t_q;
            prob[r * BT + j] = exp(select(-1e30, s - lse_r, ok));   // masked: exp(-1e30) = 0
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

// Grid: (ceil(T / ROWS), NKV, B). A workgroup owns ROWS key rows of one KV head and walks every query head of
// its group and every query tile at or after its first key: dv = sum_i P_ij dO_i, dk = scale * sum_i dS_ij q_i.
// Summing the group's query heads here (not with atomics) keeps dk/dv deterministic and overwritten.
@compute @workgroup_size(WG)
fn attention_backward_dkdv(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>) {
    let b = wid.z;
    let g = wid.y;
    let T = params.seq_len;
    let r = lid / TPR;
    let c = lid % TPR;
    let t_k = wid.x * ROWS + r;
    let key_ok = t_k < T;
    let base = row_base(b, min(t_k, T - 1u), g, params.n_kv);
    let kr = load_k(base, c);
    let vr = load_v(base, c);

    var dk_acc = zero_row();
    let q_start = wid.x * ROWS;                       // earlier queries cannot see these keys
    let n_tiles = (T - q_start + BT - 1u) / BT;
    var dv_acc = zero_row();
    for (var h = g * params.ratio; h < (g + 1u) * params.ratio; h++) {
        for (var tile = 0u; tile < n_tiles; tile++) {
            let t0 = q_start + tile * BT;
            workgroupBarrier();
            load_tiles_qdo(b, t0, h, lid);
            for (var i = lid; i < BT; i += WG) {          // WG may be smaller than BT (HD 16: 16 < 32)
                let stat = (b * params.n_heads + h) * T + min(t0 + i, T - 1u);
                tile_lse[i] = lse[stat];
                tile_d[i] = dsum[stat];
            }
            workgroupBarrier();
            for (var i = 0u; i < BT; i++) { red[(r * BT + i) * TPR + c] = dot_a(i, c, kr); }
            workgroupBarrier();
            for (var i = c; i < BT; i += TPR) {
                let s = reduce_partials(r, i) * params.scale;
                let ok = key_ok && t0 + i < T && t0 + i >= t_k;
                // Masked entries may have s >> lse: exponentiate the sentinel instead, so no inf is ever made.
                prob[r * BT + i] = exp(select(-1e30, s - tile_lse[i], ok));
            }
            workgroupBarrier();
            for (var i = 0u; i < BT; i++) {
                dv_acc = axpy_b(dv_acc, prob[r * BT + i], i, c);
                red[(r * BT + i) * TPR + c] = dot_b(i, c, vr);
            }
            workgroupBarrier();
            for (var i = c; i < BT; i += TPR) {
                prob[r * BT + i] = prob[r * BT + i] * (reduce_partials(r, i) - tile_d[i]);
            }
            workgroupBarrier();
            for (var i = 0u; i < BT; i++) { dk_acc = axpy_a(dk_acc, prob[r * BT + i], i, c); }
        }
    }
    if (key_ok) {
        store_dk(base, c, scaled(dk_acc, params.scale));
        store_dv(base, c, dv_acc);
    }
}
