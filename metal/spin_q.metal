// Sparse-input GEMV, MLX affine-quantized weights in the transposed ("input-major") layout.
// Twin of cuda/spin_q.cu: wt (K, N*BITS/32) = quantize(W^T) grouped along outputs, scales/biases
// (K, N/GS); same tiling and compaction as spin_f; each lane owns WORDS words (VPL outputs inside
// one group): acc_e += (x*s) * q_e, accb += x*b.
// Template: T, M, K, N, BITS, GS, KC, WORDS. Grid: (ceil(N/TILE)*256, ceil(K/KC)), threadgroup 256.
constexpr int VPW = 32 / BITS;
constexpr int VPL = WORDS * VPW;
constexpr int TILE = 32 * VPL;
constexpr int U = 4;
threadgroup int idx[KC];
threadgroup int wcount[8];
threadgroup float red[8][TILE];
const uint tid = thread_position_in_threadgroup.x;
const uint lane = thread_index_in_simdgroup;
const uint warp = simdgroup_index_in_threadgroup;
const int tile = int(threadgroup_position_in_grid.x);
const int chunk = int(threadgroup_position_in_grid.y);
const int n0 = tile * TILE + int(lane) * VPL;
const bool in_range = n0 < N;
const int total = chess_compact<T, M, K, KC>(x, chunk * KC, idx, wcount, tid, lane, warp);
float acc[M][VPL];
float accb[M];
for (int m = 0; m < M; ++m) {
  accb[m] = 0.0f;
  for (int e = 0; e < VPL; ++e) acc[m][e] = 0.0f;
}
for (int i0 = int(warp); i0 < total; i0 += 8 * U) {
  uint32_t words[U][WORDS];
  float sc[U], bi[U];
  int jv[U];
  for (int u = 0; u < U; ++u) {
    const int e = i0 + 8 * u;
    jv[u] = e < total ? idx[e] : -1;
    if (jv[u] >= 0 && in_range) {
      chess_load_words<WORDS>(wt + jv[u] * (N / VPW) + n0 / VPW, words[u]);
      sc[u] = float(scales[jv[u] * (N / GS) + n0 / GS]);
      bi[u] = float(biases[jv[u] * (N / GS) + n0 / GS]);
    }
  }
  for (int u = 0; u < U; ++u) {
    if (jv[u] >= 0 && in_range) {
      for (int m = 0; m < M; ++m) {
        const float xj = float(x[m * K + jv[u]]);
        const float xs = xj * sc[u];
        accb[m] += xj * bi[u];
        for (int e = 0; e < VPL; ++e)
          acc[m][e] += xs * chess_qfloat<BITS>(words[u][e / VPW], BITS * (e % VPW));
      }
    }
  }
}
chess_store_partial<M, N, VPL>(acc, accb, partial, tile, chunk, red, tid, lane, warp);
