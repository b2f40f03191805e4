// Shared helpers of the chess-mlx sparse GEMV kernels (Metal). Twin of cuda/common.cuh: same
// functions, same semantics; simdgroups of 32 threads play the role of CUDA warps.

template <typename T>
struct ChessUnpack;

template <>
struct ChessUnpack<half> {
  static inline void run(uint4 v, thread float* f) {
    const uint w[4] = {v.x, v.y, v.z, v.w};
    for (int i = 0; i < 4; ++i) {
      const half2 h = as_type<half2>(w[i]);
      f[2 * i] = float(h.x);
      f[2 * i + 1] = float(h.y);
    }
  }
};

template <>
struct ChessUnpack<bfloat16_t> {
  static inline void run(uint4 v, thread float* f) {
    const uint w[4] = {v.x, v.y, v.z, v.w};
    for (int i = 0; i < 4; ++i) {
      f[2 * i] = as_type<float>(w[i] << 16);
      f[2 * i + 1] = as_type<float>(w[i] & 0xFFFF0000u);
    }
  }
};

// 8 consecutive T values (16 bytes) as floats.
template <typename T>
inline void chess_unpack8(uint4 v, thread float* f) {
  ChessUnpack<T>::run(v, f);
}

// Load W consecutive 32-bit words (W = 4, 2 or 1) with one vector load.
template <int W>
inline void chess_load_words(const device uint32_t* p, thread uint32_t* out) {
  if (W == 4) {
    const uint4 v = *((const device uint4*)p);
    out[0] = v.x; out[1] = v.y; out[2] = v.z; out[3] = v.w;
  } else if (W == 2) {
    const uint2 v = *((const device uint2*)p);
    out[0] = v.x; out[1] = v.y;
  } else {
    out[0] = p[0];
  }
}

// q (a BITS-bit field of a packed word) as float: (q | 0x4B000000) is the float 2^23 + q exactly.
template <int BITS>
inline float chess_qfloat(uint32_t word, int shift) {
  constexpr uint32_t MASK = (1u << BITS) - 1u;
  return as_type<float>(((word >> shift) & MASK) | 0x4B000000u) - 8388608.0f;
}

// x[m, j] after the input threshold (twin of the CUDA helper): kept where |x| >= t (t[j] if TPC,
// else t[0]), else 0; compared in float32.
template <int K, int TPC, typename T, typename TT>
inline float chess_xval(const device T* x, const device TT* t, int m, int j) {
  const float v = float(x[m * K + j]);
  return fabs(v) >= float(t[TPC ? j : 0]) ? v : 0.0f;
}

