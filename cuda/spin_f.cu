// Sparse-input GEMV, float16/bfloat16 weights: y[m, :] = sum_{j: x[m, j] != 0} x[m, j] * wt[j, :].
// Layout: wt (K, N) = W^T row-major, so an input channel j is one contiguous row and a zero x[:, j]
// costs no weight bytes. Block = 8 warps on a tile of 256 outputs and a chunk of KC inputs (split-K);
// each lane owns 8 consecutive outputs (one 16-byte load per row); each warp walks every 8th row of
// the chunk, U rows at a time with the loads issued before the FMAs. The 8 warps reduce through
// shared memory into partial[chunk, m, n]; spin_reduce sums the chunks.
// Template: T, M, K, N, KC. Grid: (ceil(N/256)*256, ceil(K/KC)) threads, threadgroup (256, 1).
// Needs N % 8 == 0.
constexpr int TILE = 256;
constexpr int U = 4;
const int lane = threadIdx.x & 31;
const int warp = threadIdx.x >> 5;
const int tile = blockIdx.x;
const int chunk = blockIdx.y;
const int n0 = tile * TILE + lane * 8;
const bool in_range = n0 < N;
const int k_begin = chunk * KC;
float acc[M][8];
#pragma unroll
for (int m = 0; m < M; ++m)
#pragma unroll
  for (int e = 0; e < 8; ++e) acc[m][e] = 0.0f;
for (int i = warp; i < KC; i += 8 * U) {
  uint4 wv[U];
  float xv[U][M];
  bool act[U];
#pragma unroll
  for (int u = 0; u < U; ++u) {
    const int jj = i + 8 * u;
    const int j = k_begin + jj;
    act[u] = false;
#pragma unroll
    for (int m = 0; m < M; ++m) {
      xv[u][m] = (jj < KC && j < K) ? static_cast<float>(x[(size_t)m * K + j]) : 0.0f;
      act[u] |= (xv[u][m] != 0.0f);
    }
    if (act[u] && in_range) wv[u] = *reinterpret_cast<const uint4*>(wt + (size_t)j * N + n0);
  }
#pragma unroll
  for (int u = 0; u < U; ++u) {
    if (act[u] && in_range) {
      float wf[8];
      chess_unpack8<T>(wv[u], wf);
#pragma unroll
      for (int m = 0; m < M; ++m)
#pragma unroll
        for (int e = 0; e < 8; ++e) acc[m][e] += xv[u][m] * wf[e];
    }
  }
}
__shared__ float red[8][TILE];
#pragma unroll
for (int m = 0; m < M; ++m) {
#pragma unroll
  for (int e = 0; e < 8; ++e) red[warp][lane * 8 + e] = acc[m][e];
  __syncthreads();
  float s = 0.0f;
#pragma unroll
  for (int w8 = 0; w8 < 8; ++w8) s += red[w8][threadIdx.x];
  const int n = tile * TILE + (int)threadIdx.x;
  if (n < N) partial[((size_t)chunk * M + m) * N + n] = s;
  __syncthreads();
}
