// Warp-specialized sm_90a prefill probe (docs/hopper.md, section 7): causal attention over the
// cache's 2:4 K and V formats on wgmma.mma_async.sp, with the data movement and softmax shaped
// for speed. CTA = 128 queries of one query head; f16, head_dim 128, L a multiple of 128.
//
//   producer WG     one thread: per 64-key slab, four cp.async.bulk copies (K values 8 KB, K metadata 1 KB,
//                   V values 8 KB, V metadata 1 KB: contiguous in the cache format) into a
//                   4-deep ring of stages, completion counted on the stage's mbarrier
//   2 consumer WGs  each 64 queries, both reading every stage:
//                     S^T_j = K_j Q^T        4 x m64n64k32.sp (A = K fragments from the stage)
//                     O^T  += V_{j-1}^T P_{j-1}^T, issued right behind S^T_j, so the tensor
//                                            cores run it while this WG does softmax of slab j
//                     softmax of S^T_j against a per-query reference max m kept in registers,
//                     identical in every thread of the WG; P = exp2(x - m) is written with
//                     stmatrix.trans into a [query][key] 128B-swizzled tile (B of the next O^T),
//                     double-buffered. If any P exceeds kLazyP (m more than 8 below a score),
//                     a flag in shared memory sends the whole WG through the exact path once:
//                     column maxima over the WG, rescale of O and l, P rewritten. After the
//                     first slab this is rare, so the cross-warp reduction leaves the loop.
#include "wgmma_common.cuh"

namespace {

using namespace sm90;

#ifndef PROBE_STAGES
#define PROBE_STAGES 4
#endif
constexpr int kD = 128, kN = 64, kKSteps = kD / 32, kStages = PROBE_STAGES, kConsumers = 2;
constexpr int kThreads = kConsumers * 128 + 128;
constexpr int kKVals = 0, kKMeta = 8192, kVVals = 9216, kVMeta = 17408, kStageBytes = 18432;
// Lazy softmax bound: P = exp2(x - m) may reach 2^8 before m must move (f16 holds it with room)
constexpr float kLazyP = 256.f;

struct Smem {
  alignas(1024) unsigned char q[kConsumers][2][kN * 128];  // per WG: two 64-channel halves, [query][ch]
  alignas(1024) unsigned char p[kConsumers][2][kN * 128];  // per WG: P_j, [query][key], double-buffered
  alignas(1024) unsigned char stage[kStages][kStageBytes];
  float red[kConsumers][4][kN];
  int flag[kConsumers][2];
  uint64_t full[kStages], empty[kStages];
};

__device__ __forceinline__ float ex2(float x) {
#ifdef PROBE_NO_EXP  // experiment: what the softmax costs without the MUFU
  return x;
#else
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
#endif
}

__device__ __forceinline__ uint32_t pack_half2(float lo, float hi) {
  const __half2 h = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&h);
}

// Accumulator register i (S^T: row = key, column = query) of thread (w, g, qq):
__device__ __forceinline__ int acc_row(int w, int g, int i) { return 16 * w + g + 8 * ((i >> 1) & 1); }
__device__ __forceinline__ int acc_col(int qq, int i) { return 8 * (i >> 2) + 2 * qq + (i & 1); }
__device__ __forceinline__ int col_slot(int i) { return 2 * (i >> 2) + (i & 1); }  // per-thread query slot

// P^T accumulator pairs -> [query][key] tile: 16 packed registers, 4 stmatrix.x4.trans.
// Register pk[4t + k] is the 8x8 block (keys 16w + 8 (k & 1) + 0..7, queries 8 (2t + (k >> 1)) + 0..7).
__device__ __forceinline__ void store_p(unsigned char* tile, const uint32_t (&pk)[16], int w, int lane) {
  const int mi = lane >> 3, r = lane & 7;
#pragma unroll
  for (int t = 0; t < 4; ++t) {
    const int query = 8 * (2 * t + (mi >> 1)) + r, key = 16 * w + 8 * (mi & 1);
    asm volatile("stmatrix.sync.aligned.m8n8.x4.trans.shared.b16 [%0], {%1, %2, %3, %4};\n" ::"r"(
                     smem_addr(tile + sw128(query, key))),
                 "r"(pk[4 * t]), "r"(pk[4 * t + 1]), "r"(pk[4 * t + 2]), "r"(pk[4 * t + 3])
                 : "memory");
  }
}

