// Shared helpers of the chess-mlx sparse GEMV kernels (CUDA). The Metal twin is metal/common.metal.
// Every kernel computes in float32 and reads weights with 16-byte loads where the layout allows.

template <typename T>
__device__ __forceinline__ void chess_unpack8(const uint4& v, float* f);

template <>
__device__ __forceinline__ void chess_unpack8<__half>(const uint4& v, float* f) {
  const __half2* h = reinterpret_cast<const __half2*>(&v);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    float2 t = __half22float2(h[i]);
    f[2 * i] = t.x;
    f[2 * i + 1] = t.y;
  }
}

template <>
__device__ __forceinline__ void chess_unpack8<__nv_bfloat16>(const uint4& v, float* f) {
  const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&v);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    float2 t = __bfloat1622float2(h[i]);
    f[2 * i] = t.x;
    f[2 * i + 1] = t.y;
  }
}

__device__ __forceinline__ float chess_warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Load W consecutive 32-bit words (W = 4, 2 or 1) with one vector load.
template <int W>
__device__ __forceinline__ void chess_load_words(const uint32_t* p, uint32_t* out);
template <>
__device__ __forceinline__ void chess_load_words<4>(const uint32_t* p, uint32_t* out) {
  uint4 v = *reinterpret_cast<const uint4*>(p);
  out[0] = v.x; out[1] = v.y; out[2] = v.z; out[3] = v.w;
}
template <>
__device__ __forceinline__ void chess_load_words<2>(const uint32_t* p, uint32_t* out) {
  uint2 v = *reinterpret_cast<const uint2*>(p);
  out[0] = v.x; out[1] = v.y;
}
template <>
__device__ __forceinline__ void chess_load_words<1>(const uint32_t* p, uint32_t* out) {
  out[0] = *p;
}

// q (a BITS-bit field of a packed word) as float without the quarter-rate I2F instruction:
// (q | 0x4B000000) is the float 2^23 + q exactly, so one full-rate FADD recovers q.
template <int BITS>
__device__ __forceinline__ float chess_qfloat(uint32_t word, int shift) {
  constexpr uint32_t MASK = (1u << BITS) - 1u;
  return __uint_as_float(((word >> shift) & MASK) | 0x4B000000u) - 8388608.0f;
}

// x[m, j] after the input threshold: kept where |x| >= t (t[j] per channel if TPC, else t[0]),
// else 0. A plain sparse input passes t = 0. Compared in float32, as MLX compares |x| with t
// after promoting both to the wider type (a scalar t arrives already in x's dtype).
template <int K, int TPC, typename T, typename TT>
__device__ __forceinline__ float chess_xval(const T* x, const TT* t, int m, int j) {
  const float v = static_cast<float>(x[(size_t)m * K + j]);
  return fabsf(v) >= static_cast<float>(t[TPC ? j : 0]) ? v : 0.0f;
}

// Per-token scales of an RMSNorm fused into the kernel that reads its output: rs[m] =
// rsqrt(mean_j x[m, j]^2 + eps), as mx.fast.rms_norm computes them (float32 sum of squares, then
// rsqrt(sum / K + eps)); the summation order is the block's, so rs may differ from MLX's in the
// last bit. Why: each RMSNorm of a decode step is a launch of its own (~4.8 us on the H100, as
// long as a 50%-sparse 4096-input product, benchmarks/RESULTS.md session 20). g null: no norm,
// rs = 1 and no barrier. wsum: shared float[8 * M]. All 256 threads must call it. K % 8 == 0.
// rs[m] = rsqrt(sum of s[m] over the block / n + eps): each thread's partial sums of squares summed
// over its warp, then over the 8 warps in order through wsum (shared float[8 * M]); one barrier.
// The fused RMSNorms' scales (chess_rms_scales, chess_spin_finish). All 256 threads must call it.
template <int M>
__device__ __forceinline__ void chess_block_rms(float* s, float* wsum, int n, float eps, float* rs) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int m = 0; m < M; ++m) {
    s[m] = chess_warp_sum(s[m]);
    if (lane == 0) wsum[8 * m + warp] = s[m];
  }
  __syncthreads();
#pragma unroll
  for (int m = 0; m < M; ++m) {
    float tot = 0.0f;
#pragma unroll
    for (int w = 0; w < 8; ++w) tot += wsum[8 * m + w];
    rs[m] = rsqrtf(tot / (float)n + eps);
  }
}

template <typename T, int M, int K>
__device__ __forceinline__ void chess_rms_scales(const T* x, const T* g, float eps, float* wsum, float* rs) {
#pragma unroll
  for (int m = 0; m < M; ++m) rs[m] = 1.0f;
  if (g == nullptr) return;
  static_assert(K % 8 == 0, "a fused RMSNorm reads x 16 bytes at a time");
  constexpr int VPT = (K / 8 + 255) / 256;  // 16-byte loads per thread and token, all issued together
  float s[M];
#pragma unroll
  for (int m = 0; m < M; ++m) {
    s[m] = 0.0f;
#pragma unroll
    for (int q = 0; q < VPT; ++q) {
      const int v = (int)threadIdx.x + 256 * q;
      if (v < K / 8) {
        float f[8];
        chess_unpack8<T>(reinterpret_cast<const uint4*>(x + (size_t)m * K)[v], f);
#pragma unroll
        for (int e = 0; e < 8; ++e) s[m] += f[e] * f[e];
      }
    }
  }
  chess_block_rms<M>(s, wsum, K, eps, rs);
}

