// Probe of the sm_90a prefill design in docs/hopper.md, section 7: causal attention of one KV
// head's queries on wgmma.mma_async.sp, reading the cache's 2:4 K and V formats as they are
// (hierasparse_gen/format.py, templates/compress.cu.j2). One consumer warpgroup a CTA, no
// producer warp, plain loads: the correctness of the operand layouts first, speed later.
//
//   S^T (64 keys x 64 queries) = K_j Q^T      4 x m64n64k32 .sp, A = K fragments (registers),
//                                              B = Q in shared memory, K-major, 128B swizzle
//   softmax over keys (rows; exact per slab: column max over 4 warps through shared memory)
//   O^T (128 channels x 64 queries) += V_j^T P^T   2 x 2 x m64n64k32 .sp, A = V fragments,
//                                              B = P in shared memory, K-major, 128B swizzle
//
// Entry points (C ABI, f16, head_dim 128, L a multiple of 64; driven by benchmarks/hopper_probe.py):
//   probe_st: S^T of one 64 x 64 tile; probe_ot: O^T of one slab for a given P; probe_attention.
#include "wgmma_common.cuh"

namespace {

using namespace sm90;
constexpr int kD = 128, kN = 64, kKSteps = kD / 32, kMTiles = kD / 16;

__device__ __forceinline__ void mma_commit_wait() {
  mma_commit();
  mma_wait<0>();
}

// The cache's K format: 16-token tile T, k-step ks: 32 lanes x 16 B, then metadata words
// (T * 16 + g * 2 + q) * kKSteps + ks for lanes q < 2 (lanes q >= 2 read their pair's word: unused).
struct KTile { uint4 a[kKSteps]; uint32_t e[kKSteps]; };
__device__ __forceinline__ KTile load_k(const uint4* vals, const uint32_t* meta, int tile) {
  const int lane = threadIdx.x % 32, g = lane >> 2, q = lane & 3;
  KTile t;
#pragma unroll
  for (int ks = 0; ks < kKSteps; ++ks) {
    t.a[ks] = vals[(tile * kKSteps + ks) * 32 + lane];
    t.e[ks] = meta[(tile * 16 + g * 2 + (q & 1)) * kKSteps + ks];
  }
  return t;
}

// The cache's V format: 32-token chunk c, 16-channel tile mt: vals (c * kMTiles + mt) * 32 + lane,
// metadata (c * 16 + g * 2 + q) * kMTiles + mt.
__device__ __forceinline__ void load_v(const uint4* vals, const uint32_t* meta, int chunk, int mt, uint4& a,
                                       uint32_t& e) {
  const int lane = threadIdx.x % 32, g = lane >> 2, q = lane & 3;
  a = vals[(chunk * kMTiles + mt) * 32 + lane];
  e = meta[(chunk * 16 + g * 2 + (q & 1)) * kMTiles + mt];
}

// Q rows [q0, q0 + 64) of one head ([L, 128] f16) into two 64-column swizzled regions.
__device__ __forceinline__ void load_q(unsigned char* smem_q, const __half* q, int q0, int L) {
  for (int i = threadIdx.x; i < kN * kD / 8; i += blockDim.x) {
    const int n = i / (kD / 8), c = (i % (kD / 8)) * 8;
    uint4 v = make_uint4(0, 0, 0, 0);
    if (q0 + n < L) v = *reinterpret_cast<const uint4*>(q + (long long)(q0 + n) * kD + c);
    *reinterpret_cast<uint4*>(smem_q + (c / 64) * kN * 128 + sw128(n, c % 64)) = v;
  }
}

// S^T = K_tile Q^T for the warpgroup's 64 keys (warp w: 16-key tile `tile0 + w`).
__device__ __forceinline__ void scores(float (&s)[32], const KTile& k, const unsigned char* smem_q) {
  fence_acc(s);
  mma_fence();
#pragma unroll
  for (int ks = 0; ks < kKSteps; ++ks)
    mma_sp(s, k.a[ks], desc_sw128(smem_addr(smem_q) + (ks / 2) * kN * 128 + (ks % 2) * 64), k.e[ks], ks > 0);
  mma_commit_wait();
  fence_acc(s);
}

// O^T[mb] += V^T P^T over the slab's 64 keys (two 32-token chunks), P in smem_p.
__device__ __forceinline__ void values(float (&o)[2][32], const uint4* vals, const uint32_t* meta, int slab,
                                       const unsigned char* smem_p) {
  const int w = threadIdx.x / 32;
  uint4 a[2][2];
  uint32_t e[2][2];
#pragma unroll
  for (int mb = 0; mb < 2; ++mb)
#pragma unroll
    for (int kk = 0; kk < 2; ++kk) load_v(vals, meta, 2 * slab + kk, 4 * mb + w, a[mb][kk], e[mb][kk]);
  fence_acc(o[0]);
  fence_acc(o[1]);
  mma_fence();
#pragma unroll
  for (int mb = 0; mb < 2; ++mb)
#pragma unroll
    for (int kk = 0; kk < 2; ++kk)
      mma_sp(o[mb], a[mb][kk], desc_sw128(smem_addr(smem_p) + kk * 64), e[mb][kk], 1);
  mma_commit_wait();
  fence_acc(o[0]);
  fence_acc(o[1]);
}

__global__ void __launch_bounds__(128) st_kernel(const __half* q, const uint4* kv, const uint32_t* km, float* st) {
  __shared__ __align__(1024) unsigned char smem_q[2 * kN * 128];
  load_q(smem_q, q, 0, kN);
  async_proxy_fence();
  __syncthreads();
  const KTile k = load_k(kv, km, threadIdx.x / 32);
  float s[32];
#pragma unroll
  for (int i = 0; i < 32; ++i) s[i] = 0.f;
  scores(s, k, smem_q);
  const int w = threadIdx.x / 32, g = (threadIdx.x % 32) >> 2, qq = threadIdx.x & 3;
  for (int i = 0; i < 32; ++i)
    st[(16 * w + g + 8 * ((i >> 1) & 1)) * kN + 8 * (i >> 2) + 2 * qq + (i & 1)] = s[i];
}

// P [64 queries][64 keys] f16 -> smem; O (64 queries x 128 channels, f32) = P V_slab0.
__global__ void __launch_bounds__(128) ot_kernel(const __half* p, const uint4* vv, const uint32_t* vm, float* o_out) {
  __shared__ __align__(1024) unsigned char smem_p[kN * 128];
  for (int i = threadIdx.x; i < kN * kN; i += blockDim.x)
    *reinterpret_cast<__half*>(smem_p + sw128(i / kN, i % kN)) = p[i];
  async_proxy_fence();
  __syncthreads();
  float o[2][32];
#pragma unroll
  for (int mb = 0; mb < 2; ++mb)
#pragma unroll
    for (int i = 0; i < 32; ++i) o[mb][i] = 0.f;
  values(o, vv, vm, 0, smem_p);
  const int w = threadIdx.x / 32, g = (threadIdx.x % 32) >> 2, qq = threadIdx.x & 3;
#pragma unroll
  for (int mb = 0; mb < 2; ++mb)
#pragma unroll
    for (int i = 0; i < 32; ++i)
      o_out[(8 * (i >> 2) + 2 * qq + (i & 1)) * kD + 64 * mb + 16 * w + g + 8 * ((i >> 1) & 1)] = o[mb][i];
}

// Causal attention, one head a grid row: CTA = 64 queries, slabs of 64 keys up to the diagonal.
__global__ void __launch_bounds__(128) attention_kernel(const __half* q, const uint4* kv, const uint32_t* km,
                                                        const uint4* vv, const uint32_t* vm, long long vals_hs,
                                                        long long meta_hs, __half* out, float* lse, int L,
                                                        float scale_log2) {
  __shared__ __align__(1024) unsigned char smem_q[2 * kN * 128];
  __shared__ __align__(1024) unsigned char smem_p[kN * 128];
  __shared__ float red[4][kN];
  const int qb = gridDim.x - 1 - blockIdx.x, h = blockIdx.y;  // longest rows first
  const int w = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane >> 2, qq = lane & 3;
  const int q0 = qb * kN;
  q += (long long)h * L * kD;
  out += (long long)h * L * kD;
  kv += h * vals_hs;
  vv += h * vals_hs;
  km += h * meta_hs;
  vm += h * meta_hs;
  load_q(smem_q, q, q0, L);
  async_proxy_fence();
  __syncthreads();

  // per thread: 16 query columns c = 8 * v2 + 2 * qq + v0, slot (v2, v0) -> 2 * v2 + v0
  float m[16], l[16], o[2][32];
#pragma unroll
  for (int c = 0; c < 16; ++c) m[c] = -INFINITY, l[c] = 0.f;
#pragma unroll
  for (int mb = 0; mb < 2; ++mb)
#pragma unroll
    for (int i = 0; i < 32; ++i) o[mb][i] = 0.f;

  for (int j = 0; j <= qb; ++j) {
    const KTile k = load_k(kv, km, 4 * j + w);
    float s[32];
    scores(s, k, smem_q);
    float mx[16];
    for (int c = 0; c < 16; ++c) mx[c] = -INFINITY;
#pragma unroll
    for (int i = 0; i < 32; ++i) {
      const int key = 64 * j + 16 * w + g + 8 * ((i >> 1) & 1);
      const int col = 8 * (i >> 2) + 2 * qq + (i & 1);
      float x = s[i] * scale_log2;
      if (key > q0 + col) x = -INFINITY;  // only on the diagonal slab
      s[i] = x;
      const int c = 2 * (i >> 2) + (i & 1);
      mx[c] = fmaxf(mx[c], x);
    }
#pragma unroll
    for (int c = 0; c < 16; ++c) {  // over g (lanes 4 apart), then over the 4 warps
      mx[c] = fmaxf(mx[c], __shfl_xor_sync(0xffffffffu, mx[c], 4));
      mx[c] = fmaxf(mx[c], __shfl_xor_sync(0xffffffffu, mx[c], 8));
      mx[c] = fmaxf(mx[c], __shfl_xor_sync(0xffffffffu, mx[c], 16));
    }
    __syncthreads();  // red and smem_p of the previous slab are free
    if (g == 0)
      for (int c = 0; c < 16; ++c) red[w][8 * (c >> 1) + 2 * qq + (c & 1)] = mx[c];
    __syncthreads();
    float alpha[16];
#pragma unroll
    for (int c = 0; c < 16; ++c) {
      const int col = 8 * (c >> 1) + 2 * qq + (c & 1);
      const float m_new = fmaxf(m[c], fmaxf(fmaxf(red[0][col], red[1][col]), fmaxf(red[2][col], red[3][col])));
      alpha[c] = exp2f(m[c] - m_new);  // 0 on the first slab (m = -inf, m_new finite)
      m[c] = m_new;
      l[c] *= alpha[c];
    }
#pragma unroll
    for (int i = 0; i < 32; ++i) {
      const int c = 2 * (i >> 2) + (i & 1);
      const float p = exp2f(s[i] - m[c]);
      l[c] += p;
      const int key = 16 * w + g + 8 * ((i >> 1) & 1), col = 8 * (i >> 2) + 2 * qq + (i & 1);
      *reinterpret_cast<__half*>(smem_p + sw128(col, key)) = __float2half(p);
      o[0][i] *= alpha[c];
      o[1][i] *= alpha[c];
    }
    async_proxy_fence();
    __syncthreads();
    values(o, vv, vm, j, smem_p);
  }

  // row sums: over the thread's two keys (done), g, and the warps
#pragma unroll
  for (int c = 0; c < 16; ++c) {
    l[c] += __shfl_xor_sync(0xffffffffu, l[c], 4);
    l[c] += __shfl_xor_sync(0xffffffffu, l[c], 8);
    l[c] += __shfl_xor_sync(0xffffffffu, l[c], 16);
  }
  __syncthreads();
  if (g == 0)
    for (int c = 0; c < 16; ++c) red[w][8 * (c >> 1) + 2 * qq + (c & 1)] = l[c];
  __syncthreads();
#pragma unroll
  for (int c = 0; c < 16; ++c) {
    const int col = 8 * (c >> 1) + 2 * qq + (c & 1);
    l[c] = red[0][col] + red[1][col] + red[2][col] + red[3][col];
  }
#pragma unroll
  for (int mb = 0; mb < 2; ++mb)
#pragma unroll
    for (int i = 0; i < 32; ++i) {
      const int c = 2 * (i >> 2) + (i & 1), col = 8 * (i >> 2) + 2 * qq + (i & 1);
      const int ch = 64 * mb + 16 * w + g + 8 * ((i >> 1) & 1);
      if (q0 + col < L) out[(long long)(q0 + col) * kD + ch] = __float2half(o[mb][i] / l[c]);
    }
  if (w == 0 && g == 0)
    for (int c = 0; c < 16; ++c) {
      const int col = 8 * (c >> 1) + 2 * qq + (c & 1);
      if (q0 + col < L) lse[(long long)h * L + q0 + col] = (m[c] + log2f(l[c])) * 0.69314718f;
    }
}

}  // namespace

