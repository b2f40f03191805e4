// Fused gate + channel threshold + sparse-output up_proj, float16/bfloat16. Twin of
// cuda/gateup_f.cu (same tiling: WPR simdgroups per row, 8/WPR rows per 256-thread threadgroup):
//   g = round(w_gate[r, :] . x[m, :]),  a = round(g * round(sigmoid(g))),  keep = |a| >= t
//   y[m, r] = keep ? round(a * round(w_up[r, :] . x[m, :])) : 0       (t = t[r] if TPC else t[0])
// w (2N, K) = [w_gate; w_up]. The gate row is always read; the up row only if some token keeps r.
// Template: T, M, K, N, WPR, TPC. Grid: ceil(N / (8/WPR)) * 256 threads, threadgroup 256. K % 8 == 0.
constexpr int RPB = 8 / WPR;
const device T* wg = w;
const device T* wu = w + N * K;
threadgroup float red[8][M];
const uint lane = thread_index_in_simdgroup;
const uint warp = simdgroup_index_in_threadgroup;
const int part = int(warp) % WPR;
const int r = int(threadgroup_position_in_grid.x) * RPB + int(warp) / WPR;
float acc[M];
for (int m = 0; m < M; ++m) acc[m] = 0.0f;
if (r < N) chess_row_dot<T, M, K, WPR>(wg + r * K, x, part, acc, lane);
float g[M];
chess_row_sums<M, WPR>(acc, red, g, lane, warp);
float a[M];
bool active = false;
for (int m = 0; m < M; ++m) {
  const float gr = chess_round<T>(g[m]);
  a[m] = chess_round<T>(gr * chess_round<T>(1.0f / (1.0f + exp(-gr))));
  const bool keep = r < N && fabs(a[m]) >= float(t[TPC ? r : 0]);
  if (!keep) a[m] = 0.0f;
  active = active || keep;
  acc[m] = 0.0f;
}
if (active) chess_row_dot<T, M, K, WPR>(wu + r * K, x, part, acc, lane);
float u[M];
chess_row_sums<M, WPR>(acc, red, u, lane, warp);
if (r < N && part == 0 && int(lane) < M) {
  float am = 0.0f, um = 0.0f;
  for (int m = 0; m < M; ++m) {
    if (m == int(lane)) {
      am = a[m];
      um = u[m];
    }
  }
  y[int(lane) * N + r] = static_cast<T>(am * chess_round<T>(um));
}