// Ordered compaction of the active inputs of one split-K chunk into shared memory: idx[0..total)
// holds the rows j in [k_begin, k_begin + KC) with any thresholded x[m, j] != 0, in increasing
// order, and xsh[m * KC + i] the thresholded x[m, idx[i]] as float. The inner loops then read x
// from shared memory only: global x loads there wait on L1, which every gpu-scope fence of a
// finishing block on the same SM invalidates (Nsight, benchmarks/RESULTS.md). *nnz gets the
// number of non-zero (m, j) elements of the chunk (the density the stats report). Each thread
// loads all of its P = KC/256 inputs before the one barrier pair, so a block waits for one x load,
// not P in a row (session 10). wcount and wnnz hold 8 * P ints. thr false: x as it is, no threshold
// (the dense tiles of a split launch, spin's NT). g, eps: a fused RMSNorm of x (chess_rms_scales,
// nsum its shared float[8 * M]; g null: none), rounded where mx.fast.rms_norm rounds:
// round(g[j] * round(x[m, j] * rs[m])); the threshold applies to the normalized values, as it
// would to the norm's output. All 256 threads of the block must call it.
// Returns the count of active rows.
template <int M, int K, int KC, int TPC, typename T, typename TT>
__device__ __forceinline__ int chess_compact(const T* x, const TT* t, const T* g, float eps, float* nsum, bool thr,
                                             int k_begin, int* idx, float* xsh, int* wcount, int* wnnz, int* nnz) {
  constexpr int P = (KC + 255) / 256;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  float v[P][M], gv[P], tv[P];
  bool valid[P];
#pragma unroll
  for (int p = 0; p < P; ++p) {  // every load first: the norm's scales then wait on one round trip
    const int i = 256 * p + (int)threadIdx.x;
    const int j = k_begin + i;
    valid[p] = i < KC && j < K;
#pragma unroll
    for (int m = 0; m < M; ++m) v[p][m] = valid[p] ? static_cast<float>(x[(size_t)m * K + j]) : 0.0f;
    gv[p] = valid[p] && g != nullptr ? static_cast<float>(g[j]) : 0.0f;
    tv[p] = valid[p] && thr ? static_cast<float>(t[TPC ? j : 0]) : 0.0f;
  }
  float rs[M];
  chess_rms_scales<T, M, K>(x, g, eps, nsum, rs);  // rs = 1 without a fused norm (no barrier)
#pragma unroll
  for (int p = 0; p < P; ++p)
#pragma unroll
    for (int m = 0; m < M; ++m) {
      float xv = v[p][m];
      if (g != nullptr) xv = static_cast<float>(static_cast<T>(gv[p] * static_cast<float>(static_cast<T>(xv * rs[m]))));
      v[p][m] = !valid[p] ? 0.0f : !thr ? xv : fabsf(xv) >= tv[p] ? xv : 0.0f;
    }
  bool act[P];
  unsigned bal[P];
#pragma unroll
  for (int p = 0; p < P; ++p) {
    int mine = 0;
#pragma unroll
    for (int m = 0; m < M; ++m) mine += v[p][m] != 0.0f;
    act[p] = mine > 0;
    bal[p] = __ballot_sync(0xffffffffu, act[p]);
    const int wsum = __reduce_add_sync(0xffffffffu, mine);
    if (lane == 0) {
      wcount[8 * p + warp] = __popc(bal[p]);
      wnnz[8 * p + warp] = wsum;
    }
  }
  __syncthreads();
  int total = 0, elems = 0;
#pragma unroll
  for (int p = 0; p < P; ++p) {
    int off = total;
    for (int w = 0; w < warp; ++w) off += wcount[8 * p + w];
    if (act[p]) {
      const int slot = off + __popc(bal[p] & ((1u << lane) - 1u));
      idx[slot] = k_begin + 256 * p + (int)threadIdx.x;
#pragma unroll
      for (int m = 0; m < M; ++m) xsh[m * KC + slot] = v[p][m];
    }
#pragma unroll
    for (int w = 0; w < 8; ++w) {
      total += wcount[8 * p + w];
      elems += wnnz[8 * p + w];
    }
  }
  __syncthreads();
  *nnz = elems;
  return total;
}

// Sparse-output rows: is row r (< N) active for any token, i.e. some a[m, r] != 0?
template <typename T, int M, int N>
__device__ __forceinline__ bool chess_row_active(const T* a, int r) {
  bool active = false;
#pragma unroll
  for (int m = 0; m < M; ++m) active |= (r < N) && (static_cast<float>(a[m * N + r]) != 0.0f);
  return active;
}

