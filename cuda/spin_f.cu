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
// With CHESS_RESIDUAL defined (sparse_gemv's "_res" kernels, one more input r of y's shape):
// y = round(r + round(product)), the block's residual add fused into the epilogue (one graph node
// fewer per layer and token).
// With CHESS_XNORM defined (the "_xnorm" kernels, one more input gx of K, template EPSB): x is the
// input of an RMSNorm (weight gx, eps the float with bits EPSB) that the kernel applies itself
// before the threshold (chess_rms_scales in chess_compact): the norm's launch is saved (q's head launch
// takes the block's input). With CHESS_YNORM (the "_res_ynorm" kernels, with CHESS_RESIDUAL: one
// more input gy of N, one more output yn of y's shape, template EPSB): yn = RMSNorm(y) (weight gy),
// written by the last tile to finish (chess_spin_finish; sem then needs tiles + 2 zeros): o's launch
// gives the block's residual stream and the post-attention norm's output.
// With CHESS_ROPE (the "_rope" kernels; two more inputs: rp, int32 >= 4 entries, the position in
// rp[0], and rf, float32 ROPE_D / 2 inverse frequencies; template ROPE_D, ROPE_N, ROPE_TRAD,
// ROPE_SB = the bits of the float32 scale): MLX's rope of y's first ROPE_N outputs, heads of ROPE_D,
// applied by each tile's last block to the rounded outputs (chess_spin_finish): q's and k's heads
// leave the split launch rotated, one launch fewer per layer. Not with CHESS_RESIDUAL / CHESS_YNORM.
// Template: T, M, K, N, KC, TPC, NT. Grid: (ceil(N/256)*256, ceil(K/KC)) threads, threadgroup 256.
// Needs N % 8 == 0, KC <= 512.
// NT (a multiple of TILE, 0 < NT <= N): outputs [0, NT) take the thresholded x, [NT, N) x as it is,
// so one launch serves a thresholded projection and dense ones on the same input, their W^T side by
// side (sparse_gemv.sparse_input with nt: q with k and v); a plain launch has NT = N. The density
// counts tile 0's inputs, i.e. the thresholded ones.
constexpr int TILE = 256;
constexpr int U = 4;  // rows in flight per warp: 48 registers, 5 blocks per SM (U = 8: 64, 4); speed equal within noise (RESULTS.md session 6)
#ifdef CHESS_RESIDUAL
const T* res = r;
#else
const T* res = nullptr;
#endif
#ifdef CHESS_XNORM
const T* xg = gx;
#else
const T* xg = nullptr;
#endif
#ifdef CHESS_YNORM
const T* yg = gy;
T* ynorm = yn;
#else
const T* yg = nullptr;
T* ynorm = nullptr;
#endif
#if defined(CHESS_XNORM) || defined(CHESS_YNORM)
const float eps = __int_as_float(EPSB);
#else
const float eps = 0.0f;
#endif
#ifdef CHESS_ROPE
constexpr int RD = ROPE_D, RN = ROPE_N, RT = ROPE_TRAD;
const float theta = chess_rope_theta<RD, RT>(rp, rf, __int_as_float(ROPE_SB));  // loaded now, used in the tail
#else
constexpr int RD = 0, RN = 0, RT = 0;
const float theta = 0.0f;
#endif
__shared__ float wss[8 * M];
__shared__ int idx[KC];
__shared__ float xsh[M * KC];
__shared__ int wcount[8 * ((KC + 255) / 256)];
__shared__ int wnnz[8 * ((KC + 255) / 256)];
__shared__ int flag;
__shared__ __align__(16) float red[8][TILE];
const int lane = threadIdx.x & 31;
const int warp = threadIdx.x >> 5;
const int tile = blockIdx.x;
const int chunk = blockIdx.y;
const int n0 = tile * TILE + lane * 8;
const bool in_range = n0 < N;
int nnz = 0;
const bool thr = tile * TILE < NT;  // a split launch's tiles past NT take x as it is
const int total = chess_compact<M, K, KC, TPC>(x, t, xg, eps, wss, thr, chunk * KC, idx, xsh, wcount, wnnz, &nnz);
float acc[M][8];
#pragma unroll
for (int m = 0; m < M; ++m)
#pragma unroll
  for (int e = 0; e < 8; ++e) acc[m][e] = 0.0f;
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
chess_spin_finish<T, M, N, K, KC, 8, RD, RN, RT>(acc, zero, partial, y, dens, sem, nnz, red, &flag, res, yg, ynorm, eps, theta);
