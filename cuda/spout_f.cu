// Sparse-output GEMV, float16/bfloat16 weights, fused with the gate product (up_proj under CATS/CHESS).
//   y[m, r] = a[m, r] * dot(w[r, :], x[m, :])  for rows r with any a[:, r] != 0,  else 0.
// Layout: w (N, K) row-major (MLX's nn.Linear weight). One warp per output row; inactive rows
// cost one read of a[:, r]. Lanes read 16 bytes of the row at a time; x comes through L1.
// Template: T, M (tokens), K, N. Grid: N*32 threads, threadgroup 256. Needs K % 8 == 0.
const int lane = threadIdx.x & 31;
const int r = (int)((blockIdx.x * blockDim.x + threadIdx.x) >> 5);
if (r >= N) return;
float gate[M];
bool active = false;
#pragma unroll
for (int m = 0; m < M; ++m) {
  gate[m] = static_cast<float>(a[m * N + r]);
  active |= (gate[m] != 0.0f);
}
if (!active) {
  if (lane < M) y[lane * N + r] = static_cast<T>(0.0f);
  return;
}
float acc[M];
#pragma unroll
for (int m = 0; m < M; ++m) acc[m] = 0.0f;
constexpr int V = K / 8;
const uint4* wrow = reinterpret_cast<const uint4*>(w + (size_t)r * K);
#pragma unroll 4
for (int v = lane; v < V; v += 32) {
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
#pragma unroll
for (int m = 0; m < M; ++m) {
  const float s = chess_warp_sum(acc[m]);
  if (lane == m) y[m * N + r] = static_cast<T>(s * gate[m]);
}
