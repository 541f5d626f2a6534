// Token embedding gather: out[row, :] = table[ids[row], :], for the rows whose id falls in this table piece.
// A large vocabulary is split over several buffers (one binding may not exceed maxStorageBufferBindingSize),
// so one dispatch runs per piece, each covering ids in [first_id, first_id + piece_rows). The table is held in
// its frozen-weight format (FORMAT: engine.model.weight_formats' GPU layout, read by weight_formats.wgsl), so
// each invocation widens a run of 4 columns with one load4. Embeddings are frozen and nothing upstream needs
// their gradient, so there is no backward. Each value is multiplied by `scale` (Gemma's sqrt(hidden); 1 otherwise,
// which leaves it bit for bit).
struct Params { n4: u32, dim: u32, first_id: u32, piece_rows: u32, row_stride: u32, row_blocks: u32, scale: f32, _pad1: u32 }

#include "weight_formats.wgsl"

override FORMAT: u32 = 0u;   // FMT_* of the table

@group(0) @binding(0) var<storage, read_write> out: array<f32>;  // [B·T, C]
@group(0) @binding(1) var<storage, read> ids: array<i32>;        // [B·T]
@group(0) @binding(2) var<storage, read> weights: array<u32>;    // [piece_rows, C] in FORMAT's GPU layout
@group(0) @binding(3) var<uniform> params: Params;

@compute @workgroup_size(256)
fn embedding_forward(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = gid.y * params.row_stride + gid.x;   // over B·T rows × ceil(C / 4) runs
    if (i >= params.n4) { return; }
    let runs = (params.dim + 3u) / 4u;
    let row = i / runs;
    let col = (i % runs) * 4u;
    let id = u32(ids[row]);
    if (id < params.first_id || id >= params.first_id + params.piece_rows) { return; }
    let v = weight_load4(FORMAT, params.row_blocks, id - params.first_id, col);
    for (var j = 0u; j < 4u; j++) {
        if (col + j < params.dim) { out[row * params.dim + col + j] = v[j] * params.scale; }
    }
}
