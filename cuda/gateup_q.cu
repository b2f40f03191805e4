// Fused gate + channel threshold + sparse-output up_proj on MLX affine-quantized weights (4 or 8
// bits, group GS): the quantized twin of gateup_f, with its rounding points:
//   g = round(gate[r] . x[m]),  a = round(g * round(sigmoid(g))),  keep = |a| >= t
//   y[m, r] = keep ? round(a * round(up[r] . x[m])) : 0       (t = t[r] if TPC else t[0])
// Layout: the gate and up rows stacked as one 2N-row matrix in MLX's layout, scales and biases
// packed after each other (sparse_gemv.QWeight.sb): w (2N, K*BITS/32) uint32 = [gate; up], sb (4N, K/GS)
// = [gate scales; up scales; gate biases; up biases] (one buffer each: fewer inputs per launch, each
// costs host time at every token, RESULTS.md session 8). RPW rows per warp (chess_qrows_dot), the
// gate rows always read, an up row only where some token keeps the channel. One launch replaces
// MLX's gate GEMV, the SiLU/threshold node and the sparse-output up launch.
// Template: T, M, K, N, BITS, GS, RPW, TPC. Grid: ceil(N / (8 * RPW)) * 256, threadgroup 256.
// Needs K % (128/BITS) == 0.
constexpr int WORDS_PER_ROW = K * BITS / 32;
constexpr int GROUPS_PER_ROW = K / GS;
const uint32_t* wg = w;
const uint32_t* wu = w + (size_t)N * WORDS_PER_ROW;
const T* sg = sb;
const T* su = sb + (size_t)N * GROUPS_PER_ROW;
const T* bg = sb + (size_t)2 * N * GROUPS_PER_ROW;
const T* bu = sb + (size_t)3 * N * GROUPS_PER_ROW;
const int lane = threadIdx.x & 31;
const int warp = threadIdx.x >> 5;
const int r0 = ((int)blockIdx.x * 8 + warp) * RPW;
bool in_n[RPW];
float acc[RPW][M];
#pragma unroll
for (int q = 0; q < RPW; ++q) {
  in_n[q] = r0 + q < N;
#pragma unroll
  for (int m = 0; m < M; ++m) acc[q][m] = 0.0f;
}
chess_qrows_dot<T, M, K, BITS, GS, RPW, 1>(wg, sg, bg, x, r0, in_n, acc, 0);
float am[RPW][M];
bool act[RPW];
bool any = false;
#pragma unroll
for (int q = 0; q < RPW; ++q) {
  act[q] = false;
#pragma unroll
  for (int m = 0; m < M; ++m) {
    const float gr = chess_round<T>(chess_warp_sum(acc[q][m]));
    const float av = chess_round<T>(gr * chess_round<T>(1.0f / (1.0f + expf(-gr))));
    const bool keep = in_n[q] && fabsf(av) >= static_cast<float>(t[TPC ? (in_n[q] ? r0 + q : 0) : 0]);
    am[q][m] = keep ? av : 0.0f;
    act[q] |= keep;
    acc[q][m] = 0.0f;
  }
  any |= act[q];
}
if (any) chess_qrows_dot<T, M, K, BITS, GS, RPW, 1>(wu, su, bu, x, r0, act, acc, 0);
#pragma unroll
for (int q = 0; q < RPW; ++q) {
#pragma unroll
  for (int m = 0; m < M; ++m) {
    const float u = chess_warp_sum(acc[q][m]);
    if (lane == 0 && in_n[q]) y[(size_t)m * N + r0 + q] = static_cast<T>(am[q][m] * chess_round<T>(u));
  }
}
