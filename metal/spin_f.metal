// Sparse-input GEMV with the input threshold fused in, float16/bfloat16 weights. Twin of
// cuda/spin_f.cu: wt (K, N) = W^T row-major; threadgroup = 8 simdgroups on a tile of 256 outputs x a
// chunk of KC inputs; ordered compaction of the chunk's surviving inputs (|x| >= t); each simdgroup
// takes every 8th active row, U at a time; each lane owns 8 consecutive outputs; reduction through
// threadgroup memory into partial[chunk, m, n], the tile's last chunk sums the chunks into y and
// tile 0 writes dens (chess_spin_finish; sem >= tiles + 1 int32 zeros).
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
// Template: T, M, K, N, KC, TPC, NT. Grid: (ceil(N/256)*256, ceil(K/KC)), threadgroup (256, 1).
// NT (a multiple of TILE, 0 < NT <= N): outputs [0, NT) take the thresholded x, [NT, N) x as it is,
// so one launch serves a thresholded projection and dense ones on the same input, their W^T side by
// side (sparse_gemv.sparse_input with nt: q with k and v); a plain launch has NT = N. The density
// counts tile 0's inputs, i.e. the thresholded ones.
constexpr int TILE = 256;
constexpr int U = 4;  // rows in flight per warp: 48 registers, 5 blocks per SM (U = 8: 64, 4); speed equal within noise (RESULTS.md session 6)
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
const int n0 = tile * TILE + int(lane) * 8;
const bool in_range = n0 < N;
int nnz = 0;
const bool thr = tile * TILE < NT;  // a split launch's tiles past NT take x as it is
const int total = chess_compact<M, K, KC, TPC>(x, t, xg, eps, wss, thr, chunk * KC, idx, xsh, wcount, wnnz, &nnz, tid,
                                               lane, warp);
float acc[M][8];
for (int m = 0; m < M; ++m)
  for (int e = 0; e < 8; ++e) acc[m][e] = 0.0f;
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
chess_spin_finish<T, M, N, K, KC, 8, RD, RN, RT>(acc, zero, partial, y, dens, sem, nnz, red, &flag, tid, lane, warp, tile, chunk,
                                  int(threadgroups_per_grid.x), res, yg, ynorm, eps, theta);
