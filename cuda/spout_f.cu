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
const bool valid = r < N;
bool active = false;
#pragma unroll
for (int m = 0; m < M; ++m) active |= valid && (static_cast<float>(a[m * N + r]) != 0.0f);
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
#pragma unroll
for (int m = 0; m < M; ++m) {
  const float s = chess_warp_sum(acc[m]);
  if (lane == 0) red[warp][m] = s;
}
__syncthreads();
if (valid && part == 0 && lane < M) {
  float s = 0.0f;
#pragma unroll
  for (int p = 0; p < WPR; ++p) s += red[warp + p][lane];
  y[lane * N + r] = static_cast<T>(s * static_cast<float>(a[lane * N + r]));
}
