// What every sparse-input kernel (spin_f.metal, spin_q.metal) does before its main loop, written
// once. Twin of cuda/spin_prologue.cuh, which documents the variants (CHESS_RESIDUAL, CHESS_XNORM,
// CHESS_YNORM, CHESS_ROPE) and NT: read the inputs of its variant, declare the threadgroup's
// memory, and compact the chunk's surviving inputs (chess_compact). sparse_gemv.read_source puts
// this text where a kernel body says #include "spin_prologue.metal"; the body defines TILE and VPL
// first, and reads idx, xsh, total, nnz, n0, in_range, tid, lane, warp afterwards. The thread's
// index comes before the rope's angle here, which reads it (the CUDA twin reads threadIdx).
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
const int n0 = tile * TILE + int(lane) * VPL;
const bool in_range = n0 < N;
int nnz = 0;
const bool thr = tile * TILE < NT;  // a split launch's tiles past NT take x as it is
const int total = chess_compact<M, K, KC, TPC>(x, t, xg, eps, wss, thr, chunk * KC, idx, xsh, wcount, wnnz, &nnz, tid,
                                               lane, warp);
