// The body of prefill_kernel<kTail>, the wgmma prefill kernel: causal prefill on Hopper's warpgroup MMA, the
// transposed formulation of the warp-level kernel (prefill.cu.j2) with the data movement and the softmax rebuilt
// around wgmma (docs/hopper.md, sections 7-8). One CTA: 128 queries of one head, 384 threads.
//   producer WG     one thread copies each 64-key slab into a kStages-deep ring of stages (producer_body.cuh)
//   2 consumer WGs  64 queries each, both reading every stage (consumer_body.cuh):
//                   scores by wgmma (.sp for 2:4 K), softmax of a slab against a per-query reference max m
//                   identical in every thread of the WG, P = exp2(s * scale - m) to a [query][key] swizzled tile
//                   with stmatrix (double-buffered B of the next O^T), O^T += V^T P^T by wgmma.sp (or the dense
//                   form for the tables' dense V blocks). If any P exceeds 2^8, a flag sends the whole WG through
//                   the exact path once (maxima per query, O and l rescaled, P rewritten); after the first slab
//                   it is rare.
// Queries past the prompt (the last CTA's) are computed on zeros and not written.
//
// prefill_sm90.cu.j2 declares the __global__ (its tensor-map parameters depend on the tier mix) with prm and the
// pointers k_tma / v_tma, and includes this inside it. The producer and the consumers are statement blocks of this
// one function, not functions of their own: called as functions (even always inlined) they were simplified
// before inlining with sm and prm as opaque pointers, and the kernel's address arithmetic and register allocation
// changed (other PTX and SASS for every tier mix).
//
// k_tma: the dense K rows (balanced) or the dense K pool (block tables, or the prompt's K rows with k_rows);
// v_tma: the dense V pool (block tables); null where the tier mix has none.
// kTail: the prompt is not a multiple of 128 queries (partial last slabs, rows past it), or the block-table call
// gives per-sequence lengths (a chunk after cached tokens). A separate instantiation: the tail code in the main
// kernel measured 6 % slower on whole tiles (H200, 32K).
  extern __shared__ unsigned char raw[];
  Smem& sm = *reinterpret_cast<Smem*>(raw + ((1024u - (smem_addr(raw) & 1023u)) & 1023u));
  // CTA = query blocks 2 qb (WG 0) and 2 qb + 1 (WG 1) of one head; both WGs read every stage up to WG 0's
  // diagonal, WG 1 one more. (Two heads of a KV group on one block, same slab count, measured 4 % slower.)
  // Order of the CTAs (launch order): the blocks from prm.light up head by head, longest first, so the CTAs in
  // flight share one KV head's stream in L2; then the light blocks of all heads, longest first, so the grid
  // ends on short CTAs (light_blocks; a global longest-first order lost L2 reuse: -6 % at 32K).
  const int n_qb = gridDim.x, n_hb = gridDim.y * gridDim.z, heavy = n_qb - prm.light;
  const int cta = blockIdx.x + n_qb * (blockIdx.y + gridDim.y * blockIdx.z);
  int qb, hb;
  if (cta < heavy * n_hb) {
    hb = cta / heavy, qb = n_qb - 1 - cta % heavy;
  } else {
    const int r = cta - heavy * n_hb;
    hb = r % n_hb, qb = prm.light - 1 - r / n_hb;
  }
  const int h = hb % gridDim.y, b = hb / gridDim.y;
  const long long kv_head = (long long)b * prm.num_kv_heads + h / kGroup;  // flat (batch, KV head) of the cache
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  // Block tables with kTail: a chunk of num_q queries at positions off.. over the kv_len keys of sequence b
  // (seqlens and qlens: keys clamped to the tables, queries to the chunk's rows and to the keys -- HieraCache
  // never passes more queries than keys; null: the whole prompt). A CTA past the chunk (padding rows only) runs as
  // the first CTA of an empty prompt, two slabs, and its epilogue writes zeros and -inf: an early return measured
  // 3 % slower on whole prompts (H200, 32K). Without kTail every sequence is the whole prompt, a multiple of 128
  // queries: lengths from the parameters, uniform for the compiler (loaded from memory, the same loop ran 2 %
  // slower). The other tier mixes: always the whole prompt.
  int kv_len = prm.num_queries, num_q = prm.num_queries, off = 0;
  if constexpr (kTable) {
    if (kTail) {
      kv_len = min(max(prm.seqlens ? prm.seqlens[b] : kv_len, 0), 64 * prm.max_blocks);
      num_q = min(min(max(prm.qlens ? prm.qlens[b] : num_q, 0), prm.num_queries), kv_len);
      off = kCtaQ * qb >= num_q ? -kCtaQ * qb : kv_len - num_q;  // position of chunk row 0 (idle: row kCtaQ qb at 0)
    }
  }
  // up to WG 1's last slab
  const int n_slabs = kTable ? (off + kCtaQ * qb + kCtaQ - 1) / 64 + 1 : 2 * qb + 2;
  if (threadIdx.x == 0) {
    for (int s = 0; s < kStages; ++s) mbar_init(&sm.full[s], 1), mbar_init(&sm.empty[s], kConsumers * 4);
    for (int c = 0; c < kConsumers; ++c) sm.flag[c][0] = sm.flag[c][1] = 0;
    sm.head_row = hb;
  }
  // The last slabs of a prompt that is not a multiple of 64 tokens are copied in part (the cache holds whole
  // 32-token chunks); the rest of the stage must be finite (masked keys get P = 0, and 0 * NaN is NaN), so in
  // the CTAs that reach past the cache the ring starts zeroed. Generic-proxy stores, then the async proxy's
  // copies: fence.proxy.async between.
  if (!kTable && kTail && 64 * n_slabs > prm.capacity) {
    for (int i = threadIdx.x; i < kStages * kStageBytes / 16; i += kThreads)
      reinterpret_cast<uint4*>(sm.stage)[i] = make_uint4(0, 0, 0, 0);
    async_proxy_fence();
  }
  __syncthreads();

  if (warp >= kConsumers * 4) {  // producer warpgroup: one thread issues the copies
    asm volatile("setmaxnreg.dec.sync.aligned.u32 24;\n");
    if (warp == kConsumers * 4 && lane == 0) {
#include "sm90/producer_body.cuh"
    }
    return;
  }
#include "sm90/consumer_body.cuh"
