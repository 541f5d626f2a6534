// Token embedding gather: out[row, :] = table[ids[row], :], for the rows whose id falls in this table piece.
// A large vocabulary is split over several buffers (one binding may not exceed maxStorageBufferBindingSize),
// so one dispatch runs per piece, each covering ids in [first_id, first_id + piece_rows). Embeddings are
// frozen and nothing upstream needs their gradient, so there is no backward.
struct Params { n: u32, dim: u32, first_id: u32, piece_rows: u32, row_stride: u32, _pad0: u32, _pad1: u32, _pad2: u32 }

@group(0) @binding(0) var<storage, read_write> out: array<f32>;  // [B·T, C]
@group(0) @binding(1) var<storage, read> ids: array<i32>;        // [B·T]
@group(0) @binding(2) var<storage, read> table: array<f32>;      // [piece_rows, C]
@group(0) @binding(3) var<uniform> params: Params;

@compute @workgroup_size(256)
fn embedding_forward(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = gid.y * params.row_stride + gid.x;   // over B·T·C
    if (i >= params.n) { return; }
    let row = i / params.dim;
    let id = u32(ids[row]);
    if (id < params.first_id || id >= params.first_id + params.piece_rows) { return; }
    out[i] = table[(id - params.first_id) * params.dim + i % params.dim];
}
