// Sparse-output GEMV, MLX affine-quantized weights (4 or 8 bits, group GS), fused with the gate.
// Twin of cuda/spout_q.cu: MLX's own layout (w (N, K*BITS/32) uint32, scales/biases (N, K/GS)),
// WPR simdgroups per row, 16-byte weight loads that each lie inside one quantization group,
// I2F-free decoding, 4 accumulation chains.
// Template: T, M, K, N, BITS, GS, WPR. Grid: ceil(N / (8/WPR)) * 256, threadgroup 256.
constexpr int VPW = 32 / BITS;
constexpr int VPL = 4 * VPW;
constexpr int WORDS_PER_ROW = K / VPW;
constexpr int RPB = 8 / WPR;
const uint lane = thread_index_in_simdgroup;
const uint warp = simdgroup_index_in_threadgroup;
const int part = int(warp) % WPR;
const int r = int(threadgroup_position_in_grid.x) * RPB + int(warp) / WPR;
const bool active = chess_row_active<T, M, N>(a, r);
float acc[M];
for (int m = 0; m < M; ++m) acc[m] = 0.0f;
if (active) {
  const device uint32_t* wrow = w + r * WORDS_PER_ROW;
  const device T* srow = scales + r * (K / GS);
  const device T* brow = biases + r * (K / GS);
  for (int v = part * 32 + int(lane); v < WORDS_PER_ROW / 4; v += 32 * WPR) {
    uint32_t words[4];
    chess_load_words<4>(wrow + 4 * v, words);
    const int k0 = v * VPL;
    const float s = float(srow[k0 / GS]);
    const float b = float(brow[k0 / GS]);
    for (int m = 0; m < M; ++m) {
      const device uint4* xv = (const device uint4*)(x + m * K + k0);
      float qx[4] = {0.0f, 0.0f, 0.0f, 0.0f}, xs[4] = {0.0f, 0.0f, 0.0f, 0.0f};
      for (int c = 0; c < VPL / 8; ++c) {
        float xf[8];
        chess_unpack8<T>(xv[c], xf);
        for (int e = 0; e < 8; ++e) {
          const int i = c * 8 + e;
          qx[e & 3] += chess_qfloat<BITS>(words[i / VPW], BITS * (i % VPW)) * xf[e];
          xs[e & 3] += xf[e];
        }
      }
      acc[m] += s * ((qx[0] + qx[1]) + (qx[2] + qx[3])) + b * ((xs[0] + xs[1]) + (xs[2] + xs[3]));
    }
  }
}
threadgroup float red[8][M];
chess_finish_rows<T, M, N, WPR>(acc, a, y, r, red, lane, warp);