// p = exp2(s * scale - m) (causal mask on the diagonal slab), packed to f16 for the P.V GEMM, and the
// slab's row sums per query slot; returns the largest p (from the packed values: 16 HMNMX2, not 32 FMNMX).
template <bool kDiag>
__device__ __forceinline__ float exponentiate_(const float (&s)[32], const float (&m)[16], float scale_log2,
                                               int w, int g, int qq, uint32_t (&pk)[16], float (&ls)[16]) {
  float p[32];
#ifdef PROBE_NO_SOFTMAX  // experiment: GEMMs and data movement only
#pragma unroll
  for (int k = 0; k < 16; ++k) pk[k] = pack_half2(s[2 * k], s[2 * k + 1]);
#pragma unroll
  for (int c = 0; c < 16; ++c) ls[c] = 0.f;
  return 0.f;
#endif
#pragma unroll
  for (int i = 0; i < 32; ++i) {
    float x = fmaf(s[i], scale_log2, -m[col_slot(i)]);
    if (kDiag && acc_row(w, g, i) > acc_col(qq, i)) x = -INFINITY;
    p[i] = ex2(x);
  }
  __half2 hm[4];
#pragma unroll
  for (int k = 0; k < 16; ++k) {
    pk[k] = pack_half2(p[2 * k], p[2 * k + 1]);
    const __half2 h = *reinterpret_cast<const __half2*>(&pk[k]);
    hm[k & 3] = k < 4 ? h : __hmax2(hm[k & 3], h);
  }
  // slot c = 2 v2 + v0 holds the thread's two keys (v1 = 0, 1) of one query
#pragma unroll
  for (int c = 0; c < 16; ++c) ls[c] = p[(c & 1) + 4 * (c >> 1)] + p[(c & 1) + 2 + 4 * (c >> 1)];
  const __half2 h = __hmax2(__hmax2(hm[0], hm[1]), __hmax2(hm[2], hm[3]));
  return fmaxf(__low2float(h), __high2float(h));
}

// The mask only costs on the diagonal slab: a uniform branch picks the unmasked code elsewhere.
__device__ __forceinline__ float exponentiate(const float (&s)[32], const float (&m)[16], float scale_log2,
                                              bool diag, int w, int g, int qq, uint32_t (&pk)[16],
                                              float (&ls)[16]) {
  return diag ? exponentiate_<true>(s, m, scale_log2, w, g, qq, pk, ls)
              : exponentiate_<false>(s, m, scale_log2, w, g, qq, pk, ls);
}

// Ping-pong of the two consumer WGs' GEMM issue (FA3's warp-scheduler barriers). Opt-in experiment:
// measured 594 vs 608 dense-eq TFLOP/s without it (H200, 32K), so the default build leaves it out.
__device__ __forceinline__ void turn_wait(int id) {
#ifdef PROBE_PINGPONG
  named_barrier(id, 256);
#endif
}
__device__ __forceinline__ void turn_pass(int id) {
#ifdef PROBE_PINGPONG
  named_arrive(id, 256);
#endif
}

__device__ __forceinline__ void fence_o(float (&o)[2][32]) {
  fence_acc(o[0]);
  fence_acc(o[1]);
}

// O^T (2 x 64 channels x 64 queries) += V_slab^T P^T, A = V fragments held in registers.
__device__ __forceinline__ void issue_pv(float (&o)[2][32], const uint4 (&va)[2][2], const uint32_t (&ve)[2][2],
                                         const unsigned char* p_tile) {
#pragma unroll
  for (int mb = 0; mb < 2; ++mb)
#pragma unroll
    for (int kk = 0; kk < 2; ++kk) mma_sp(o[mb], va[mb][kk], desc_sw128(smem_addr(p_tile) + kk * 64), ve[mb][kk], 1);
}

