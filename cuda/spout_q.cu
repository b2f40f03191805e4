// Sparse-output GEMV, MLX affine-quantized weights (4 or 8 bits, group GS), fused with the gate.
//   y[m, r] = a[m, r] * sum_k (scale[r, k/GS] * q[r, k] + bias[r, k/GS]) * x[m, k]   (active rows)
// Layout: MLX's own (w (N, K*BITS/32) uint32, scales/biases (N, K/GS)): element k of a row sits in
// word k / (32/BITS) at bit BITS * (k % (32/BITS)). Each warp owns RPW consecutive rows and reads
// only the active ones (chess_qrows_dot: x loaded once per 16-byte step for all RPW rows); the
// warp sums its rows itself, so there is no shared memory and no barrier. q is decoded without
// I2F (chess_qfloat). Every y[m, r], r < N, is written (0 for an inactive row).
// Template: T, M, K, N, BITS, GS, RPW. Grid: ceil(N / (8 * RPW)) * 256 threads, threadgroup 256.
// Needs K % (128/BITS) == 0.
const int lane = threadIdx.x & 31;
const int warp = threadIdx.x >> 5;
const int r0 = ((int)blockIdx.x * 8 + warp) * RPW;
bool act[RPW];
bool any = false;
float acc[RPW][M];
#pragma unroll
for (int q = 0; q < RPW; ++q) {
  act[q] = chess_row_active<T, M, N>(a, r0 + q);
  any |= act[q];
#pragma unroll
  for (int m = 0; m < M; ++m) acc[q][m] = 0.0f;
}
if (any) chess_qrows_dot<T, M, K, BITS, GS, RPW>(w, scales, biases, x, r0, act, acc);
#pragma unroll
for (int q = 0; q < RPW; ++q) {
  const int r = r0 + q;
#pragma unroll
  for (int m = 0; m < M; ++m) {
    const float s = chess_warp_sum(acc[q][m]);
    if (lane == 0 && r < N) y[(size_t)m * N + r] = static_cast<T>(s * static_cast<float>(a[(size_t)m * N + r]));
  }
}
