// Sparse-input GEMV with the input threshold fused in, MLX affine-quantized weights in the
// transposed ("input-major") layout.
// Twin of cuda/spin_q.cu: wt (K, N*BITS/32) = quantize(W^T) grouped along outputs, scales/biases
// (K, N/GS) packed as sb = [scales; biases]; same tiling and compaction as spin_f; each lane owns WORDS words (VPL outputs inside
// one group): acc_e += (x*s) * (q_e - OFF), accb += x*(b + OFF*s), U rows at a time by
// ChessSpinQ (half2 products for half, float32 for bfloat16); same epilogue as spin_f (chess_spin_finish).
// after: the previous launch's output y at this call site. Never read: an input only so that
// MLX's graph orders the two launches (they share sem and partial, the site's float32 split-K
// scratch of >= ceil(K/KC) * M * N; see sparse_gemv.Workspace).
// The variants (CHESS_RESIDUAL, CHESS_XNORM, CHESS_YNORM, CHESS_ROPE) and NT: spin_prologue.metal.
// Template: T, M, K, N, BITS, GS, KC, WORDS, TPC, NT. Grid: (ceil(N/TILE)*256, ceil(K/KC)), threadgroup 256.
constexpr int VPW = 32 / BITS;
constexpr int VPL = WORDS * VPW;
constexpr int TILE = 32 * VPL;
constexpr int U = 4;
const device T* scales = sb;
const device T* biases = sb + K * (N / GS);
#include "spin_prologue.metal"
float acc[M][VPL];
float accb[M];
for (int m = 0; m < M; ++m) {
  accb[m] = 0.0f;
  for (int e = 0; e < VPL; ++e) acc[m][e] = 0.0f;
}
for (int i0 = int(warp); i0 < total; i0 += 8 * U) {
  uint32_t words[U][WORDS];
  float sc[U], bi[U], xv[U][M];
  for (int u = 0; u < U; ++u) {
    const int e = i0 + 8 * u;
    const int j = e < total ? idx[e] : -1;
    const bool ok = j >= 0 && in_range;
    if (ok) {
      chess_load_words<WORDS>(wt + j * (N / VPW) + n0 / VPW, words[u]);
      sc[u] = float(scales[j * (N / GS) + n0 / GS]);
      bi[u] = float(biases[j * (N / GS) + n0 / GS]);
    } else {
      for (int w = 0; w < WORDS; ++w) words[u][w] = 0u;
      sc[u] = 0.0f;
      bi[u] = 0.0f;
    }
    for (int m = 0; m < M; ++m) xv[u][m] = ok ? xsh[m * KC + (ok ? e : 0)] : 0.0f;  // no read past the chunk
  }
  if (in_range) ChessSpinQ<T, M, BITS, WORDS, U>::rows(words, sc, bi, xv, acc, accb);
}
chess_spin_finish<T, M, N, K, KC, VPL, RD, RN, RT>(acc, accb, partial, y, dens, sem, nnz, red, &flag, tid, lane, warp, tile, chunk,
                                  int(threadgroups_per_grid.x), res, yg, ynorm, eps, theta);