extern "C" int probe_st(const void* q, const void* kv, const void* km, float* st, void* stream) {
  st_kernel<<<1, 128, 0, static_cast<cudaStream_t>(stream)>>>(static_cast<const __half*>(q),
                                                              static_cast<const uint4*>(kv),
                                                              static_cast<const uint32_t*>(km), st);
  return cudaGetLastError();
}

extern "C" int probe_ot(const void* p, const void* vv, const void* vm, float* o, void* stream) {
  ot_kernel<<<1, 128, 0, static_cast<cudaStream_t>(stream)>>>(static_cast<const __half*>(p),
                                                              static_cast<const uint4*>(vv),
                                                              static_cast<const uint32_t*>(vm), o);
  return cudaGetLastError();
}

// q, out [heads, L, 128] f16; K and V packed per head (format.pack_k / pack_v, batch 1): head
// strides in uint4 (values) and 32-bit words (metadata); lse [heads, L] f32 (natural log).
extern "C" int probe_attention(const void* q, const void* kv, const void* km, const void* vv, const void* vm,
                               long long vals_hs, long long meta_hs, void* out, float* lse, int heads, int L,
                               float scale, void* stream) {
  if (L % kN || heads < 1 || heads > 65535) return cudaErrorInvalidValue;
  attention_kernel<<<dim3(L / kN, heads), 128, 0, static_cast<cudaStream_t>(stream)>>>(
      static_cast<const __half*>(q), static_cast<const uint4*>(kv), static_cast<const uint32_t*>(km),
      static_cast<const uint4*>(vv), static_cast<const uint32_t*>(vm), vals_hs, meta_hs,
      static_cast<__half*>(out), lse, L, scale * 1.44269504f);
  return cudaGetLastError();
}
