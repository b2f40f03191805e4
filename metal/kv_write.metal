// One decode token's keys and values written into a KV cache's buffers in place
// (kv_cache.InPlaceKVCache), with q handed on as this launch's output. Twin of cuda/kv_write.cu,
// which says why (MLX copies a buffer it cannot donate; its barriers follow output buffers).
//   kb[0, h, p, :] = k[0, h, 0, :], vb[0, h, p, :] = v[0, h, 0, :] for h < NKV / D;  q_out = q.
// Layout: kb, vb (1, NKV / D, cap, D) row-major, the cache's own buffers; meta int32
// [p, cap, 0, 0]. A p outside [0, cap) writes nothing.
// Template: T, NQ (q's elements), NKV (elements of k, and of v, for one token), D (head size).
// Grid: max(NQ, NKV) threads, threadgroup 256.
const uint i = threadgroup_position_in_grid.x * 256 + thread_position_in_threadgroup.x;
const int p = meta[0];
const int cap = meta[1];
if (i < NQ) q_out[i] = q[i];
if (i < NKV && p >= 0 && p < cap) {
  const uint h = i / D;
  const size_t at = ((size_t)h * cap + p) * D + (i - h * D);
  ((device T*)kb)[at] = k[i];
  ((device T*)vb)[at] = v[i];
}