// V fragments of a stage for warp w: 32-token chunk kk, channel tile mt = 4 mb + w.
__device__ __forceinline__ void load_v(const unsigned char* stage, int w, int lane, uint4 (&va)[2][2],
                                       uint32_t (&ve)[2][2]) {
  const int g = lane >> 2, qq = lane & 3;
#pragma unroll
  for (int mb = 0; mb < 2; ++mb)
#pragma unroll
    for (int kk = 0; kk < 2; ++kk) {
      const int mt = 4 * mb + w;
      va[mb][kk] = *reinterpret_cast<const uint4*>(stage + kVVals + ((kk * 8 + mt) * 32 + lane) * 16);
      ve[mb][kk] = *reinterpret_cast<const uint32_t*>(stage + kVMeta + ((kk * 16 + g * 2 + (qq & 1)) * 8 + mt) * 4);
    }
}

// Exact path of the lazy softmax (the whole WG takes it together): new reference max per query over the
// WG's 64 keys, O and l rescaled, P recomputed and stored, then the barrier that publishes it.
__device__ __forceinline__ void exact_path(const float (&s)[32], float (&m)[16], float (&l)[16], float (&o)[2][32],
                                           float scale_log2, bool diag, int w, int g, int qq, int lane,
                                           float (&red)[4][kN], unsigned char* p_tile, int bar) {
  float cm[16];
#pragma unroll
  for (int c = 0; c < 16; ++c) cm[c] = -INFINITY;
#pragma unroll
  for (int i = 0; i < 32; ++i) {
    const float x = diag && acc_row(w, g, i) > acc_col(qq, i) ? -INFINITY : s[i] * scale_log2;
    cm[col_slot(i)] = fmaxf(cm[col_slot(i)], x);
  }
#pragma unroll
  for (int c = 0; c < 16; ++c) {
    cm[c] = fmaxf(cm[c], __shfl_xor_sync(0xffffffffu, cm[c], 4));
    cm[c] = fmaxf(cm[c], __shfl_xor_sync(0xffffffffu, cm[c], 8));
    cm[c] = fmaxf(cm[c], __shfl_xor_sync(0xffffffffu, cm[c], 16));
  }
  if (g == 0)
#pragma unroll
    for (int c = 0; c < 16; ++c) red[w][8 * (c >> 1) + 2 * qq + (c & 1)] = cm[c];
  named_barrier(bar, 128);
  float alpha[16];
#pragma unroll
  for (int c = 0; c < 16; ++c) {
    const int col = 8 * (c >> 1) + 2 * qq + (c & 1);
    const float mn = fmaxf(m[c], fmaxf(fmaxf(red[0][col], red[1][col]), fmaxf(red[2][col], red[3][col])));
    alpha[c] = ex2(m[c] - mn);  // 0 while m is -inf
    m[c] = mn;
  }
#pragma unroll
  for (int i = 0; i < 32; ++i) o[0][i] *= alpha[col_slot(i)], o[1][i] *= alpha[col_slot(i)];
  uint32_t pk[16];
  float ls[16];
  exponentiate(s, m, scale_log2, diag, w, g, qq, pk, ls);
#pragma unroll
  for (int c = 0; c < 16; ++c) l[c] = l[c] * alpha[c] + ls[c];
  store_p(p_tile, pk, w, lane);
  async_proxy_fence();
  named_barrier(bar, 128);
}

