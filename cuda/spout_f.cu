// Sparse-output GEMV, float16/bfloat16 weights, fused with the gate product (up_proj under CATS/CHESS).
//   y[m, r] = a[m, r] * dot(w[r, :], x[m, :])  for rows r with any a[:, r] != 0,  else 0.
// Layout: w (N, K) row-major (MLX's nn.Linear weight). A block of 8 warps covers 8/WPR rows; the
// WPR warps of a row split it (lanes read 16 bytes at a time, WPR*32 lanes in step), reduce with
// shuffles, then through shared memory. Inactive rows cost one read of a[:, r] per warp.
// Template: T, M (tokens), K, N, WPR (warps per row: 1, 2, 4 or 8).
// Grid: ceil(N / (8/WPR)) * 256 threads, threadgroup 256. Needs K % 8 == 0.
constexpr int RPB = 8 / WPR;
constexpr int V = K / 8;
const int lane = threadIdx.x & 31;
const int warp = threadIdx.x >> 5;
const int part = warp % WPR;
const int r = (int)blockIdx.x * RPB + warp / WPR;
const bool active = chess_row_active<T, M, N>(a, r);
float acc[M];
#pragma unroll
for (int m = 0; m < M; ++m) acc[m] = 0.0f;
if (active) {
  const uint4* wrow = reinterpret_cast<const uint4*>(w + (size_t)r * K);
#pragma unroll 4
  for (int v = part * 32 + lane; v < V; v += 32 * WPR) {
    float wf[8];
    chess_unpack8<T>(wrow[v], wf);
#pragma unroll
    for (int m = 0; m < M; ++m) {
      float xf[8];
      chess_unpack8<T>(reinterpret_cast<const uint4*>(x + (size_t)m * K)[v], xf);
#pragma unroll
      for (int e = 0; e < 8; ++e) acc[m] += wf[e] * xf[e];
    }
  }
}
__shared__ float red[8][M];
chess_finish_rows<T, M, N, WPR>(acc, a, y, r, red);