// Sparse-output row dot products: acc[m] += w_row . x[m, :] over this lane's share of the row
// (the WPR warps of a row step through it together, 16 bytes per lane per step).
template <typename T, int M, int K, int WPR>
__device__ __forceinline__ void chess_row_dot(const T* w_row, const T* x, int part, float* acc) {
  constexpr int V = K / 8;
  const int lane = threadIdx.x & 31;
  const uint4* wrow = reinterpret_cast<const uint4*>(w_row);
#pragma unroll 4
  for (int v = part * 32 + lane; v < V; v += 32 * WPR) {
    float wf[8];
    chess_unpack8<T>(wrow[v], wf);
#pragma unroll
    for (int m = 0; m < M; ++m) {
      float xf[8];
      chess_unpack8<T>(reinterpret_cast<const uint4*>(x + (size_t)m * K)[v], xf);
#pragma unroll
      for (int e = 0; e < 8; ++e) acc[m] += wf[e] * xf[e];
    }
  }
}

// Pair p of a quantized step's words as the half2 (q_a - OFF, q_b - OFF), OFF = 2^(BITS-1), exactly:
// (q | 0x6400) is the half 1024 + q (one LOP3 per pair, no I2F), minus 1024 + OFF (one HSUB2).
// 4 bits: (w >> 4s) & 0x000f000f holds elements 8w+s and 8w+s+4 (p = 4w+s); 8 bits: bytes (0, 1)
// and (2, 3) of word w are elements 2p and 2p+1. chess_qpair_elem gives a and b.
template <int BITS>
__device__ __forceinline__ __half2 chess_qpair_centred(const uint32_t* words, int p) {
  uint32_t b;
  if (BITS == 4) b = ((words[p / 4] >> (4 * (p % 4))) & 0x000f000fu) | 0x64006400u;
  else b = __byte_perm(words[p / 2], 0x64646464u, (p % 2) ? 0x4342 : 0x4140);
  return __hsub2(*reinterpret_cast<const __half2*>(&b), __float2half2_rn(1024.0f + (float)(1 << (BITS - 1))));
}

// Element a (half 0) or b (half 1) of pair p, as chess_qpair_centred pairs them.
template <int BITS>
__device__ __forceinline__ int chess_qpair_elem(int p, int half) {
  return BITS == 4 ? 8 * (p / 4) + p % 4 + 4 * half : 2 * p + half;
}

