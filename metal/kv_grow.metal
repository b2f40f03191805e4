// A KV cache's buffers grown while one decode token is written (kv_cache.InPlaceKVCache, every
// 256 positions), with q handed on as kv_write does. Twin of cuda/kv_grow.cu, which says why.
//   kb2[0, h, s, :] = kb[0, h, s, :] for s < p, k[0, h, 0, :] at s = p, 0 after (vb2 likewise);
//   q_out = q.
// Layout: kb, vb (1, NKV / D, cap, D); kb2, vb2 (1, NKV / D, cap2, D), cap2 > p; meta int32
// [p, cap, cap2, 0], p <= cap.
// Template: T, NQ, NKV, D (as kv_write).
// Grid: max(NQ, NKV * cap2) threads, threadgroup 256.
const size_t i = (size_t)threadgroup_position_in_grid.x * 256 + thread_position_in_threadgroup.x;
const int p = meta[0];
const int cap = meta[1];
const int cap2 = meta[2];
if (i < NQ) q_out[i] = q[i];
if (i < (size_t)NKV * cap2) {
  const size_t row = i / D;
  const int d = (int)(i - row * D);
  const int s = (int)(row % cap2);
  const int h = (int)(row / cap2);
  T kv = T(0.0f), vv = T(0.0f);
  if (s < p && s < cap) {
    const size_t at = ((size_t)h * cap + s) * D + d;
    kv = kb[at];
    vv = vb[at];
  } else if (s == p) {
    kv = k[h * D + d];
    vv = v[h * D + d];
  }
  kb2[i] = kv;
  vb2[i] = vv;
}
