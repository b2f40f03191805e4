// Sparse-output GEMV, MLX affine-quantized weights (4 or 8 bits, group GS), fused with the gate.
// Twin of cuda/spout_q.cu: MLX's own layout (w (N, K*BITS/32) uint32, scales/biases (N, K/GS));
// RPW consecutive rows per simdgroup, only the active ones read (chess_qrows_dot); each
// simdgroup sums its own rows (simd_sum), no threadgroup memory or barrier. Every y[m, r], r < N,
// is written. Template: T, M, K, N, BITS, GS, RPW. Grid: ceil(N / (8 * RPW)) * 256, threadgroup 256.
// Needs K % (128/BITS) == 0.
const uint lane = thread_index_in_simdgroup;
const uint warp = simdgroup_index_in_threadgroup;
const int r0 = (int(threadgroup_position_in_grid.x) * 8 + int(warp)) * RPW;
bool act[RPW];
bool any = false;
float acc[RPW][M];
for (int q = 0; q < RPW; ++q) {
  act[q] = chess_row_active<T, M, N>(a, r0 + q);
  any = any || act[q];
  for (int m = 0; m < M; ++m) acc[q][m] = 0.0f;
}
if (any) chess_qrows_dot<T, M, K, BITS, GS, RPW>(w, scales, biases, x, r0, act, acc, lane);
for (int q = 0; q < RPW; ++q) {
  const int r = r0 + q;
  for (int m = 0; m < M; ++m) {
    const float s = simd_sum(acc[q][m]);
    if (lane == 0 && r < N) y[m * N + r] = static_cast<T>(s * float(a[m * N + r]));
  }
}
