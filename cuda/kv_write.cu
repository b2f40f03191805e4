// One decode token's keys and values written into a KV cache's buffers in place
// (kv_cache.InPlaceKVCache), with q handed on as this launch's output. Twin: metal/kv_write.metal.
//   kb[0, h, p, :] = k[0, h, 0, :], vb[0, h, p, :] = v[0, h, 0, :] for h < NKV / D;  q_out = q.
// Why in place: MLX's slice update writes in place only when it may donate the buffer, and while
// the previous token still runs on the GPU its launches hold that buffer, so the update copies
// the whole cache (2 x 16.8 MB a layer at 4096 positions of Llama-3-8B) at every pipelined token.
// Why q_out: MLX orders one launch after another (edges of its CUDA graph, Metal barriers) only
// through buffers the first one writes as outputs; the attention reads q_out, so it runs after
// this write. kb and vb arrive as inputs (MLX passes them const) and are written through a cast.
// Layout: kb, vb (1, NKV / D, cap, D) row-major, the cache's own buffers; meta int32
// [p, cap, 0, 0] (16 bytes: smaller arrays are slow for kernels to read). A p outside [0, cap)
// writes nothing.
// Template: T, NQ (q's elements), NKV (elements of k, and of v, for one token), D (head size).
// Grid: max(NQ, NKV) threads, threadgroup 256.
const unsigned i = blockIdx.x * 256 + threadIdx.x;
const int p = meta[0];
const int cap = meta[1];
if (i < NQ) q_out[i] = q[i];
if (i < NKV && p >= 0 && p < cap) {
  const unsigned h = i / D;
  const size_t at = ((size_t)h * cap + p) * D + (i - h * D);
  ((T*)kb)[at] = k[i];
  ((T*)vb)[at] = v[i];
}
