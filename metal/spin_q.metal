// Sparse-input GEMV with the input threshold fused in, MLX affine-quantized weights in the
// transposed ("input-major") layout.
// Twin of cuda/spin_q.cu: wt (K, N*BITS/32) = quantize(W^T) grouped along outputs, scales/biases
// (K, N/GS) packed as sb = [scales; biases]; same tiling and compaction as spin_f; each lane owns WORDS words (VPL outputs inside
// one group): acc_e += (x*s) * (q_e - OFF), accb += x*(b + OFF*s), U rows at a time by
// ChessSpinQ (half2 products for half, float32 for bfloat16); same epilogue as spin_f (chess_spin_finish).
// after: the previous launch's output y at this call site. Never read: an input only so that
// MLX's graph orders the two launches (they share sem and partial, the site's float32 split-K
// scratch of >= ceil(K/KC) * M * N; see sparse_gemv.Workspace).
// With CHESS_RESIDUAL defined (sparse_gemv's "_res" kernels, one more input r of y's shape):
// y = round(r + round(product)), the block's residual add fused into the epilogue (one graph node
// fewer per layer and token).
// With CHESS_XNORM (one more input gx of K, template EPSB): x's RMSNorm (weight gx) applied in the
// kernel before the threshold; with CHESS_YNORM (and CHESS_RESIDUAL; one more input gy of N, one
// more output yn, template EPSB): yn = RMSNorm(y), by the last tile to finish (as the CUDA twin).
// With CHESS_ROPE (two more inputs rp, rf; template ROPE_D, ROPE_N, ROPE_TRAD, ROPE_SB): MLX's rope
// of y's first ROPE_N outputs, by each tile's last threadgroup (as the CUDA twin).
// Template: T, M, K, N, BITS, GS, KC, WORDS, TPC, NT. Grid: (ceil(N/TILE)*256, ceil(K/KC)), threadgroup 256.
// NT (a multiple of TILE, 0 < NT <= N): outputs [0, NT) take the thresholded x, [NT, N) x as it is,
// so one launch serves a thresholded projection and dense ones on the same input, their W^T side by
// side (sparse_gemv.sparse_input with nt: q with k and v); a plain launch has NT = N. The density
// counts tile 0's inputs, i.e. the thresholded ones.
constexpr int VPW = 32 / BITS;
constexpr int VPL = WORDS * VPW;
constexpr int TILE = 32 * VPL;
constexpr int U = 4;
#ifdef CHESS_RESIDUAL
const device T* res = r;
#else
const device T* res = nullptr;
#endif
#ifdef CHESS_XNORM
const device T* xg = gx;
#else
const device T* xg = nullptr;
#endif
#ifdef CHESS_YNORM
const device T* yg = gy;
device T* ynorm = yn;
#else
const device T* yg = nullptr;
device T* ynorm = nullptr;
#endif
#if defined(CHESS_XNORM) || defined(CHESS_YNORM)
const float eps = as_type<float>(int(EPSB));
#else
const float eps = 0.0f;
#endif
threadgroup float wss[8 * M];
const device T* scales = sb;
const device T* biases = sb + K * (N / GS);
threadgroup int idx[KC];
threadgroup float xsh[M * KC];
threadgroup int wcount[8 * ((KC + 255) / 256)];
threadgroup int wnnz[8 * ((KC + 255) / 256)];
threadgroup int flag;
threadgroup float4 red_v[8][TILE / 4];  // float4-aligned for 16-byte stores
threadgroup float (*red)[TILE] = (threadgroup float (*)[TILE])red_v;
const uint tid = thread_position_in_threadgroup.x;
#ifdef CHESS_ROPE
constexpr int RD = ROPE_D, RN = ROPE_N, RT = ROPE_TRAD;
const float theta = chess_rope_theta<RD, RT>(rp, rf, as_type<float>(int(ROPE_SB)), tid);  // loaded now, used in the tail
#else
constexpr int RD = 0, RN = 0, RT = 0;
const float theta = 0.0f;
#endif
const uint lane = thread_index_in_simdgroup;
const uint warp = simdgroup_index_in_threadgroup;
const int tile = int(threadgroup_position_in_grid.x);
const int chunk = int(threadgroup_position_in_grid.y);
const int n0 = tile * TILE + int(lane) * VPL;
const bool in_range = n0 < N;
int nnz = 0;
const bool thr = tile * TILE < NT;  // a split launch's tiles past NT take x as it is
const int total = chess_compact<M, K, KC, TPC>(x, t, xg, eps, wss, thr, chunk * KC, idx, xsh, wcount, wnnz, &nnz, tid,
                                               lane, warp);
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