// x of one quantized step (VPL = 128/BITS values from x + k0) as the dot products below want it,
// and its float32 sum (the bias term). Generic (bfloat16): floats, and each dot decodes q without
// I2F (chess_qfloat) and takes one FFMA per weight. float16 (specialization below): half2 pairs.
template <typename T, int BITS>
struct ChessQX {
  static constexpr int VPL = 128 / BITS;
  static constexpr int VPW = 32 / BITS;
  float f[VPL];
  float sum;
  __device__ __forceinline__ void load(const T* xp) {
    const uint4* xv = reinterpret_cast<const uint4*>(xp);
#pragma unroll
    for (int c = 0; c < VPL / 8; ++c) chess_unpack8<T>(xv[c], f + 8 * c);
    float xs4[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
    for (int i = 0; i < VPL; ++i) xs4[i & 3] += f[i];
    sum = (xs4[0] + xs4[1]) + (xs4[2] + xs4[3]);
  }
  // sum_i (q_i - 2^(BITS-1)) * x_i over the step's 4 words
  __device__ __forceinline__ float dot(const uint32_t* words) const {
    constexpr float OFF = (float)(1 << (BITS - 1));
    float qx[4] = {0.0f, 0.0f, 0.0f, 0.0f};  // 4 chains for ILP
#pragma unroll
    for (int i = 0; i < VPL; ++i) qx[i & 3] += (chess_qfloat<BITS>(words[i / VPW], BITS * (i % VPW)) - OFF) * f[i];
    return (qx[0] + qx[1]) + (qx[2] + qx[3]);
  }
};

// float16: q decoded two at a time into half2 and centred exactly (chess_qpair_centred), then one
// HFMA2 per two weights, in four half2 chains of at most 4 products each (short chains keep
// float16's rounding of the partial sums small), summed in float32. About
// half the instructions per weight of the generic path, which bounds the 4-bit kernels (they
// stream 4-bit weights at a quarter of the fp16 bytes). x is paired as the weights are
// (chess_qpair_elem): 4 bits, elements 8w+s and 8w+s+4 (__byte_perm); 8 bits, x's own 32-bit
// words are already those pairs. Centred products (|q - OFF| <= 2^(BITS-1)) keep the
// sums small; a lane whose x step has |x| >= XMAX takes the float path instead (``half_ok``), so
// no sum can overflow.
template <int BITS>
struct ChessQX<__half, BITS> {
  static constexpr int VPL = 128 / BITS;
  static constexpr int VPW = 32 / BITS;
  // |x| bound of the half path: a chain sums VPL/8 products of |q - OFF| <= 2^(BITS-1), so
  // 4 * 8 * 512 (4 bits) and 2 * 128 * 64 (8 bits) stay at a quarter of half's 65504.
  static constexpr float XMAX = BITS == 4 ? 512.0f : 64.0f;
  uint32_t p[VPL / 2];
  float sum;
  bool half_ok;
  __device__ __forceinline__ void load(const __half* xp) {
    const uint4* xv = reinterpret_cast<const uint4*>(xp);
    float xs4[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    __half2 mx2 = __float2half2_rn(0.0f);
#pragma unroll
    for (int c = 0; c < VPL / 8; ++c) {
      const uint4 u = xv[c];
      const uint32_t uw[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const __half2 h = *reinterpret_cast<const __half2*>(&uw[i]);
        const float2 f = __half22float2(h);
        xs4[i] += f.x + f.y;
        mx2 = __hmax2(mx2, __habs2(h));
      }
      if (BITS == 4) {
        p[4 * c + 0] = __byte_perm(u.x, u.z, 0x5410);
        p[4 * c + 1] = __byte_perm(u.x, u.z, 0x7632);
        p[4 * c + 2] = __byte_perm(u.y, u.w, 0x5410);
        p[4 * c + 3] = __byte_perm(u.y, u.w, 0x7632);
      } else {
        p[4 * c + 0] = u.x;
        p[4 * c + 1] = u.y;
        p[4 * c + 2] = u.z;
        p[4 * c + 3] = u.w;
      }
    }
    sum = (xs4[0] + xs4[1]) + (xs4[2] + xs4[3]);
    const float2 mf = __half22float2(mx2);
    half_ok = fmaxf(mf.x, mf.y) < XMAX;  // inf x: false; a NaN x (skipped by __hmax2) propagates on either path
  }
  __device__ __forceinline__ float dot(const uint32_t* words) const {
    if (!half_ok) return dot_float(words);
    __half2 a[4] = {__float2half2_rn(0.0f), __float2half2_rn(0.0f), __float2half2_rn(0.0f), __float2half2_rn(0.0f)};
#pragma unroll
    for (int j = 0; j < VPL / 2; ++j)
      a[j & 3] = __hfma2(chess_qpair_centred<BITS>(words, j), *reinterpret_cast<const __half2*>(&p[j]), a[j & 3]);
    const float2 f0 = __half22float2(a[0]), f1 = __half22float2(a[1]), f2 = __half22float2(a[2]),
                 f3 = __half22float2(a[3]);
    return ((f0.x + f0.y) + (f1.x + f1.y)) + ((f2.x + f2.y) + (f3.x + f3.y));
  }
  // the generic path's arithmetic on the paired x (for steps with large x)
  __device__ __forceinline__ float dot_float(const uint32_t* words) const {
    constexpr float OFF = (float)(1 << (BITS - 1));
    float qx[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
    for (int j = 0; j < VPL / 2; ++j) {
      const float2 xf = __half22float2(*reinterpret_cast<const __half2*>(&p[j]));
      const int e0 = chess_qpair_elem<BITS>(j, 0), e1 = chess_qpair_elem<BITS>(j, 1);
      qx[j & 3] += (chess_qfloat<BITS>(words[e0 / VPW], BITS * (e0 % VPW)) - OFF) * xf.x;
      qx[(j + 2) & 3] += (chess_qfloat<BITS>(words[e1 / VPW], BITS * (e1 % VPW)) - OFF) * xf.y;
    }
    return (qx[0] + qx[1]) + (qx[2] + qx[3]);
  }
};

// Quantized sparse-output row dot products, RPW rows per warp (spout_q, gateup_q):
// acc[q][m] += w[r0 + q, :] . x[m, :] for the rows with act[q], over this warp's share of the row:
// the PARTS warps of a row group step through it together (warp ``part`` takes steps part, part +
// PARTS, ...). Each lane takes 16-byte steps (32 values at 4 bits, 16 at 8, inside one
// quantization group: one scale and one bias per row); x is loaded once per step and applied to
// all RPW rows, so the x traffic and the latency chain of a step are shared by RPW rows (Nsight
// A/B, benchmarks/RESULTS.md: 1.45x the one-row-per-warp design at 50% sparsity). With q centred
// (ChessQX::dot), w . x = scale * sum (q - OFF) x + (bias + OFF * scale) * sum x.
template <typename T, int M, int K, int BITS, int GS, int RPW, int PARTS>
__device__ __forceinline__ void chess_qrows_dot(const uint32_t* w, const T* scales, const T* biases, const T* x,
                                                int r0, const bool* act, float (*acc)[M], int part) {
  constexpr int VPW = 32 / BITS;
  constexpr int VPL = 4 * VPW;
  constexpr int WORDS_PER_ROW = K / VPW;
  constexpr int STEPS = WORDS_PER_ROW / 4;
  constexpr float OFF = (float)(1 << (BITS - 1));
  const int lane = threadIdx.x & 31;
#pragma unroll 2
  for (int v = part * 32 + lane; v < STEPS; v += 32 * PARTS) {
    const int k0 = v * VPL;
    uint32_t words[RPW][4];
    float sc[RPW], bi[RPW];
#pragma unroll
    for (int q = 0; q < RPW; ++q) {
      if (act[q]) {
        chess_load_words<4>(w + (size_t)(r0 + q) * WORDS_PER_ROW + 4 * v, words[q]);
        sc[q] = static_cast<float>(scales[(size_t)(r0 + q) * (K / GS) + k0 / GS]);
        bi[q] = static_cast<float>(biases[(size_t)(r0 + q) * (K / GS) + k0 / GS]);
      }
    }
#pragma unroll
    for (int m = 0; m < M; ++m) {
      ChessQX<T, BITS> xs;
      xs.load(x + (size_t)m * K + k0);
#pragma unroll
      for (int q = 0; q < RPW; ++q) {
        if (act[q]) acc[q][m] += sc[q] * xs.dot(words[q]) + fmaf(OFF, sc[q], bi[q]) * xs.sum;
      }
    }
  }
}

// Quantized sparse-input rows (spin_q): U rows j_u of the transposed weight, each lane owning
// VPL = WORDS*32/BITS consecutive outputs inside one quantization group (one scale and bias per
// row): acc[m][e] += x[u][m] * sc[u] * (q_u[e] - OFF) and accb[m] += x[u][m] * (bi[u] + OFF * sc[u])
// (q centred, as in ChessQX). A row of the U that does not exist passes x = sc = bi = 0 and zero
// words. Generic (bfloat16): q decoded to float (chess_qfloat), one FFMA per weight.
template <typename T, int M, int BITS, int WORDS, int U>
struct ChessSpinQ {
  static constexpr int VPW = 32 / BITS;
  static constexpr int VPL = WORDS * VPW;
  __device__ __forceinline__ static void rows(const uint32_t (*words)[WORDS], const float* sc, const float* bi,
                                              const float (*xv)[M], float (*acc)[VPL], float* accb) {
    constexpr float OFF = (float)(1 << (BITS - 1));
#pragma unroll
    for (int u = 0; u < U; ++u) {
#pragma unroll
      for (int m = 0; m < M; ++m) {
        const float xs = xv[u][m] * sc[u];
        accb[m] = fmaf(xv[u][m], fmaf(OFF, sc[u], bi[u]), accb[m]);
#pragma unroll
        for (int e = 0; e < VPL; ++e)
          acc[m][e] = fmaf(xs, chess_qfloat<BITS>(words[u][e / VPW], BITS * (e % VPW)) - OFF, acc[m][e]);
      }
    }
  }
};

// float16: the U rows' products in half2, as ChessQX does for rows: q two at a time, centred
// exactly (chess_qpair_centred, shared by the M tokens), then one HFMA2 per two weights and row, a chain of U products per output pair,
// converted to float32 and added once per U rows. The sum over thousands of rows stays in float32;
// only U = 4 products meet in half. x * sc is scaled per token by a power of two, 2^s, so that the
// largest of the U lies in [2^TGT, 2^(TGT+1)): a chain is then at most U * 2^(BITS-1) * 2^(TGT+1)
// = 2^14 (no overflow), small values keep half's 11 bits (no subnormals above 2^-14 of the
// largest), and 2^-s is folded into the float32 add exactly. About 2 instructions per weight
// against 4. Pair p holds outputs chess_qpair_elem(p, 0) and (p, 1).
template <int M, int BITS, int WORDS, int U>
struct ChessSpinQ<__half, M, BITS, WORDS, U> {
  static constexpr int VPW = 32 / BITS;
  static constexpr int VPL = WORDS * VPW;
  static constexpr int TGT = BITS == 4 ? 8 : 4;
  __device__ __forceinline__ static void rows(const uint32_t (*words)[WORDS], const float* sc, const float* bi,
                                              const float (*xv)[M], float (*acc)[VPL], float* accb) {
    constexpr float OFF = (float)(1 << (BITS - 1));
    __half2 xh[M][U];
    float down[M];
#pragma unroll
    for (int m = 0; m < M; ++m) {
      float xs[U];
      float amax = 0.0f;
#pragma unroll
      for (int u = 0; u < U; ++u) {
        xs[u] = xv[u][m] * sc[u];
        accb[m] = fmaf(xv[u][m], fmaf(OFF, sc[u], bi[u]), accb[m]);
        amax = fmaxf(amax, fabsf(xs[u]));  // a NaN is skipped here and propagates through its product
      }
      // exponent field of amax, clamped so that 2^s and 2^-s are normal floats (inf: 254)
      const int e = min(max(__float_as_int(amax) >> 23, TGT + 1), 254);
      const float up = __int_as_float((254 + TGT - e) << 23);
      down[m] = __int_as_float((e - TGT) << 23);
#pragma unroll
      for (int u = 0; u < U; ++u) xh[m][u] = __float2half2_rn(xs[u] * up);
    }
#pragma unroll
    for (int p = 0; p < VPL / 2; ++p) {
      const int e0 = chess_qpair_elem<BITS>(p, 0), e1 = chess_qpair_elem<BITS>(p, 1);
      __half2 q[U];
#pragma unroll
      for (int u = 0; u < U; ++u) q[u] = chess_qpair_centred<BITS>(words[u], p);
#pragma unroll
      for (int m = 0; m < M; ++m) {
        __half2 a = __hmul2(q[0], xh[m][0]);
#pragma unroll
        for (int u = 1; u < U; ++u) a = __hfma2(q[u], xh[m][u], a);
        const float2 f = __half22float2(a);
        acc[m][e0] = fmaf(f.x, down[m], acc[m][e0]);
        acc[m][e1] = fmaf(f.y, down[m], acc[m][e1]);
      }
    }
  }
};

// First step of a sparse-output epilogue: each warp's sum of acc[m] into red[warp][m], then a
// barrier. All 256 threads must call it.
template <int M>
__device__ __forceinline__ void chess_warp_sums_to_shared(const float* acc, float (*red)[M]) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int m = 0; m < M; ++m) {
    const float s = chess_warp_sum(acc[m]);
    if (lane == 0) red[warp][m] = s;
  }
  __syncthreads();
}

// Sparse-output epilogue: sum acc[m] over the warp and the WPR warps sharing row r (through
// red[8][M] in shared memory), then y[m, r] = sum * a[m, r]. All 256 threads must call it.
template <typename T, int M, int N, int WPR>
__device__ __forceinline__ void chess_finish_rows(const float* acc, const T* a, T* y, int r, float (*red)[M]) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  chess_warp_sums_to_shared<M>(acc, red);
  if (r < N && warp % WPR == 0 && lane < M) {
    float s = 0.0f;
#pragma unroll
    for (int p = 0; p < WPR; ++p) s += red[warp + p][lane];
    y[lane * N + r] = static_cast<T>(s * static_cast<float>(a[lane * N + r]));
  }
}

