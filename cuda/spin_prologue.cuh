// What every sparse-input kernel (spin_f.cu, spin_q.cu) does before its main loop, written once:
// read the inputs of its variant, declare the block's shared memory, and compact the chunk's
// surviving inputs (chess_compact). sparse_gemv.read_source puts this text where a kernel body
// says #include "spin_prologue.cuh" (MLX compiles a body, not files); the body defines TILE (its
// outputs per block) and VPL (outputs per lane) first, and reads idx, xsh, total, nnz, n0,
// in_range afterwards. Twin: metal/spin_prologue.metal.
//
// The variants (sparse_gemv.VARIANTS: a base kernel with these defined, one source per kernel):
// - CHESS_RESIDUAL (the "_res" kernels, one more input r of y's shape): y = round(r +
//   round(product)), the block's residual add fused into the epilogue (one graph node fewer per
//   layer and token).
// - CHESS_XNORM (the "_xnorm" kernels, one more input gx of K, template EPSB): x is the input of
//   an RMSNorm (weight gx, eps the float with bits EPSB) that the kernel applies itself before the
//   threshold (chess_rms_scales in chess_compact): the norm's launch is saved (q's head launch
//   takes the block's input).
// - CHESS_YNORM (the "_res_ynorm" kernels, with CHESS_RESIDUAL: one more input gy of N, one more
//   output yn of y's shape, template EPSB): yn = RMSNorm(y) (weight gy), written by the last tile
//   to finish (chess_spin_finish; sem then needs tiles + 2 zeros): o's launch gives the block's
//   residual stream and the post-attention norm's output.
// - CHESS_ROPE (the "_rope" kernels; two more inputs: rp, int32 >= 4 entries, the position in
//   rp[0], and rf, float32 ROPE_D / 2 inverse frequencies; template ROPE_D, ROPE_N, ROPE_TRAD,
//   ROPE_SB = the bits of the float32 scale): MLX's rope of y's first ROPE_N outputs, heads of
//   ROPE_D, applied by each tile's last block to the rounded outputs (chess_spin_finish): q's and
//   k's heads leave the split launch rotated, one launch fewer per layer. Not with CHESS_RESIDUAL /
//   CHESS_YNORM. Each thread computes its angle here, so the loads are not in the tail.
// NT (a template, a multiple of TILE, 0 < NT <= N): outputs [0, NT) take the thresholded x, [NT, N)
// x as it is, so one launch serves a thresholded projection and dense ones on the same input, their
// W^T side by side (sparse_gemv.sparse_input with nt: q with k and v); a plain launch has NT = N.
// The density counts tile 0's inputs, i.e. the thresholded ones.
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
const int n0 = tile * TILE + lane * VPL;
const bool in_range = n0 < N;
int nnz = 0;
const bool thr = tile * TILE < NT;  // a split launch's tiles past NT take x as it is
const int total = chess_compact<M, K, KC, TPC>(x, t, xg, eps, wss, thr, chunk * KC, idx, xsh, wcount, wnnz, &nnz);
