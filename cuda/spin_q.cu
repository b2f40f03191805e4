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
// Template: T, M, K, N, BITS, GS, KC (<= 512), WORDS, TPC, NT. Grid: (ceil(N/TILE)*256, ceil(K/KC)),
// threadgroup 256. Needs N % (4*32/BITS) == 0.
// NT (a multiple of TILE, 0 < NT <= N): outputs [0, NT) take the thresholded x, [NT, N) x as it is,
// so one launch serves a thresholded projection and dense ones on the same input, their W^T side by
// side (sparse_gemv.sparse_input with nt: q with k and v); a plain launch has NT = N. The density
// counts tile 0's inputs, i.e. the thresholded ones.
constexpr int VPW = 32 / BITS;
constexpr int VPL = WORDS * VPW;
constexpr int TILE = 32 * VPL;
constexpr int U = 4;
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
const T* scales = sb;
const T* biases = sb + (size_t)K * (N / GS);
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
const int n0 = tile * TILE + lane * VPL;
const bool in_range = n0 < N;
int nnz = 0;
const bool thr = tile * TILE < NT;  // a split launch's tiles past NT take x as it is
const int total = chess_compact<M, K, KC, TPC>(x, t, xg, eps, wss, thr, chunk * KC, idx, xsh, wcount, wnnz, &nnz);
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
