// Fused gate + channel threshold + sparse-output up_proj (the CATS/CHESS FFN front), float16/bfloat16:
//   g = round(w_gate[r, :] . x[m, :]),  a = round(g * round(sigmoid(g))),  keep = |a| >= t
//   y[m, r] = keep ? round(a * round(w_up[r, :] . x[m, :])) : 0       (t = t[r] if TPC else t[0])
// round() is a cast to T wherever the op-by-op graph stores a T, so both paths give the same
// numbers. One launch replaces four graph nodes (gate GEMV, SiLU + threshold, up GEMV, product).
// Layout: w (2N, K) row-major = [w_gate; w_up] (one input: the rows stacked once, gate then up). A block of 8 warps covers 8/WPR rows; the WPR warps of a
// row split it (lanes read 16 bytes at a time, WPR*32 lanes in step) and reduce through shared
// memory (chess_row_sums). The gate row is always read; the up row only if some token keeps r.
// Template: T, M, K, N, WPR, TPC. Grid: ceil(N / (8/WPR)) * 256 threads, threadgroup 256.
// Needs K % 8 == 0.
constexpr int RPB = 8 / WPR;
const T* wg = w;
const T* wu = w + (size_t)N * K;
__shared__ float red[8][M];
const int lane = threadIdx.x & 31;
const int warp = threadIdx.x >> 5;
const int part = warp % WPR;
const int r = (int)blockIdx.x * RPB + warp / WPR;
float acc[M];
#pragma unroll
for (int m = 0; m < M; ++m) acc[m] = 0.0f;
if (r < N) chess_row_dot<T, M, K, WPR>(wg + (size_t)r * K, x, part, acc);
float g[M];
chess_row_sums<M, WPR>(acc, red, g);
float a[M];
bool active = false;
#pragma unroll
for (int m = 0; m < M; ++m) {
  const float gr = chess_round<T>(g[m]);
  a[m] = chess_round<T>(gr * chess_round<T>(1.0f / (1.0f + expf(-gr))));
  const bool keep = r < N && fabsf(a[m]) >= static_cast<float>(t[TPC ? r : 0]);
  if (!keep) a[m] = 0.0f;
  active |= keep;
  acc[m] = 0.0f;
}
if (active) chess_row_dot<T, M, K, WPR>(wu + (size_t)r * K, x, part, acc);
float u[M];
chess_row_sums<M, WPR>(acc, red, u);
if (r < N && part == 0 && lane < M) {
  float am = 0.0f, um = 0.0f;
#pragma unroll
  for (int m = 0; m < M; ++m) {
    if (m == lane) {
      am = a[m];
      um = u[m];
    }
  }
  y[(size_t)lane * N + r] = static_cast<T>(am * chess_round<T>(um));
}