// This thread's rotary angle for a fused rope (chess_spin_finish's RD, RT): thread i's outputs sit
// at head dimension i % RD in every row and tile (RD divides 256 and the tile), so one angle serves
// all of them: (scale * position) * inverse frequency, in MLX's rope's order of operations. pos[0]
// is the position (an int32 array of >= 4 entries: arrays of <= 8 bytes come from MLX's managed
// small-buffer pool, whose reads cost microseconds, RESULTS.md session 9); inv_freq has RD / 2.
template <int RD, int RT>
__device__ __forceinline__ float chess_rope_theta(const int* pos, const float* inv_freq, float scale) {
  const int d = (int)threadIdx.x % RD;
  return (scale * static_cast<float>(pos[0])) * inv_freq[RT ? d / 2 : d % (RD / 2)];
}

// The split-K sum in fixed point (chess_spin_finish): a chunk's partial sum v of an output becomes
// the integer round(v * 2^24), clamped to |v| <= 2^30 (a NaN to -2^30), so that up to
// chess_max_chunks() of them add up in an int64 without overflow. Integer adds are exact and order-
// free: y is the same bits on every run however the blocks arrive, and the Metal twin, which adds
// the same integers as three 32-bit words (Metal has no 64-bit atomic add), gives the same y for
// the same launch geometry.
// Resolution 2^-24 (6e-8) per partial; a |partial| beyond 2^30, never met by a model's
// activations, saturates, and so does a NaN: the output then overflows instead of staying NaN.
// sparse_gemv.SPIN_MAX_CHUNKS is chess_max_chunks() (longer inputs take the reference path).
__host__ __device__ constexpr int chess_max_chunks() { return 511; }