// Final row sums (over g, then the WG's 4 warps), O / l to out [query][channel] and the natural-log LSE.
__device__ __forceinline__ void epilogue(float (&o)[2][32], float (&l)[16], const float (&m)[16], int w, int g,
                                         int qq, float (&red)[4][kN], int bar, __half* oh, float* lse_q) {
#pragma unroll
  for (int c = 0; c < 16; ++c) {
    l[c] += __shfl_xor_sync(0xffffffffu, l[c], 4);
    l[c] += __shfl_xor_sync(0xffffffffu, l[c], 8);
    l[c] += __shfl_xor_sync(0xffffffffu, l[c], 16);
  }
  named_barrier(bar, 128);  // red is free
  if (g == 0)
#pragma unroll
    for (int c = 0; c < 16; ++c) red[w][8 * (c >> 1) + 2 * qq + (c & 1)] = l[c];
  named_barrier(bar, 128);
#pragma unroll
  for (int c = 0; c < 16; ++c) {
    const int col = 8 * (c >> 1) + 2 * qq + (c & 1);
    l[c] = red[0][col] + red[1][col] + red[2][col] + red[3][col];
  }
#pragma unroll
  for (int mb = 0; mb < 2; ++mb)
#pragma unroll
    for (int i = 0; i < 32; ++i)
      oh[acc_col(qq, i) * kD + 64 * mb + acc_row(w, g, i)] = __float2half(o[mb][i] / l[col_slot(i)]);
  if (w == 0 && g == 0)
#pragma unroll
    for (int c = 0; c < 16; ++c) lse_q[8 * (c >> 1) + 2 * qq + (c & 1)] = (m[c] + __log2f(l[c])) * 0.69314718f;
}

// Q rows [q0, q0 + 64) of one head into the WG's two 64-channel swizzled halves.
__device__ __forceinline__ void load_q(unsigned char (&dst)[2][kN * 128], const __half* qh, int tid) {
  for (int i = tid; i < kN * kD / 8; i += 128) {
    const int n = i / (kD / 8), c = (i % (kD / 8)) * 8;
    *reinterpret_cast<uint4*>(dst[c / 64] + sw128(n, c % 64)) = *reinterpret_cast<const uint4*>(qh + n * kD + c);
  }
}

