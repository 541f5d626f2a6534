// The uniform of every GEMM (linear.wgsl and linear_f16.wgsl): one struct, so linear.wgsl's matmul_reduce can
// finish a split-K product of either family from the same params buffer.
struct Params {
    M: u32, N: u32, K: u32, lda: u32,
    ldb: u32, ldc: u32, a_off: u32, b_off: u32,
    c_off: u32, has_bias: u32, k_chunk: u32, splits: u32,
    row_stride: u32, alpha: f32, beta: f32, b_row_blocks: u32,
}