__device__ __forceinline__ long long chess_fixed(float v) {
  constexpr float ONE = 16777216.0f, MAX = 1073741824.0f;  // 2^24, 2^30
  return llrintf(fminf(fmaxf(v, -MAX), MAX) * ONE);
}

__device__ __forceinline__ float chess_unfixed(long long q) {
  return static_cast<float>(q) * (1.0f / 16777216.0f);
}

// Sparse-input epilogue, one launch for what used to be two (fewer graph nodes per token is what
// decode speed depends on, benchmarks/RESULTS.md): the 8 warps' accumulators of one output tile
// (lane owns VPL consecutive outputs, plus a per-lane scalar) are summed through red[8][TILE]; each
// chunk block adds its sums, in fixed point (chess_fixed), into one int64 per output at L2 (an
// atomic reduction: fire and forget), and the last of the tile's CHUNKS chunk blocks to arrive
// (counted in sem[tile]) reads the M * TILE totals back, writes y and zeroes the totals for the next
// launch. Until session 26 each block stored its float partials (CHUNKS * M * N floats) and the
// last block summed them in chunk order: with 64 chunks (4-bit 4096 -> 4096) that sum took 1.9 us
// of the launch's 8.6 (benchmarks/spin_stamps.py); the reductions gave 1.10-1.17x on 4-bit 4096 ->
// 4096 and 14336 -> 4096 at 50-90%, 1.02-1.03x on 4096 -> 14336 and 0.995-1.055x on float16
// (benchmarks/spin_rounds.py redi, RESULTS.md session 26). The tile-0 blocks add
// their non-zero input counts into sem[tiles] before they count in, so tile 0's last block holds
// the whole count and writes dens[0] = non-zero inputs / (M*K). sem is a per-call-site int32
// workspace of tiles + 1 zeros; each counter, and each total, is reset by the block that consumed
// it, so the next launch finds zeros again. Only thread 0 synchronizes, after the block barrier
// (the pattern of cooperative groups' grid sync): a fence per warp cost up to 40% of the kernel's
// time. It counts the block in with one atom.add.acq_rel.gpu (release: the block's reductions,
// ordered before it by the barrier, and its count; acquire: the other chunks' reductions, for the
// last block) instead of a fence, a relaxed atomic and a second fence in the last block: 0.3-0.5 us
// less per launch, 1.01-1.07x on every sparse-input shape at 50-90% (benchmarks/spin_rounds.py
// relatom, RESULTS.md session 25). The Metal twin keeps fence + relaxed atomic + fence (Metal's
// device atomics are relaxed only). The CPU emulation (no __CUDA_ARCH__) takes the fenced form.
// acq_rel atomics need sm_70, the oldest architecture MLX's CUDA backend builds for
// (ml-explore/mlx#2209). The last block's serial tail is two round trips to L2 (count, totals) plus
// the y store: the cross-tile counter that used to decide who writes dens added two more
// (session 10). All 256 threads must call it.
// res: null, or the residual added to y after y's own rounding (the spin kernels' _res variants).
// partial_in: the call site's scratch of >= 3 * M * N float32 zeros (this kernel uses the first
// 2 * M * N as M * N int64 totals; the Metal twin all of it), zeros again when the launch ends (an
// input: MLX would allocate an output at every launch, ~2 us of host time each, RESULTS.md session
// 18); the workspace token orders the launches that share it.
// RD, RN, RT, theta: a rotary embedding of y's first RN outputs (the _rope variants; RN = 0: none),
// heads of RD outputs, traditional (adjacent pairs) if RT, else halves (MLX's rope); theta is this
// thread's angle (chess_rope_theta). Each pair lies inside one tile (RD divides 256 and TILE).
template <typename T, int M, int N, int K, int KC, int VPL, int RD = 0, int RN = 0, int RT = 0>
__device__ __forceinline__ void chess_spin_finish(const float (*acc)[VPL], const float* accb, const float* partial_in,
                                                  T* y, float* dens, const int* sem_in, int nnz,
                                                  float (*red)[32 * VPL], int* flag, const T* res,
                                                  const T* yg = nullptr, T* yn = nullptr, float eps = 0.0f,
                                                  float theta = 0.0f) {
  constexpr int TILE = 32 * VPL;
  constexpr int CHUNKS = (K + KC - 1) / KC;
  static_assert(CHUNKS <= chess_max_chunks(), "the fixed-point totals have headroom for 511 chunks");
  unsigned long long* sums = reinterpret_cast<unsigned long long*>(const_cast<float*>(partial_in));
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int tile = blockIdx.x, chunk = blockIdx.y;
  const int tiles = gridDim.x;
  int* sem = const_cast<int*>(sem_in);
#pragma unroll
  for (int m = 0; m < M; ++m) {
    float4* dst = reinterpret_cast<float4*>(&red[warp][lane * VPL]);  // 16-byte stores: fewer bank conflicts
#pragma unroll
    for (int q = 0; q < VPL / 4; ++q)
      dst[q] = make_float4(acc[m][4 * q] + accb[m], acc[m][4 * q + 1] + accb[m], acc[m][4 * q + 2] + accb[m],
                           acc[m][4 * q + 3] + accb[m]);
    __syncthreads();
    for (int i = threadIdx.x; i < TILE; i += 256) {
      float s = 0.0f;
#pragma unroll
      for (int w8 = 0; w8 < 8; ++w8) s += red[w8][i];
      const int n = tile * TILE + i;
      if (n < N) atomicAdd(sums + (size_t)m * N + n, (unsigned long long)chess_fixed(s));  // a reduction at L2
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    if (tile == 0) atomicAdd(&sem[tiles], nnz);
    int prev;
#ifdef __CUDA_ARCH__
    asm volatile("atom.add.acq_rel.gpu.s32 %0, [%1], 1;" : "=r"(prev) : "l"(&sem[tile]) : "memory");
#else
    __threadfence();
    prev = atomicAdd(&sem[tile], 1);
    __threadfence();
#endif
    const bool last = prev == CHUNKS - 1;
    *flag = last;
  }
  __syncthreads();
  if (!*flag) return;
  static_assert(RN == 0 || (RD % 2 == 0 && 256 % RD == 0 && TILE % RD == 0 && M <= 8), "rope pairs must stay in a tile");
  float* rot = &red[0][0];  // RN > 0: the tile's rounded outputs, M * TILE <= 8 * TILE floats
  for (int i = threadIdx.x; i < M * TILE; i += 256) {
    const int m = i / TILE, n = tile * TILE + i % TILE;
    if (n < N) {
      float s = chess_unfixed(__ldcg(reinterpret_cast<const long long*>(sums) + (size_t)m * N + n));
      sums[(size_t)m * N + n] = 0ull;  // zeros again for the next launch at this site
      if (res) s = static_cast<float>(static_cast<T>(s)) + static_cast<float>(res[(size_t)m * N + n]);
      if (RN > 0) rot[i] = static_cast<float>(static_cast<T>(s));
      else y[(size_t)m * N + n] = static_cast<T>(s);
    }
  }
  if (RN > 0) {  // rotate pairs of the rounded outputs, as MLX's rope does with the product's output
    __syncthreads();
    const float c = cosf(theta), sn = sinf(theta);
    for (int i = threadIdx.x; i < M * TILE; i += 256) {
      const int m = i / TILE, n = tile * TILE + i % TILE;
      if (n < N) {
        float o = rot[i];
        if (n < RN) {
          const int d = n % RD;
          const bool lo = RT ? (d & 1) == 0 : d < RD / 2;
          const float p = rot[RT ? (i ^ 1) : lo ? i + RD / 2 : i - RD / 2];
          o = lo ? o * c - p * sn : p * sn + o * c;
        }
        y[(size_t)m * N + n] = static_cast<T>(o);
      }
    }
  }
  if (threadIdx.x == 0) {
    sem[tile] = 0;  // every chunk has counted in; the next launch reads it after this kernel ends
    if (tile == 0) dens[0] = (float)atomicExch(&sem[tiles], 0) / (float)(M * K);
  }
  if (yn == nullptr) return;
  // A fused RMSNorm of y (the _ynorm variants: o's launch gives the post-attention norm's output
  // too, one launch fewer per layer): the last tile block to finish (counted in sem[tiles + 1])
  // reads all of y back from L2 and writes yn = round(yg * round(y * rsqrt(mean(y^2) + eps))).
  __syncthreads();  // every thread's y stores, before thread 0's release
  if (threadIdx.x == 0) {
    __threadfence();
    const bool fin = atomicAdd(&sem[tiles + 1], 1) == tiles - 1;
    if (fin) __threadfence();  // acquire: the other tiles' y
    *flag = fin;
  }
  __syncthreads();
  if (!*flag) return;
  static_assert(N % 8 == 0, "a fused RMSNorm reads y 16 bytes at a time");
  constexpr int VPT = (N / 8 + 255) / 256;  // 16-byte pieces per thread and token, all loads issued together
#pragma unroll
  for (int m = 0; m < M; ++m) {  // one token at a time: y, g and the outputs stay in registers
    uint4 yv[VPT], gq[VPT];
    float sq = 0.0f;
#pragma unroll
    for (int q = 0; q < VPT; ++q) {
      const int v = (int)threadIdx.x + 256 * q;
      if (v < N / 8) {
        yv[q] = __ldcg(reinterpret_cast<const uint4*>(y + (size_t)m * N) + v);  // L2: other blocks wrote it
        gq[q] = reinterpret_cast<const uint4*>(yg)[v];
        float f[8];
        chess_unpack8<T>(yv[q], f);
#pragma unroll
        for (int e = 0; e < 8; ++e) sq += f[e] * f[e];
      }
    }
    float rs;
    chess_block_rms<1>(&sq, &red[0][8 * m], N, eps, &rs);  // 8 floats per token of red's first row
#pragma unroll
    for (int q = 0; q < VPT; ++q) {
      const int v = (int)threadIdx.x + 256 * q;
      if (v < N / 8) {
        float f[8], gf[8];
        chess_unpack8<T>(yv[q], f);
        chess_unpack8<T>(gq[q], gf);
#pragma unroll
        for (int e = 0; e < 8; ++e)
          yn[(size_t)m * N + 8 * v + e] = static_cast<T>(gf[e] * static_cast<float>(static_cast<T>(f[e] * rs)));
      }
    }
  }
  if (threadIdx.x == 0) sem[tiles + 1] = 0;
}

// Row sums of a sparse-output block: acc[m] summed over the warp and the WPR warps sharing the
// row (through red[8][M]), returned to every thread of those warps. All 256 threads must call it.
template <int M, int WPR>
__device__ __forceinline__ void chess_row_sums(const float* acc, float (*red)[M], float* out) {
  const int warp = threadIdx.x >> 5;
  chess_warp_sums_to_shared<M>(acc, red);
  const int w0 = warp - warp % WPR;
#pragma unroll
  for (int m = 0; m < M; ++m) {
    out[m] = 0.0f;
#pragma unroll
    for (int p = 0; p < WPR; ++p) out[m] += red[w0 + p][m];
  }
  __syncthreads();
}

// Round a float32 to T and back: the fused kernels round where the op-by-op graph stores a T.
template <typename T>
__device__ __forceinline__ float chess_round(float v) {
  return static_cast<float>(static_cast<T>(v));
}
