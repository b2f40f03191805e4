// Sparse-input GEMV with the input threshold fused in (as spin_f), MLX affine-quantized weights
// in the transposed ("input-major") layout:
// wt (K, N*BITS/32) uint32 = quantize(W^T) with groups of GS consecutive *outputs*, scales/biases
// (K, N/GS) packed as sb (2K, N/GS) = [scales; biases]. An input channel j is one contiguous row of packed words + N/GS scales and biases, so a
// zero x[:, j] costs no bytes.   y[m, n] = sum_j x[m, j] * (scale[j, n/GS] * q[j, n] + bias[j, n/GS]).
// Same tiling and compaction as spin_f; each lane owns WORDS consecutive words (VPL = WORDS*32/BITS
// outputs, all inside one group), so the bias term is one scalar per lane: acc_e += (x*s) * (q_e - OFF)
// and accb += x*(b + OFF*s), U rows at a time by ChessSpinQ (half2 products for float16, float32
// for bfloat16). Same epilogue as spin_f (chess_spin_finish:
// partials, last-chunk reduction into y, density into dens; sem >= tiles + 1 int32 zeros).
// after: the previous launch's output y at this call site. Never read: an input only so that
// MLX's graph orders the two launches (they share sem and partial, the site's float32 split-K
// scratch of >= ceil(K/KC) * M * N; see sparse_gemv.Workspace).
// The variants (CHESS_RESIDUAL, CHESS_XNORM, CHESS_YNORM, CHESS_ROPE) and NT: spin_prologue.cuh.
// Template: T, M, K, N, BITS, GS, KC (<= 512), WORDS, TPC, NT. Grid: (ceil(N/TILE)*256, ceil(K/KC)),
// threadgroup 256. Needs N % (4*32/BITS) == 0.
constexpr int VPW = 32 / BITS;
constexpr int VPL = WORDS * VPW;
constexpr int TILE = 32 * VPL;
constexpr int U = 4;
const T* scales = sb;
const T* biases = sb + (size_t)K * (N / GS);
#include "spin_prologue.cuh"
float acc[M][VPL];
float accb[M];
#pragma unroll
for (int m = 0; m < M; ++m) {
  accb[m] = 0.0f;
#pragma unroll
  for (int e = 0; e < VPL; ++e) acc[m][e] = 0.0f;
}
for (int i0 = warp; i0 < total; i0 += 8 * U) {
  uint32_t words[U][WORDS];
  float sc[U], bi[U], xv[U][M];
#pragma unroll
  for (int u = 0; u < U; ++u) {
    const int e = i0 + 8 * u;
    const int j = e < total ? idx[e] : -1;
    const bool ok = j >= 0 && in_range;
    if (ok) {
      chess_load_words<WORDS>(wt + (size_t)j * (N / VPW) + n0 / VPW, words[u]);
      sc[u] = static_cast<float>(scales[(size_t)j * (N / GS) + n0 / GS]);
      bi[u] = static_cast<float>(biases[(size_t)j * (N / GS) + n0 / GS]);
    } else {
#pragma unroll
      for (int w = 0; w < WORDS; ++w) words[u][w] = 0u;
      sc[u] = 0.0f;
      bi[u] = 0.0f;
    }
#pragma unroll
    for (int m = 0; m < M; ++m) xv[u][m] = ok ? xsh[m * KC + (ok ? e : 0)] : 0.0f;  // no read past the chunk
  }
  if (in_range) ChessSpinQ<T, M, BITS, WORDS, U>::rows(words, sc, bi, xv, acc, accb);
}
chess_spin_finish<T, M, N, K, KC, VPL, RD, RN, RT>(acc, accb, partial, y, dens, sem, nnz, red, &flag, res, yg, ynorm, eps, theta);