// Per-token scales of an RMSNorm fused into the kernel that reads its output (twin of the CUDA
// one): rs[m] = rsqrt(sum_j x[m, j]^2 / K + eps) in float32; g null: rs = 1, no barrier.
// wsum: threadgroup float[8 * M]. All 256 threads must call it. K % 8 == 0.
// rs[m] = rsqrt(sum of s[m] over the threadgroup / n + eps), twin of the CUDA one: simd sums,
// then the 8 simdgroups in order through wsum (threadgroup float[8 * M]); one barrier.
template <int M>
inline void chess_block_rms(thread float* s, threadgroup float* wsum, int n, float eps, thread float* rs, uint lane,
                            uint warp) {
  for (int m = 0; m < M; ++m) {
    s[m] = simd_sum(s[m]);
    if (lane == 0) wsum[8 * m + int(warp)] = s[m];
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  for (int m = 0; m < M; ++m) {
    float tot = 0.0f;
    for (int w = 0; w < 8; ++w) tot += wsum[8 * m + w];
    rs[m] = rsqrt(tot / float(n) + eps);
  }
}

template <typename T, int M, int K>
inline void chess_rms_scales(const device T* x, const device T* g, float eps, threadgroup float* wsum,
                             thread float* rs, uint tid, uint lane, uint warp) {
  for (int m = 0; m < M; ++m) rs[m] = 1.0f;
  if (g == nullptr) return;
  static_assert(K % 8 == 0, "a fused RMSNorm reads x 16 bytes at a time");
  constexpr int VPT = (K / 8 + 255) / 256;  // 16-byte loads per thread and token, all issued together
  float s[M];
  for (int m = 0; m < M; ++m) {
    s[m] = 0.0f;
    for (int q = 0; q < VPT; ++q) {
      const int v = int(tid) + 256 * q;
      if (v < K / 8) {
        float f[8];
        chess_unpack8<T>(((const device uint4*)(x + m * K))[v], f);
        for (int e = 0; e < 8; ++e) s[m] += f[e] * f[e];
      }
    }
  }
  chess_block_rms<M>(s, wsum, K, eps, rs, lane, warp);
}

// Ordered compaction of the surviving inputs of one split-K chunk into threadgroup memory (rows in
// idx, thresholded values as float in xsh[m * KC + i], so the inner loops never read x from device
// memory), and the chunk's count of non-zero (m, j) elements in *nnz. Twin of the CUDA helper:
// each thread loads all of its P = KC/256 inputs before the one barrier pair; wcount and wnnz hold
// 8 * P ints; thr false: x as it is, no threshold (the dense tiles of a split launch, spin's NT).
// All 256 threads of the threadgroup must call it. Returns the count of active rows (same order as
// the CUDA twin).
template <int M, int K, int KC, int TPC, typename T, typename TT>
inline int chess_compact(const device T* x, const device TT* t, const device T* g, float eps, threadgroup float* nsum,
                         bool thr, int k_begin, threadgroup int* idx,
                         threadgroup float* xsh, threadgroup int* wcount, threadgroup int* wnnz, thread int* nnz,
                         uint tid, uint lane, uint warp) {
  constexpr int P = (KC + 255) / 256;
  float v[P][M], gv[P], tv[P];
  bool valid[P];
  bool act[P];
  uint before[P];
  for (int p = 0; p < P; ++p) {  // every load first: the norm's scales then wait on one round trip
    const int i = 256 * p + int(tid);
    const int j = k_begin + i;
    valid[p] = i < KC && j < K;
    for (int m = 0; m < M; ++m) v[p][m] = valid[p] ? float(x[m * K + j]) : 0.0f;
    gv[p] = valid[p] && g != nullptr ? float(g[j]) : 0.0f;
    tv[p] = valid[p] && thr ? float(t[TPC ? j : 0]) : 0.0f;
  }
  float rs[M];
  chess_rms_scales<T, M, K>(x, g, eps, nsum, rs, tid, lane, warp);  // rs = 1 without a fused norm (no barrier)
  for (int p = 0; p < P; ++p)
    for (int m = 0; m < M; ++m) {
      float xv = v[p][m];
      if (g != nullptr) xv = float(static_cast<T>(gv[p] * float(static_cast<T>(xv * rs[m]))));
      v[p][m] = !valid[p] ? 0.0f : !thr ? xv : fabs(xv) >= tv[p] ? xv : 0.0f;
    }
  for (int p = 0; p < P; ++p) {
    int mine = 0;
    for (int m = 0; m < M; ++m) mine += v[p][m] != 0.0f ? 1 : 0;
    act[p] = mine > 0;
    before[p] = simd_prefix_exclusive_sum(uint(act[p]));
    const uint count = simd_sum(uint(act[p]));
    const int wsum = simd_sum(mine);
    if (lane == 0) {
      wcount[8 * p + int(warp)] = int(count);
      wnnz[8 * p + int(warp)] = wsum;
    }
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  int total = 0, elems = 0;
  for (int p = 0; p < P; ++p) {
    int off = total;
    for (uint w = 0; w < warp; ++w) off += wcount[8 * p + int(w)];
    if (act[p]) {
      const int slot = off + int(before[p]);
      idx[slot] = k_begin + 256 * p + int(tid);
      for (int m = 0; m < M; ++m) xsh[m * KC + slot] = v[p][m];
    }
    for (int w = 0; w < 8; ++w) {
      total += wcount[8 * p + w];
      elems += wnnz[8 * p + w];
    }
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  *nnz = elems;
  return total;
}

// Sparse-output rows: is row r (< N) active for any token, i.e. some a[m, r] != 0?
template <typename T, int M, int N>
inline bool chess_row_active(const device T* a, int r) {
  bool active = false;
  for (int m = 0; m < M; ++m) active = active || ((r < N) && float(a[m * N + r]) != 0.0f);
  return active;
}

// Sparse-output row dot products (twin of the CUDA one): acc[m] += w_row . x[m, :] over this
// lane's share of the row; the WPR simdgroups of a row step through it together, 16 bytes per lane.
template <typename T, int M, int K, int WPR>
inline void chess_row_dot(const device T* w_row, const device T* x, int part, thread float* acc, uint lane) {
  constexpr int V = K / 8;
  const device uint4* wrow = (const device uint4*)w_row;
  for (int v = part * 32 + int(lane); v < V; v += 32 * WPR) {
    float wf[8];
    chess_unpack8<T>(wrow[v], wf);
    for (int m = 0; m < M; ++m) {
      float xf[8];
      chess_unpack8<T>(((const device uint4*)(x + m * K))[v], xf);
      for (int e = 0; e < 8; ++e) acc[m] += wf[e] * xf[e];
    }
  }
}

// Pair p of a quantized step's words as the half2 (q_a - OFF, q_b - OFF), exactly (twin of the CUDA
// helper): (q | 0x6400) is the half 1024 + q, minus 1024 + OFF. 4 bits: (w >> 4s) & 0x000f000f
// holds elements 8w+s and 8w+s+4 (p = 4w+s); 8 bits: bytes (0, 1) and (2, 3) of word w are
// elements 2p and 2p+1. chess_qpair_elem gives a and b.
template <int BITS>
inline half2 chess_qpair_centred(thread const uint32_t* words, int p) {
  uint32_t b;
  if (BITS == 4) {
    b = ((words[p / 4] >> (4 * (p % 4))) & 0x000f000fu) | 0x64006400u;
  } else {
    const uint32_t w = words[p / 2] >> (16 * (p % 2));  // bytes 2*(p%2) and 2*(p%2)+1
    b = (w & 0xffu) | ((w & 0xff00u) << 8) | 0x64006400u;
  }
  return as_type<half2>(b) - half2(half(1024.0f + float(1 << (BITS - 1))));
}

// Element a (half 0) or b (half 1) of pair p, as chess_qpair_centred pairs them.
template <int BITS>
inline int chess_qpair_elem(int p, int half_index) {
  return BITS == 4 ? 8 * (p / 4) + p % 4 + 4 * half_index : 2 * p + half_index;
}

// x of one quantized step (twin of the CUDA ChessQX): VPL = 128/BITS values from x + k0 and their
// float32 sum. Generic (bfloat16): floats, one FMA per weight on q decoded by chess_qfloat.
template <typename T, int BITS>
struct ChessQX {
  float f[128 / BITS];
  float sum;
  inline void load(const device T* xp) {
    constexpr int VPL = 128 / BITS;
    const device uint4* xv = (const device uint4*)xp;
    for (int c = 0; c < VPL / 8; ++c) chess_unpack8<T>(xv[c], f + 8 * c);
    float xs4[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    for (int i = 0; i < VPL; ++i) xs4[i & 3] += f[i];
    sum = (xs4[0] + xs4[1]) + (xs4[2] + xs4[3]);
  }
  // sum_i (q_i - 2^(BITS-1)) * x_i over the step's 4 words
  inline float dot(thread const uint32_t* words) const {
    constexpr int VPL = 128 / BITS, VPW = 32 / BITS;
    const float OFF = float(1 << (BITS - 1));
    float qx[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    for (int i = 0; i < VPL; ++i) qx[i & 3] += (chess_qfloat<BITS>(words[i / VPW], BITS * (i % VPW)) - OFF) * f[i];
    return (qx[0] + qx[1]) + (qx[2] + qx[3]);
  }
};

// float16 (twin of the CUDA specialization): q two at a time as half2, centred exactly
// (chess_qpair_centred), one half2 fma per two weights in four chains, summed in float32. x is
// paired as the weights are (chess_qpair_elem); at 8 bits x's own words are those pairs.
// A lane whose x step has |x| >= XMAX takes the float path (no half sum can overflow).
template <int BITS>
struct ChessQX<half, BITS> {
  uint32_t p[64 / BITS];
  float sum;
  bool half_ok;
  inline void load(const device half* xp) {
    constexpr int VPL = 128 / BITS;
    const float XMAX = BITS == 4 ? 512.0f : 64.0f;
    const device uint4* xv = (const device uint4*)xp;
    float xs4[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    float mx = 0.0f;
    for (int c = 0; c < VPL / 8; ++c) {
      const uint4 u = xv[c];
      const uint32_t uw[4] = {u.x, u.y, u.z, u.w};
      for (int i = 0; i < 4; ++i) {
        const float2 f = float2(as_type<half2>(uw[i]));
        xs4[i] += f.x + f.y;
        mx = fmax(mx, fmax(fabs(f.x), fabs(f.y)));
        if (isnan(f.x) || isnan(f.y)) mx = INFINITY;
      }
      if (BITS == 4) {
        p[4 * c + 0] = (u.x & 0xffffu) | (u.z << 16);
        p[4 * c + 1] = (u.x >> 16) | (u.z & 0xffff0000u);
        p[4 * c + 2] = (u.y & 0xffffu) | (u.w << 16);
        p[4 * c + 3] = (u.y >> 16) | (u.w & 0xffff0000u);
      } else {
        p[4 * c + 0] = u.x;
        p[4 * c + 1] = u.y;
        p[4 * c + 2] = u.z;
        p[4 * c + 3] = u.w;
      }
    }
    sum = (xs4[0] + xs4[1]) + (xs4[2] + xs4[3]);
    half_ok = mx < XMAX;
  }
  inline float dot(thread const uint32_t* words) const {
    constexpr int VPL = 128 / BITS;
    if (!half_ok) return dot_float(words);
    half2 a[4] = {half2(0.0h), half2(0.0h), half2(0.0h), half2(0.0h)};
    for (int j = 0; j < VPL / 2; ++j) a[j & 3] = fma(chess_qpair_centred<BITS>(words, j), as_type<half2>(p[j]), a[j & 3]);
    const float2 f0 = float2(a[0]), f1 = float2(a[1]), f2 = float2(a[2]), f3 = float2(a[3]);
    return ((f0.x + f0.y) + (f1.x + f1.y)) + ((f2.x + f2.y) + (f3.x + f3.y));
  }
  inline float dot_float(thread const uint32_t* words) const {
    constexpr int VPL = 128 / BITS, VPW = 32 / BITS;
    const float OFF = float(1 << (BITS - 1));
    float qx[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    for (int j = 0; j < VPL / 2; ++j) {
      const float2 xf = float2(as_type<half2>(p[j]));
      const int e0 = chess_qpair_elem<BITS>(j, 0), e1 = chess_qpair_elem<BITS>(j, 1);
      qx[j & 3] += (chess_qfloat<BITS>(words[e0 / VPW], BITS * (e0 % VPW)) - OFF) * xf.x;
      qx[(j + 2) & 3] += (chess_qfloat<BITS>(words[e1 / VPW], BITS * (e1 % VPW)) - OFF) * xf.y;
    }
    return (qx[0] + qx[1]) + (qx[2] + qx[3]);
  }
};

// Quantized sparse-output row dot products (twin of the CUDA helper): RPW rows per simdgroup, the
// PARTS simdgroups of a row group splitting each row along K; 16-byte steps inside one
// quantization group; x loaded once per step for all RPW rows. With q centred (ChessQX::dot),
// w . x = scale * sum (q - OFF) x + (bias + OFF * scale) * sum x.
template <typename T, int M, int K, int BITS, int GS, int RPW, int PARTS>
inline void chess_qrows_dot(const device uint32_t* w, const device T* scales, const device T* biases,
                            const device T* x, int r0, thread const bool* act, thread float (*acc)[M], uint lane,
                            int part) {
  constexpr int VPW = 32 / BITS;
  constexpr int VPL = 4 * VPW;
  constexpr int WORDS_PER_ROW = K / VPW;
  constexpr int STEPS = WORDS_PER_ROW / 4;
  const float OFF = float(1 << (BITS - 1));
  for (int v = part * 32 + int(lane); v < STEPS; v += 32 * PARTS) {
    const int k0 = v * VPL;
    uint32_t words[RPW][4];
    float sc[RPW], bi[RPW];
    for (int q = 0; q < RPW; ++q) {
      if (act[q]) {
        chess_load_words<4>(w + (r0 + q) * WORDS_PER_ROW + 4 * v, words[q]);
        sc[q] = float(scales[(r0 + q) * (K / GS) + k0 / GS]);
        bi[q] = float(biases[(r0 + q) * (K / GS) + k0 / GS]);
      }
    }
    for (int m = 0; m < M; ++m) {
      ChessQX<T, BITS> xs;
      xs.load(x + m * K + k0);
      for (int q = 0; q < RPW; ++q) {
        if (act[q]) acc[q][m] += sc[q] * xs.dot(words[q]) + fma(OFF, sc[q], bi[q]) * xs.sum;
      }
    }
  }
}

// Quantized sparse-input rows (twin of the CUDA ChessSpinQ): U rows of the transposed weight, each
// lane owning VPL outputs inside one group: acc[m][e] += x[u][m] * sc[u] * (q_u[e] - OFF),
// accb[m] += x[u][m] * (bi[u] + OFF * sc[u]). Absent rows pass x = sc = bi = 0 and zero words.
// Generic (bfloat16): q decoded to float, one FMA per weight.
template <typename T, int M, int BITS, int WORDS, int U>
struct ChessSpinQ {
  static inline void rows(thread const uint32_t (*words)[WORDS], thread const float* sc, thread const float* bi,
                          thread const float (*xv)[M], thread float (*acc)[WORDS * (32 / BITS)], thread float* accb) {
    constexpr int VPW = 32 / BITS, VPL = WORDS * VPW;
    const float OFF = float(1 << (BITS - 1));
    for (int u = 0; u < U; ++u) {
      for (int m = 0; m < M; ++m) {
        const float xs = xv[u][m] * sc[u];
        accb[m] = fma(xv[u][m], fma(OFF, sc[u], bi[u]), accb[m]);
        for (int e = 0; e < VPL; ++e)
          acc[m][e] = fma(xs, chess_qfloat<BITS>(words[u][e / VPW], BITS * (e % VPW)) - OFF, acc[m][e]);
      }
    }
  }
};

// half (twin of the CUDA specialization): q two at a time as half2, centred exactly
// (chess_qpair_centred), one half2 fma per two weights and row in a chain of U products per output pair,
// added to the float32 accumulators once per U rows. x * sc is scaled per token by 2^s so that the
// largest of the U lies in [2^TGT, 2^(TGT+1)) (no overflow, no subnormals), and 2^-s is folded
// into the float32 add. Pair p holds outputs chess_qpair_elem(p, 0) and (p, 1).
template <int M, int BITS, int WORDS, int U>
struct ChessSpinQ<half, M, BITS, WORDS, U> {
  static inline void rows(thread const uint32_t (*words)[WORDS], thread const float* sc, thread const float* bi,
                          thread const float (*xv)[M], thread float (*acc)[WORDS * (32 / BITS)], thread float* accb) {
    constexpr int VPL = WORDS * (32 / BITS);
    constexpr int TGT = BITS == 4 ? 8 : 4;
    const float OFF = float(1 << (BITS - 1));
    half2 xh[M][U];
    float down[M];
    for (int m = 0; m < M; ++m) {
      float xs[U];
      float amax = 0.0f;
      for (int u = 0; u < U; ++u) {
        xs[u] = xv[u][m] * sc[u];
        accb[m] = fma(xv[u][m], fma(OFF, sc[u], bi[u]), accb[m]);
        amax = fmax(amax, fabs(xs[u]));
      }
      const int e = min(max(as_type<int>(amax) >> 23, TGT + 1), 254);
      const float up = as_type<float>((254 + TGT - e) << 23);
      down[m] = as_type<float>((e - TGT) << 23);
      for (int u = 0; u < U; ++u) xh[m][u] = half2(half(xs[u] * up));
    }
    for (int p = 0; p < VPL / 2; ++p) {
      const int e0 = chess_qpair_elem<BITS>(p, 0), e1 = chess_qpair_elem<BITS>(p, 1);
      half2 q[U];
      for (int u = 0; u < U; ++u) q[u] = chess_qpair_centred<BITS>(words[u], p);
      for (int m = 0; m < M; ++m) {
        half2 a = q[0] * xh[m][0];
        for (int u = 1; u < U; ++u) a = fma(q[u], xh[m][u], a);
        const float2 f = float2(a);
        acc[m][e0] = fma(f.x, down[m], acc[m][e0]);
        acc[m][e1] = fma(f.y, down[m], acc[m][e1]);
      }
    }
  }
};

// First step of a sparse-output epilogue: each simdgroup's sum of acc[m] into red[warp][m], then
// a barrier. All 256 threads must call it.
template <int M>
inline void chess_warp_sums_to_shared(thread const float* acc, threadgroup float (*red)[M], uint lane, uint warp) {
  for (int m = 0; m < M; ++m) {
    const float s = simd_sum(acc[m]);
    if (lane == 0) red[warp][m] = s;
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
}

// Sparse-output epilogue (twin of the CUDA one): simd_sum, then the WPR simdgroups of row r
// through red[8][M]; y[m, r] = sum * a[m, r]. All 256 threads must call it.
template <typename T, int M, int N, int WPR>
inline void chess_finish_rows(thread const float* acc, const device T* a, device T* y, int r,
                              threadgroup float (*red)[M], uint lane, uint warp) {
  chess_warp_sums_to_shared<M>(acc, red, lane, warp);
  if (r < N && int(warp) % WPR == 0 && int(lane) < M) {
    float s = 0.0f;
    for (int p = 0; p < WPR; ++p) s += red[warp + p][lane];
    y[int(lane) * N + r] = static_cast<T>(s * float(a[int(lane) * N + r]));
  }
}

// This thread's rotary angle for a fused rope (twin of the CUDA one): (scale * pos[0]) * the
// inverse frequency of head dimension tid % RD; pos is an int32 array of >= 4 entries.
template <int RD, int RT>
inline float chess_rope_theta(const device int* pos, const device float* inv_freq, float scale, uint tid) {
  const int d = int(tid) % RD;
  return (scale * float(pos[0])) * inv_freq[RT ? d / 2 : d % (RD / 2)];
}

// The split-K sum in fixed point (twin of the CUDA one): round(v * 2^24) of a partial clamped to
// |v| <= 2^30 (a NaN to -2^30), exact and order-free. Metal has no 64-bit atomic add, so each
// integer q = hi * 2^40 + mid * 2^20 + lo is added as three 32-bit words: lo and mid (20 bits each,
// unsigned: 511 chunks cannot carry out of 32 bits) and hi (signed, |hi| <= 2^14 per partial).
// Their totals give the same int64 as the CUDA twin's one 64-bit add, so the same y for the same
// launch geometry.
constexpr int chess_max_chunks() { return 511; }

inline long chess_fixed(float v) {
  constexpr float ONE = 16777216.0f, MAX = 1073741824.0f;  // 2^24, 2^30
  return static_cast<long>(rint(fmin(fmax(v, -MAX), MAX) * ONE));
}

inline float chess_unfixed(long q) {
  return static_cast<float>(q) * (1.0f / 16777216.0f);
}

// Sparse-input epilogue (twin of the CUDA one): the 8 simdgroups' accumulators of one output tile
// through red[8][TILE] (16-byte stores); each chunk threadgroup adds its sums in fixed point
// (chess_fixed, three relaxed 32-bit atomic adds per output) into partial, and the tile's last
// chunk threadgroup (counted in sem[tile]) reads the totals back into y and zeroes them; the
// tile-0 threadgroups add their non-zero counts into sem[tiles] before counting in, so tile 0's
// last threadgroup writes dens[0]; every counter and total is reset by its consumer (sem >= tiles
// + 1 int32 zeros). Only thread 0 fences, after the threadgroup barrier: a device fence, a relaxed
// atomic, and a second fence in the last threadgroup (the CUDA twin counts in with one acq_rel
// atomic instead, the same step in CUDA's memory model; Metal's device atomics are relaxed only).
// Needs Metal 3.2 device-scope fences (atomic_thread_fence with thread_scope_device).
// res: null, or the residual added to y after y's own rounding (the spin kernels' _res variants).
// partial_in: the call site's scratch of >= 3 * M * N float32 zeros (lo, mid, hi words), zeros again
// when the launch ends (an input, as the CUDA twin; the workspace token orders the launches that
// share it).
// RD, RN, RT, theta: a rotary embedding of y's first RN outputs (the _rope variants; RN = 0: none),
// as the CUDA twin.
template <typename T, int M, int N, int K, int KC, int VPL, int RD = 0, int RN = 0, int RT = 0>
inline void chess_spin_finish(thread const float (*acc)[VPL], thread const float* accb, const device float* partial_in,
                              device T* y, device float* dens, const device int* sem_in, int nnz,
                              threadgroup float (*red)[32 * VPL], threadgroup int* flag, uint tid, uint lane,
                              uint warp, int tile, int chunk, int tiles,
                              const device T* res, const device T* yg = nullptr, device T* yn = nullptr,
                              float eps = 0.0f, float theta = 0.0f) {
  constexpr int TILE = 32 * VPL;
  constexpr int CHUNKS = (K + KC - 1) / KC;
  static_assert(CHUNKS <= chess_max_chunks(), "the fixed-point totals have headroom for 511 chunks");
  device atomic_int* sem = (device atomic_int*)(sem_in);
  device atomic_uint* words = (device atomic_uint*)(partial_in);
  device atomic_int* high = (device atomic_int*)(partial_in);
  for (int m = 0; m < M; ++m) {
    threadgroup float4* dst = (threadgroup float4*)(&red[warp][lane * VPL]);
    for (int q = 0; q < VPL / 4; ++q)
      dst[q] = float4(acc[m][4 * q], acc[m][4 * q + 1], acc[m][4 * q + 2], acc[m][4 * q + 3]) + accb[m];
    threadgroup_barrier(mem_flags::mem_threadgroup);
    for (int i = int(tid); i < TILE; i += 256) {
      float s = 0.0f;
      for (int w8 = 0; w8 < 8; ++w8) s += red[w8][i];
      const int n = tile * TILE + i;
      if (n < N) {  // the fixed-point partial as three 32-bit adds: low 20 bits, next 20, the signed rest
        const long q = chess_fixed(s);
        atomic_fetch_add_explicit(&words[m * N + n], uint(q & 0xFFFFF), memory_order_relaxed);
        atomic_fetch_add_explicit(&words[(M + m) * N + n], uint((q >> 20) & 0xFFFFF), memory_order_relaxed);
        atomic_fetch_add_explicit(&high[(2 * M + m) * N + n], int(q >> 40), memory_order_relaxed);
      }
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
  }
  threadgroup_barrier(mem_flags::mem_device);
  if (tid == 0) {
    if (tile == 0) atomic_fetch_add_explicit(&sem[tiles], nnz, memory_order_relaxed);
    atomic_thread_fence(mem_flags::mem_device, memory_order_seq_cst, thread_scope_device);  // release
    const bool last = atomic_fetch_add_explicit(&sem[tile], 1, memory_order_relaxed) == CHUNKS - 1;
    if (last) atomic_thread_fence(mem_flags::mem_device, memory_order_seq_cst, thread_scope_device);  // acquire
    *flag = last ? 1 : 0;
  }
  threadgroup_barrier(mem_flags::mem_device | mem_flags::mem_threadgroup);
  if (*flag == 0) return;
  static_assert(RN == 0 || (RD % 2 == 0 && 256 % RD == 0 && TILE % RD == 0 && M <= 8), "rope pairs must stay in a tile");
  threadgroup float* rot = &red[0][0];  // RN > 0: the tile's rounded outputs, M * TILE <= 8 * TILE floats
  for (int i = int(tid); i < M * TILE; i += 256) {
    const int m = i / TILE, n = tile * TILE + i % TILE;
    if (n < N) {
      device uint* w32 = (device uint*)(partial_in);
      const long q = long(((device int*)w32)[(2 * M + m) * N + n]) * 1099511627776l  // hi * 2^40
                     + long(w32[(M + m) * N + n]) * 1048576l + long(w32[m * N + n]);  // + mid * 2^20 + lo
      float s = chess_unfixed(q);
      w32[m * N + n] = 0u;  // zeros again for the next launch at this site
      w32[(M + m) * N + n] = 0u;
      w32[(2 * M + m) * N + n] = 0u;
      if (res) s = float(static_cast<T>(s)) + float(res[m * N + n]);
      if (RN > 0) rot[i] = float(static_cast<T>(s));
      else y[m * N + n] = static_cast<T>(s);
    }
  }
  if (RN > 0) {  // rotate pairs of the rounded outputs, as MLX's rope does with the product's output
    threadgroup_barrier(mem_flags::mem_threadgroup);
    const float c = precise::cos(theta), sn = precise::sin(theta);
    for (int i = int(tid); i < M * TILE; i += 256) {
      const int m = i / TILE, n = tile * TILE + i % TILE;
      if (n < N) {
        float o = rot[i];
        if (n < RN) {
          const int d = n % RD;
          const bool lo = RT ? (d & 1) == 0 : d < RD / 2;
          const float p = rot[RT ? (i ^ 1) : lo ? i + RD / 2 : i - RD / 2];
          o = lo ? o * c - p * sn : p * sn + o * c;
        }
        y[m * N + n] = static_cast<T>(o);
      }
    }
  }
  if (tid == 0) {
    atomic_store_explicit(&sem[tile], 0, memory_order_relaxed);
    if (tile == 0) dens[0] = float(atomic_exchange_explicit(&sem[tiles], 0, memory_order_relaxed)) / float(M * K);
  }
  if (yn == nullptr) return;
  // A fused RMSNorm of y (the _ynorm variants), written by the last tile threadgroup to finish
  // (counted in sem[tiles + 1]), as the CUDA twin.
  threadgroup_barrier(mem_flags::mem_device);
  if (tid == 0) {
    atomic_thread_fence(mem_flags::mem_device, memory_order_seq_cst, thread_scope_device);  // release
    const bool fin = atomic_fetch_add_explicit(&sem[tiles + 1], 1, memory_order_relaxed) == tiles - 1;
    if (fin) atomic_thread_fence(mem_flags::mem_device, memory_order_seq_cst, thread_scope_device);  // acquire
    *flag = fin ? 1 : 0;
  }
  threadgroup_barrier(mem_flags::mem_device | mem_flags::mem_threadgroup);
  if (*flag == 0) return;
  static_assert(N % 8 == 0, "a fused RMSNorm reads y 16 bytes at a time");
  constexpr int VPT = (N / 8 + 255) / 256;  // 16-byte pieces per thread and token, all loads issued together
  for (int m = 0; m < M; ++m) {  // one token at a time: y, g and the outputs stay in registers
    uint4 yv[VPT], gq[VPT];
    float sq = 0.0f;
    for (int q = 0; q < VPT; ++q) {
      const int v = int(tid) + 256 * q;
      if (v < N / 8) {
        yv[q] = ((const device uint4*)(y + m * N))[v];
        gq[q] = ((const device uint4*)yg)[v];
        float f[8];
        chess_unpack8<T>(yv[q], f);
        for (int e = 0; e < 8; ++e) sq += f[e] * f[e];
      }
    }
    float rs;
    chess_block_rms<1>(&sq, &red[0][8 * m], N, eps, &rs, lane, warp);  // 8 floats per token of red's first row
    for (int q = 0; q < VPT; ++q) {
      const int v = int(tid) + 256 * q;
      if (v < N / 8) {
        float f[8], gf[8];
        chess_unpack8<T>(yv[q], f);
        chess_unpack8<T>(gq[q], gf);
        for (int e = 0; e < 8; ++e) yn[m * N + 8 * v + e] = static_cast<T>(gf[e] * float(static_cast<T>(f[e] * rs)));
      }
    }
  }
  if (tid == 0) atomic_store_explicit(&sem[tiles + 1], 0, memory_order_relaxed);
}

// Row sums of a sparse-output threadgroup (twin of the CUDA one), returned to every thread of the
// WPR simdgroups sharing the row. All 256 threads must call it.
template <int M, int WPR>
inline void chess_row_sums(thread const float* acc, threadgroup float (*red)[M], thread float* out, uint lane,
                           uint warp) {
  chess_warp_sums_to_shared<M>(acc, red, lane, warp);
  const uint w0 = warp - warp % WPR;
  for (int m = 0; m < M; ++m) {
    out[m] = 0.0f;
    for (int p = 0; p < WPR; ++p) out[m] += red[w0 + p][m];
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
}

// Round a float32 to T and back, where the op-by-op graph stores a T.
template <typename T>
inline float chess_round(float v) {
  return float(static_cast<T>(v));
}