__global__ void __launch_bounds__(kThreads, 1)
    attention_ws(const __half* __restrict__ q, const unsigned char* __restrict__ kv,
                 const unsigned char* __restrict__ km, const unsigned char* __restrict__ vv,
                 const unsigned char* __restrict__ vm, long long vals_hs, long long meta_hs, __half* out, float* lse,
                 int L, int group, float scale_log2) {
  extern __shared__ unsigned char raw[];
  Smem& sm = *reinterpret_cast<Smem*>(raw + ((1024u - (smem_addr(raw) & 1023u)) & 1023u));
  // CTA = query blocks 2 qb (WG 0) and 2 qb + 1 (WG 1) of one head; both WGs read every stage up to WG 0's
  // diagonal, WG 1 one more. (Two heads of a KV group on one block, same slab count, measured 4 % slower.)
  const int qb = gridDim.x - 1 - blockIdx.x, h = blockIdx.y, kvh = h / group;  // longest rows first
  const int n_slabs = 2 * qb + 2;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (threadIdx.x == 0) {
    for (int s = 0; s < kStages; ++s) mbar_init(&sm.full[s], 1), mbar_init(&sm.empty[s], kConsumers * 4);
    for (int c = 0; c < kConsumers; ++c) sm.flag[c][0] = sm.flag[c][1] = 0;
  }
  __syncthreads();

  if (warp >= kConsumers * 4) {  // producer warpgroup: one thread issues the copies
    asm volatile("setmaxnreg.dec.sync.aligned.u32 24;\n");
    if (warp == kConsumers * 4 && lane == 0) {
      const unsigned char* kvh_vals = kv + kvh * vals_hs * 16;
      const unsigned char* kvh_meta = km + kvh * meta_hs * 4;
      const unsigned char* vvh_vals = vv + kvh * vals_hs * 16;
      const unsigned char* vvh_meta = vm + kvh * meta_hs * 4;
      for (int j = 0; j < n_slabs; ++j) {
        const int st = j % kStages;
#ifdef PROBE_L2_ONLY  // experiment: every CTA reads the first slabs again (no traffic beyond L1/L2 reuse)
        const long long src = j % 8;
#else
        const long long src = j;
#endif
        if (j >= kStages) mbar_wait(&sm.empty[st], ((j / kStages) - 1) & 1);
        unsigned char* dst = sm.stage[st];
        mbar_expect_tx(&sm.full[st], kStageBytes);
        bulk_copy(dst + kKVals, kvh_vals + src * 8192, 8192, &sm.full[st]);
        bulk_copy(dst + kKMeta, kvh_meta + src * 1024, 1024, &sm.full[st]);
        bulk_copy(dst + kVVals, vvh_vals + src * 8192, 8192, &sm.full[st]);
        bulk_copy(dst + kVMeta, vvh_meta + src * 1024, 1024, &sm.full[st]);
      }
    }
    return;
  }

  asm volatile("setmaxnreg.inc.sync.aligned.u32 240;\n");
  const int wg = warp / 4, w = warp % 4, g = lane >> 2, qq = lane & 3, tid = threadIdx.x % 128;
  const int bar = 1 + wg;
  const int last = 2 * qb + wg;  // this WG's diagonal slab
  const int q0 = 64 * last;
  // With PROBE_PINGPONG, GEMM turns alternate between the WGs (named barriers 3 + wg, 256 threads) so that
  // one WG's GEMMs run while the other does its softmax. WG 0 goes first; WG 1 has one turn more (its extra
  // slab), settled after the loop.
  const int my_turn = 3 + wg, their_turn = 4 - wg;
  if (wg == 1) turn_pass(their_turn);
  load_q(sm.q[wg], q + ((long long)h * L + q0) * kD, tid);
  async_proxy_fence();
  named_barrier(bar, 128);

  float m[16], l[16], o[2][32], s[32];
#pragma unroll
  for (int c = 0; c < 16; ++c) m[c] = -INFINITY, l[c] = 0.f;
#pragma unroll
  for (int i = 0; i < 32; ++i) o[0][i] = o[1][i] = 0.f;
  uint4 va[2][2];
  uint32_t ve[2][2];

  // S^T_j = K_j Q^T from stage st (issued, not committed)
  auto issue_qk = [&](const unsigned char* stage) {
    uint4 ka[kKSteps];
#pragma unroll
    for (int ks = 0; ks < kKSteps; ++ks)
      ka[ks] = *reinterpret_cast<const uint4*>(stage + kKVals + ((w * kKSteps + ks) * 32 + lane) * 16);
    const uint4 ke = *reinterpret_cast<const uint4*>(stage + kKMeta + (w * 16 + g * 2 + (qq & 1)) * 16);
    const uint32_t kev[4] = {ke.x, ke.y, ke.z, ke.w};
#pragma unroll
    for (int ks = 0; ks < kKSteps; ++ks)
      mma_sp(s, ka[ks], desc_sw128(smem_addr(sm.q[wg][ks / 2]) + (ks % 2) * 64), kev[ks], ks > 0);
  };

  // Softmax of S^T_j into P_j (lazy fast path, then the exact path when any thread overflowed). Runs while
  // O^T += V_{j-1}^T P_{j-1}^T may still be in flight: touches neither O nor va/ve before wait<0>.
  auto softmax = [&](int j, const unsigned char* stage) {
    uint32_t pk[16];
    float ls[16];
    const bool diag = j == last;
    const float pmax = exponentiate(s, m, scale_log2, diag, w, g, qq, pk, ls);
    if (pmax > kLazyP) sm.flag[wg][j & 1] = j + 1;
    unsigned char* p_tile = sm.p[wg][j & 1];
    store_p(p_tile, pk, w, lane);
    async_proxy_fence();
    named_barrier(bar, 128);
    const bool slow = *reinterpret_cast<volatile int*>(&sm.flag[wg][j & 1]) == j + 1;

    mma_wait<0>();
    fence_o(o);
    if (j > 0) {
      __syncwarp();
      if (lane == 0) mbar_arrive(&sm.empty[(j - 1) % kStages]);
    }
    load_v(stage, w, lane, va, ve);

    if (!slow) {
#pragma unroll
      for (int c = 0; c < 16; ++c) l[c] += ls[c];
      return;
    }
    exact_path(s, m, l, o, scale_log2, diag, w, g, qq, lane, sm.red[wg], p_tile, bar);
  };

  {  // slab 0: S^T only
    mbar_wait(&sm.full[0], 0);
    fence_acc(s);
    turn_wait(my_turn);
    mma_fence();
    issue_qk(sm.stage[0]);
    mma_commit();
    turn_pass(their_turn);
    mma_wait<0>();
    fence_acc(s);
    softmax(0, sm.stage[0]);
  }
  for (int j = 1; j <= last; ++j) {
    const int st = j % kStages;
    mbar_wait(&sm.full[st], (j / kStages) & 1);
    fence_acc(s);
    fence_o(o);
    turn_wait(my_turn);
    mma_fence();
    issue_qk(sm.stage[st]);
    mma_commit();
    issue_pv(o, va, ve, sm.p[wg][(j - 1) & 1]);
    mma_commit();
    turn_pass(their_turn);
    mma_wait<1>();
    fence_acc(s);
    softmax(j, sm.stage[st]);
  }
  fence_o(o);
  turn_wait(my_turn);
  mma_fence();
  issue_pv(o, va, ve, sm.p[wg][last & 1]);
  mma_commit();
  // WG 1 still has two turns. Passes and waits must alternate on each barrier (two passes in a row would
  // complete a barrier phase without its waiter), so WG 0 passes, waits for WG 1's pass, passes again.
  if (wg == 0) turn_pass(their_turn);
  mma_wait<0>();
  fence_o(o);
  __syncwarp();
  if (lane == 0) mbar_arrive(&sm.empty[last % kStages]);
  if (wg == 0) {
    turn_wait(my_turn);
    turn_pass(their_turn);
    mbar_wait(&sm.full[(last + 1) % kStages], ((last + 1) / kStages) & 1);  // slab past the diagonal:
    __syncwarp();                                                          // release it unread
    if (lane == 0) mbar_arrive(&sm.empty[(last + 1) % kStages]);
  }

  epilogue(o, l, m, w, g, qq, sm.red[wg], bar, out + ((long long)h * L + q0) * kD, lse + (long long)h * L + q0);
}


}  // namespace

