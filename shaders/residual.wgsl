// Residual add: out = a + b over n floats (forward). Its backward is the identity on both inputs, so the
// engine routes the same gradient buffer to both branches instead of dispatching anything.
struct Params { n: u32, row_stride: u32, _pad0: u32, _pad1: u32 }

@group(0) @binding(0) var<storage, read_write> out: array<f32>;
@group(0) @binding(1) var<storage, read> a: array<f32>;
@group(0) @binding(2) var<storage, read> b: array<f32>;
@group(0) @binding(3) var<uniform> params: Params;

@compute @workgroup_size(256)
fn residual_forward(@builtin(global_invocation_id) gid: vec3<u32>) {
    // 2-D dispatch so n may exceed 65535 * 256: row_stride = 256 * groups in x.
    let i = gid.y * params.row_stride + gid.x;
    if (i >= params.n) { return; }
    out[i] = a[i] + b[i];
}
