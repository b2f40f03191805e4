// Sparse-input GEMV with the input threshold fused in, float16/bfloat16 weights. Twin of
// cuda/spin_f.cu: wt (K, N) = W^T row-major; threadgroup = 8 simdgroups on a tile of 256 outputs x a
// chunk of KC inputs; ordered compaction of the chunk's surviving inputs (|x| >= t); each simdgroup
// takes every 8th active row, U at a time; each lane owns 8 consecutive outputs; reduction through
// threadgroup memory into partial[chunk, m, n], the tile's last chunk sums the chunks into y and
// tile 0 writes dens (chess_spin_finish; sem >= tiles + 1 int32 zeros).
// after: the previous launch's output y at this call site. Never read: an input only so that
// MLX's graph orders the two launches (they share sem and partial, the site's float32 split-K
// scratch of >= ceil(K/KC) * M * N; see sparse_gemv.Workspace).
// The variants (CHESS_RESIDUAL, CHESS_XNORM, CHESS_YNORM, CHESS_ROPE) and NT: spin_prologue.metal.
// Template: T, M, K, N, KC, TPC, NT. Grid: (ceil(N/256)*256, ceil(K/KC)), threadgroup (256, 1).
constexpr int VPL = 8;  // outputs per lane: one 16-byte load of a row
constexpr int TILE = 32 * VPL;
constexpr int U = 4;  // rows in flight per warp: 48 registers, 5 blocks per SM (U = 8: 64, 4); speed equal within noise (RESULTS.md session 6)
#include "spin_prologue.metal"
float acc[M][VPL];
for (int m = 0; m < M; ++m)
  for (int e = 0; e < VPL; ++e) acc[m][e] = 0.0f;
for (int i0 = int(warp); i0 < total; i0 += 8 * U) {
  uint4 wv[U];
  int jv[U];
  for (int u = 0; u < U; ++u) {
    const int e = i0 + 8 * u;
    jv[u] = e < total ? idx[e] : -1;
    if (jv[u] >= 0 && in_range) wv[u] = *((const device uint4*)(wt + jv[u] * N + n0));
  }
  for (int u = 0; u < U; ++u) {
    if (jv[u] >= 0 && in_range) {
      float wf[8];
      chess_unpack8<T>(wv[u], wf);
      for (int m = 0; m < M; ++m) {
        const float xj = xsh[m * KC + i0 + 8 * u];
        for (int e = 0; e < 8; ++e) acc[m][e] += xj * wf[e];
      }
    }
  }
}
const float zero[M] = {};
chess_spin_finish<T, M, N, K, KC, VPL, RD, RN, RT>(acc, zero, partial, y, dens, sem, nnz, red, &flag, tid, lane, warp, tile, chunk,
                                  int(threadgroups_per_grid.x), res, yg, ynorm, eps, theta);
