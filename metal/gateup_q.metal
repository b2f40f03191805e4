// Fused gate + channel threshold + sparse-output up_proj on MLX affine-quantized weights. Twin of
// cuda/gateup_q.cu (same rounding points as gateup_f, RPW rows per simdgroup, chess_qrows_dot):
//   g = round(gate[r] . x[m]),  a = round(g * round(sigmoid(g))),  keep = |a| >= t
//   y[m, r] = keep ? round(a * round(up[r] . x[m])) : 0       (t = t[r] if TPC else t[0])
// Template: T, M, K, N, BITS, GS, RPW, TPC. Grid: ceil(N / (8 * RPW)) * 256, threadgroup 256.
// Needs K % (128/BITS) == 0. Layout as the CUDA twin: w = [gate; up] rows, sb = [gate scales; up scales;
// gate biases; up biases].
constexpr int WORDS_PER_ROW = K * BITS / 32;
constexpr int GROUPS_PER_ROW = K / GS;
const device uint32_t* wg = w;
const device uint32_t* wu = w + N * WORDS_PER_ROW;
const device T* sg = sb;
const device T* su = sb + N * GROUPS_PER_ROW;
const device T* bg = sb + 2 * N * GROUPS_PER_ROW;
const device T* bu = sb + 3 * N * GROUPS_PER_ROW;
const uint lane = thread_index_in_simdgroup;
const uint warp = simdgroup_index_in_threadgroup;
const int r0 = (int(threadgroup_position_in_grid.x) * 8 + int(warp)) * RPW;
bool in_n[RPW];
float acc[RPW][M];
for (int q = 0; q < RPW; ++q) {
  in_n[q] = r0 + q < N;
  for (int m = 0; m < M; ++m) acc[q][m] = 0.0f;
}
chess_qrows_dot<T, M, K, BITS, GS, RPW, 1>(wg, sg, bg, x, r0, in_n, acc, lane, 0);
float am[RPW][M];
bool act[RPW];
bool any = false;
for (int q = 0; q < RPW; ++q) {
  act[q] = false;
  for (int m = 0; m < M; ++m) {
    const float gr = chess_round<T>(simd_sum(acc[q][m]));
    const float av = chess_round<T>(gr * chess_round<T>(1.0f / (1.0f + exp(-gr))));
    const bool keep = in_n[q] && fabs(av) >= float(t[TPC ? (in_n[q] ? r0 + q : 0) : 0]);
    am[q][m] = keep ? av : 0.0f;
    act[q] = act[q] || keep;
    acc[q][m] = 0.0f;
  }
  any = any || act[q];
}
if (any) chess_qrows_dot<T, M, K, BITS, GS, RPW, 1>(wu, su, bu, x, r0, act, acc, lane, 0);
for (int q = 0; q < RPW; ++q) {
  for (int m = 0; m < M; ++m) {
    const float u = simd_sum(acc[q][m]);
    if (lane == 0 && in_n[q]) y[m * N + r0 + q] = static_cast<T>(am[q][m] * chess_round<T>(u));
  }
}
