// Sparse-input GEMV, float16/bfloat16 weights, with the input threshold fused in:
//   y[m, :] = sum_{j: |x[m, j]| >= t} x[m, j] * wt[j, :]   (t = t[j] if TPC else t[0]; t = 0: plain)
// Layout: wt (K, N) = W^T row-major, so an input channel j is one contiguous row and a dropped
// x[:, j] costs no weight bytes. Block = 8 warps on a tile of 256 outputs and a chunk of KC inputs
// (split-K). The block first compacts its chunk's surviving inputs and their thresholded values
// into shared memory (chess_compact), then each warp takes every 8th active row, U rows at a time
// with all U 16-byte loads issued before the FMAs; each lane owns 8 consecutive outputs. chess_spin_finish reduces
// the 8 warps into partial[chunk, m, n], and the tile's last chunk block sums the chunks into y;
// dens[0] = fraction of non-zero (m, j) inputs. sem: int32 workspace of >= tiles + 1 zeros.
// after: the previous launch's output y at this call site. Never read: an input only so that
// MLX's graph orders the two launches (they share sem and partial, the site's float32 split-K
// scratch of >= ceil(K/KC) * M * N; see sparse_gemv.Workspace).
// The variants (CHESS_RESIDUAL, CHESS_XNORM, CHESS_YNORM, CHESS_ROPE) and NT: spin_prologue.cuh.
// Template: T, M, K, N, KC, TPC, NT. Grid: (ceil(N/256)*256, ceil(K/KC)) threads, threadgroup 256.
// Needs N % 8 == 0, KC <= 512.
constexpr int VPL = 8;  // outputs per lane: one 16-byte load of a row
constexpr int TILE = 32 * VPL;
constexpr int U = 4;  // rows in flight per warp: 48 registers, 5 blocks per SM (U = 8: 64, 4); speed equal within noise (RESULTS.md session 6)
#include "spin_prologue.cuh"
float acc[M][VPL];
#pragma unroll
for (int m = 0; m < M; ++m)
#pragma unroll
  for (int e = 0; e < VPL; ++e) acc[m][e] = 0.0f;
for (int i0 = warp; i0 < total; i0 += 8 * U) {
  uint4 wv[U];
  int jv[U];
#pragma unroll
  for (int u = 0; u < U; ++u) {
    const int e = i0 + 8 * u;
    jv[u] = e < total ? idx[e] : -1;
    if (jv[u] >= 0 && in_range) wv[u] = *reinterpret_cast<const uint4*>(wt + (size_t)jv[u] * N + n0);
  }
#pragma unroll
  for (int u = 0; u < U; ++u) {
    if (jv[u] >= 0 && in_range) {
      float wf[8];
      chess_unpack8<T>(wv[u], wf);
#pragma unroll
      for (int m = 0; m < M; ++m) {
        const float xj = xsh[m * KC + i0 + 8 * u];
#pragma unroll
        for (int e = 0; e < 8; ++e) acc[m][e] += xj * wf[e];
      }
    }
  }
}
const float zero[M] = {};
chess_spin_finish<T, M, N, K, KC, VPL, RD, RN, RT>(acc, zero, partial, y, dens, sem, nnz, red, &flag, res, yg, ynorm, eps, theta);
