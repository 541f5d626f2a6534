// Rotary position embedding, Hugging Face's rotate_half convention, in place on x [B, T, NH, HD]:
// the pair (x1, x2) = (x[i], x[i + R/2]) at position t turns by angle t * inv_freq[i], R the rotary dims: HD, or
// with a partial rotary (Phi-3's partial_rotary_factor) the first R of each head, the other HD - R left as they are.
// The cos/sin table [T, R/2] comes from the host so llama3/linear frequency scaling stays in one place
// (engine.model.spec.RopeSpec.inv_freq).
// Backward applies the transposed rotation to a gradient of the same layout. A table scaled by yarn's attention
// factor scales the rotation, forward and backward alike.
struct Params {
    n_pairs: u32,     // B * T * NH * R/2
    half: u32,        // R / 2
    n_heads: u32,     // NH
    seq_len: u32,     // T
    row_stride: u32,  // invocations per dispatch row (grid folded into y past the workgroup limit)
    head_dim: u32,    // HD: a head's stride in x
    _pad1: u32, _pad2: u32,
}

@group(0) @binding(0) var<storage, read_write> x: array<f32>;
@group(0) @binding(1) var<storage, read> cos_sin: array<vec2<f32>>;   // [T, R/2] of (cos, sin)
@group(0) @binding(2) var<uniform> params: Params;

// Rotates the pair owned by this invocation by +angle (sign = 1) or -angle (sign = -1).
fn rotate(gid: vec3<u32>, sign: f32) {
    let p = gid.y * params.row_stride + gid.x;
    if (p >= params.n_pairs) { return; }
    let i = p % params.half;                  // index within the first half of the rotary dims
    let row = p / params.half;                // flattened (b, t, h)
    let t = (row / params.n_heads) % params.seq_len;
    let cs = cos_sin[t * params.half + i];
    let base = row * params.head_dim;
    let x1 = x[base + i];
    let x2 = x[base + i + params.half];
    let s = sign * cs.y;
    x[base + i] = x1 * cs.x - x2 * s;
    x[base + i + params.half] = x2 * cs.x + x1 * s;
}

@compute @workgroup_size(256)
fn rope_forward(@builtin(global_invocation_id) gid: vec3<u32>) {
    rotate(gid, 1.0);
}

// d(loss)/dx = R(-angle) d(loss)/dy: a rotation's transpose is its inverse.
@compute @workgroup_size(256)
fn rope_backward(@builtin(global_invocation_id) gid: vec3<u32>) {
    rotate(gid, -1.0);
}
