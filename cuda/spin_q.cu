// Sparse-input GEMV, MLX affine-quantized weights in the transposed ("input-major") layout:
// wt (K, N*BITS/32) uint32 = quantize(W^T) with groups of GS consecutive *outputs*, scales/biases
// (K, N/GS). An input channel j is one contiguous row of packed words + N/GS scales and biases, so a
// zero x[:, j] costs no bytes.   y[m, n] = sum_j x[m, j] * (scale[j, n/GS] * q[j, n] + bias[j, n/GS]).
// Same tiling as spin_f: 8 warps, split-K chunks of KC rows, U rows in flight per warp; each lane
// owns WORDS consecutive words (VPL = WORDS*32/BITS outputs, all inside one group).
// Template: T, M, K, N, BITS, GS, KC, WORDS. Grid: (ceil(N/TILE)*256, ceil(K/KC)), threadgroup 256.
// Needs N % (4*32/BITS) == 0.
constexpr int VPW = 32 / BITS;
constexpr int VPL = WORDS * VPW;
constexpr int TILE = 32 * VPL;
constexpr int U = 4;
constexpr uint32_t MASK = (1u << BITS) - 1u;
const int lane = threadIdx.x & 31;
const int warp = threadIdx.x >> 5;
const int tile = blockIdx.x;
const int chunk = blockIdx.y;
const int n0 = tile * TILE + lane * VPL;
const bool in_range = n0 < N;
const int k_begin = chunk * KC;
float acc[M][VPL];
#pragma unroll
for (int m = 0; m < M; ++m)
#pragma unroll
  for (int e = 0; e < VPL; ++e) acc[m][e] = 0.0f;
for (int i = warp; i < KC; i += 8 * U) {
  uint32_t words[U][WORDS];
  float xv[U][M];
  float sc[U], bi[U];
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
    if (act[u] && in_range) {
      chess_load_words<WORDS>(wt + (size_t)j * (N / VPW) + n0 / VPW, words[u]);
      sc[u] = static_cast<float>(scales[(size_t)j * (N / GS) + n0 / GS]);
      bi[u] = static_cast<float>(biases[(size_t)j * (N / GS) + n0 / GS]);
    }
  }
#pragma unroll
  for (int u = 0; u < U; ++u) {
    if (act[u] && in_range) {
#pragma unroll
      for (int m = 0; m < M; ++m) {
        const float xs = xv[u][m] * sc[u];
        const float xb = xv[u][m] * bi[u];
#pragma unroll
        for (int e = 0; e < VPL; ++e) {
          const float q = (float)((words[u][e / VPW] >> (BITS * (e % VPW))) & MASK);
          acc[m][e] += xs * q + xb;
        }
      }
    }
  }
}
__shared__ float red[8][TILE];
#pragma unroll
for (int m = 0; m < M; ++m) {
#pragma unroll
  for (int e = 0; e < VPL; ++e) red[warp][lane * VPL + e] = acc[m][e];
  __syncthreads();
  for (int t = threadIdx.x; t < TILE; t += 256) {
    float s = 0.0f;
#pragma unroll
    for (int w8 = 0; w8 < 8; ++w8) s += red[w8][t];
    const int n = tile * TILE + t;
    if (n < N) partial[((size_t)chunk * M + m) * N + n] = s;
  }
  __syncthreads();
}
