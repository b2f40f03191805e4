// Sparse-output GEMV, MLX affine-quantized weights (4 or 8 bits, group GS), fused with the gate.
//   y[m, r] = a[m, r] * sum_k (scale[r, k/GS] * q[r, k] + bias[r, k/GS]) * x[m, k]   (active rows)
// Layout: MLX's own (w (N, K*BITS/32) uint32; scales and biases (N, K/GS) packed as sb (2N, K/GS) =
// [scales; biases]): element k of a row sits in
// word k / (32/BITS) at bit BITS * (k % (32/BITS)). A block of 8 warps covers 8/PARTS row groups
// of RPW consecutive rows; the PARTS warps of a group split its rows along K and read only the
// active rows (chess_qrows_dot: x loaded once per 16-byte step for all RPW rows). With PARTS = 1
// each warp sums its rows itself (no shared memory, no barrier); otherwise the PARTS warps' sums
// meet in red[8][RPW * M] (long rows: more warps in flight per row, session 10). q is decoded
// without I2F (chess_qfloat). Every y[m, r], r < N, is written (0 for an inactive row).
// Template: T, M, K, N, BITS, GS, RPW, PARTS (1, 2, 4 or 8).
// Grid: ceil(N / (8 / PARTS * RPW)) * 256 threads, threadgroup 256. Needs K % (128/BITS) == 0.
constexpr int GROUPS = 8 / PARTS;
const T* scales = sb;
const T* biases = sb + (size_t)N * (K / GS);
__shared__ float red[8][RPW * M];
const int lane = threadIdx.x & 31;
const int warp = threadIdx.x >> 5;
const int part = warp % PARTS;
const int r0 = ((int)blockIdx.x * GROUPS + warp / PARTS) * RPW;
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
if (any) chess_qrows_dot<T, M, K, BITS, GS, RPW, PARTS>(w, scales, biases, x, r0, act, acc, part);
#pragma unroll
for (int q = 0; q < RPW; ++q) {
  const int r = r0 + q;
#pragma unroll
  for (int m = 0; m < M; ++m) {
    const float s = chess_warp_sum(acc[q][m]);
    if (PARTS == 1) {
      if (lane == 0 && r < N) y[(size_t)m * N + r] = static_cast<T>(s * static_cast<float>(a[(size_t)m * N + r]));
    } else if (lane == 0) {
      red[warp][q * M + m] = s;
    }
  }
}
if (PARTS > 1) {
  __syncthreads();
  for (int i = lane; i < RPW * M && part == 0; i += 32) {
    const int q = i / M, m = i % M, r = r0 + q;
    float s = 0.0f;
#pragma unroll
    for (int p = 0; p < PARTS; ++p) s += red[warp + p][i];
    if (r < N) y[(size_t)m * N + r] = static_cast<T>(s * static_cast<float>(a[(size_t)m * N + r]));
  }
}
