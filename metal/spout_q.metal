// Sparse-output GEMV, MLX affine-quantized weights (4 or 8 bits, group GS), fused with the gate.
// Twin of cuda/spout_q.cu: MLX's own layout (w (N, K*BITS/32) uint32, scales/biases (N, K/GS) packed as sb = [scales; biases]);
// a threadgroup of 8 simdgroups covers 8/PARTS row groups of RPW consecutive rows; the PARTS
// simdgroups of a group split its rows along K and read only the active rows (chess_qrows_dot).
// With PARTS = 1 each simdgroup sums its own rows (simd_sum), no threadgroup memory or barrier;
// otherwise the sums meet in red[8][RPW * M]. Every y[m, r], r < N, is written.
// Template: T, M, K, N, BITS, GS, RPW, PARTS. Grid: ceil(N / (8 / PARTS * RPW)) * 256,
// threadgroup 256. Needs K % (128/BITS) == 0.
constexpr int GROUPS = 8 / PARTS;
const device T* scales = sb;
const device T* biases = sb + N * (K / GS);
threadgroup float red[8][RPW * M];
const uint lane = thread_index_in_simdgroup;
const uint warp = simdgroup_index_in_threadgroup;
const int part = int(warp) % PARTS;
const int r0 = (int(threadgroup_position_in_grid.x) * GROUPS + int(warp) / PARTS) * RPW;
bool act[RPW];
bool any = false;
float acc[RPW][M];
for (int q = 0; q < RPW; ++q) {
  act[q] = chess_row_active<T, M, N>(a, r0 + q);
  any = any || act[q];
  for (int m = 0; m < M; ++m) acc[q][m] = 0.0f;
}
if (any) chess_qrows_dot<T, M, K, BITS, GS, RPW, PARTS>(w, scales, biases, x, r0, act, acc, lane, part);
for (int q = 0; q < RPW; ++q) {
  const int r = r0 + q;
  for (int m = 0; m < M; ++m) {
    const float s = simd_sum(acc[q][m]);
    if (PARTS == 1) {
      if (lane == 0 && r < N) y[m * N + r] = static_cast<T>(s * float(a[m * N + r]));
    } else if (lane == 0) {
      red[warp][q * M + m] = s;
    }
  }
}
if (PARTS > 1) {
  threadgroup_barrier(mem_flags::mem_threadgroup);
  for (int i = int(lane); i < RPW * M && part == 0; i += 32) {
    const int q = i / M, m = i % M, r = r0 + q;
    float s = 0.0f;
    for (int p = 0; p < PARTS; ++p) s += red[int(warp) + p][i];
    if (r < N) y[m * N + r] = static_cast<T>(s * float(a[m * N + r]));
  }
}
