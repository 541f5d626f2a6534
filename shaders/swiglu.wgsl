// SwiGLU of the MLP: h = silu(g) ⊙ u with silu(g) = g·σ(g), elementwise over [B·T, intermediate].
// Backward: dg = dh ⊙ u ⊙ σ(g)·(1 + g·(1 − σ(g))), du = dh ⊙ silu(g).
struct Params { n: u32, row_stride: u32, _pad0: u32, _pad1: u32 }

@group(0) @binding(0) var<storage, read_write> out: array<f32>;   // forward: h; backward: dg
@group(0) @binding(1) var<storage, read_write> out2: array<f32>;  // backward: du (forward: unused)
@group(0) @binding(2) var<storage, read> gate: array<f32>;
@group(0) @binding(3) var<storage, read> up: array<f32>;
@group(0) @binding(4) var<storage, read> dh: array<f32>;          // backward only
@group(0) @binding(5) var<uniform> params: Params;

fn sigmoid(v: f32) -> f32 { return 1.0 / (1.0 + exp(-v)); }

@compute @workgroup_size(256)
fn swiglu_forward(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = gid.y * params.row_stride + gid.x;
    if (i >= params.n) { return; }
    let g = gate[i];
    out[i] = g * sigmoid(g) * up[i];
}

@compute @workgroup_size(256)
fn swiglu_backward(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = gid.y * params.row_stride + gid.x;
    if (i >= params.n) { return; }
    let g = gate[i];
    let s = sigmoid(g);
    let d = dh[i];
    out[i] = d * up[i] * s * (1.0 + g * (1.0 - s));
    out2[i] = d * g * s;
}