// q, out [heads, L, 128] f16; K and V packed per KV head (format.pack_k / pack_v, batch 1), head strides
// in uint4 (values) and 32-bit words (metadata); lse [heads, L] f32 (natural log); query head h reads KV
// head h / (heads / kv_heads).
extern "C" int probe_attention_ws(const void* q, const void* kv, const void* km, const void* vv, const void* vm,
                                  long long vals_hs, long long meta_hs, void* out, float* lse, int heads,
                                  int kv_heads, int L, float scale, void* stream) {
  if (L % 128 || L <= 0 || heads < 1 || heads > 65535 || kv_heads < 1 || heads % kv_heads)
    return cudaErrorInvalidValue;
  const int bytes = sizeof(Smem) + 1024;
  static const cudaError_t attr =
      cudaFuncSetAttribute(attention_ws, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
  if (attr != cudaSuccess) return attr;
  attention_ws<<<dim3(L / 128, heads), kThreads, bytes, static_cast<cudaStream_t>(stream)>>>(
      static_cast<const __half*>(q), static_cast<const unsigned char*>(kv), static_cast<const unsigned char*>(km),
      static_cast<const unsigned char*>(vv), static_cast<const unsigned char*>(vm), vals_hs, meta_hs,
      static_cast<__half*>(out), lse, L, heads / kv_heads, scale * 1.44269504f);
  return cudaGetLastError();
}
