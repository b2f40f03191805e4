// Sparse-output GEMV, float16/bfloat16 weights, fused with the gate product. Twin of
// cuda/spout_f.cu (same tiling: WPR simdgroups per row, 8/WPR rows per 256-thread threadgroup).
//   y[m, r] = a[m, r] * dot(w[r, :], x[m, :])  for rows r with any a[:, r] != 0,  else 0.
// Template: T, M, K, N, WPR. Grid: ceil(N / (8/WPR)) * 256 threads, threadgroup 256. K % 8 == 0.
constexpr int RPB = 8 / WPR;
const uint lane = thread_index_in_simdgroup;
const uint warp = simdgroup_index_in_threadgroup;
const int part = int(warp) % WPR;
const int r = int(threadgroup_position_in_grid.x) * RPB + int(warp) / WPR;
const bool active = chess_row_active<T, M, N>(a, r);
float acc[M];
for (int m = 0; m < M; ++m) acc[m] = 0.0f;
if (active) chess_row_dot<T, M, K, WPR>(w + r * K, x, part, acc, lane);
threadgroup float red[8][M];
chess_finish_rows<T, M, N, WPR>(acc, a, y, r, red, lane, warp);
