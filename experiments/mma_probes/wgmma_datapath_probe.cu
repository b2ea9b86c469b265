// The data path of the sm_90a all-2:4 prefill kernel's consumer warpgroups (templates/prefill_sm90.cu.j2),
// without the softmax and without the producer: what the per-slab operand traffic alone allows.
//
// Per 64-key slab each of NWG warpgroups (NQ = 64 queries each as in the kernel, or 128; one CTA an SM)
// issues the kernel's 8 wgmmas -- 4 x m64nNQk32.sp for the scores (A = K fragments, B = its Q tile in shared
// memory) and 4 for O^T += V^T P^T (A = V fragments, B = its P tile) -- in one commit group and waits for
// them; the operands are whatever the shared memory holds (timing only). Options (the kernel: NQ=64 LOADS=1
// PSTORE=1, the default):
//   LOADS=0  fragments stay in registers (the wgmmas alone)
//   LOADS=1  K and V fragments and metadata loaded from a shared-memory stage every slab (the kernel)
//   LOADS=2  the same fragments loaded from global memory (L2-resident), one slab ahead
//   LOADS=3  K read by the tensor core from shared memory by descriptor (SS), V fragments as in 1
//   LOADS=4  K and V both by descriptor, only the metadata loaded (a cache with 2:4 values in a canonical
//            shared-memory layout would allow it; here the descriptors point at the stage as it is)
//   PSTORE=1 P^T stored with NQ / 16 stmatrix a thread, fence.proxy.async and the warpgroup's named barrier, while
//            the slab's wgmmas run (the kernel); 2: the same without the proxy fence, 3: without the barrier
//            (both wrong as synchronization, timing only); 4: stores, fence and barrier before the wgmma issue
//
// Build and run (H200), e.g.
//   for l in 0 1 2 3 4; do for p in 0 1; do
//     nvcc -std=c++17 -O3 -gencode arch=compute_90a,code=sm_90a -DNQ=64 -DNWG=2 -DLOADS=$l -DPSTORE=$p \
//          experiments/mma_probes/wgmma_datapath_probe.cu -o probe && ./probe; done; done
#include <cuda.h>  // CUtensorMap, named by ptx.cuh
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdio>

#ifndef NWG
#define NWG 2
#endif
#ifndef LOADS
#define LOADS 1
#endif
#ifndef PSTORE
#define PSTORE 1
#endif
#ifndef NQ
#define NQ 64
#endif
static_assert(NQ == 64 || NQ == 128, "NQ: queries a warpgroup, the wgmma N");
constexpr int kAcc = NQ / 2;  // f32 accumulators a thread of a m64nNQ tile
#define HSG_STR2(x) #x
#define HSG_STR(x) HSG_STR2(x)
#define SHAPE "m64n" HSG_STR(NQ) "k32"

constexpr int kIters = 4096, kStages = 4, kStageBytes = 18432;  // the kernel's 2:4 K + V stage
constexpr int kVVals = 9216, kKMeta = 8192, kVMeta = 17408;

// The kernel's descriptors, swizzle, fences and barriers (templates/sm90/ptx.cuh), f16 operands.
#define HSG_WGMMA_TYPE "f16"
#include "../../templates/sm90/ptx.cuh"

#if NQ == 128
#define ACC "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31,%32,%33,%34,%35,%36,%37,%38,%39,%40,%41,%42,%43,%44,%45,%46,%47,%48,%49,%50,%51,%52,%53,%54,%55,%56,%57,%58,%59,%60,%61,%62,%63}"
#define ACC_OUT(d) "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
#define OPS_RS "{%64, %65, %66, %67}, %68, %69"
#define OPS_SS "%64, %65, %66"
#else
#define OPS_RS "{%32, %33, %34, %35}, %36, %37"
#define OPS_SS "%32, %33, %34"
#define ACC "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31}"
#define ACC_OUT(d)                                                                                                  \
  "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]),     \
      "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]),      \
      "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]),     \
      "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
#endif

// The probe's own wgmma forms: N = NQ (64 or 128) and the shared-memory 2:4 A, where the header has the kernel's
// m64n64 register-A form only (for NQ = 64 mma_rs issues the same instruction as its mma_sp<false>).
// d (64 x NQ, f32) += A (2:4, registers) * B (shared memory)
__device__ __forceinline__ void mma_rs(float (&d)[kAcc], uint4 a, uint64_t b, uint32_t meta) {
  asm volatile("wgmma.mma_async.sp.sync.aligned." SHAPE ".f32.f16.f16 " ACC ", " OPS_RS ", 0, 1, 1, 1, 0;\n"
               : ACC_OUT(d)
               : "r"(a.x), "r"(a.y), "r"(a.z), "r"(a.w), "l"(b), "r"(meta));
}
// d += A (2:4, shared memory by descriptor) * B (shared memory)
__device__ __forceinline__ void mma_ss(float (&d)[kAcc], uint64_t a, uint64_t b, uint32_t meta) {
  asm volatile("wgmma.mma_async.sp.sync.aligned." SHAPE ".f32.f16.f16 " ACC ", " OPS_SS ", 0, 1, 1, 1, 0, 0;\n"
               : ACC_OUT(d)
               : "l"(a), "l"(b), "r"(meta));
}
#if NQ == 128  // the header's fence_acc pins the 32 accumulators of a m64n64 tile; m64n128 has 64
__device__ __forceinline__ void fence_acc(float (&d)[64]) {
#pragma unroll
  for (int i = 0; i < 64; ++i) asm volatile("" : "+f"(d[i])::"memory");
}
#endif
__device__ __forceinline__ uint4 ld_global(const void* p) {  // not kept in L1 (the kernel's stage is shared memory)
  uint4 r;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
               : "l"(p));
  return r;
}
__device__ __forceinline__ uint32_t ld_global32(const void* p) {
  uint32_t r;
  asm volatile("ld.global.nc.L1::no_allocate.u32 %0, [%1];\n" : "=r"(r) : "l"(p));
  return r;
}

struct Smem {
  alignas(1024) unsigned char q[NWG][2][NQ * 128];  // per WG: Q, two 64-channel halves
  alignas(1024) unsigned char p[NWG][2][NQ * 128];  // per WG: P^T, double-buffered
  alignas(1024) unsigned char stage[kStages][kStageBytes];
};

// Fragments of one slab for warp w: K tiles (4 k32 steps) and metadata, V tiles (2 channel blocks x 2 chunks)
// and metadata, at the kernel's offsets. Metadata words get valid 2:4 nibbles (0b0100) OR-ed in.
struct Frags {
  uint4 ka[4], va[2][2];
  uint32_t ke[4], ve[2][2];
};
template <bool kGlobal, bool kMetaOnly = false>
__device__ __forceinline__ void load_frags(Frags& f, const unsigned char* src, int w, int lane) {
  auto ld = [&](int off) { return kGlobal ? ld_global(src + off) : *reinterpret_cast<const uint4*>(src + off); };
  auto ld32 = [&](int off) {
    return kGlobal ? ld_global32(src + off) : *reinterpret_cast<const uint32_t*>(src + off);
  };
#pragma unroll
  for (int ks = 0; ks < 4 && !kMetaOnly; ++ks) f.ka[ks] = ld(((w * 4 + ks) * 32 + lane) * 16);
  const uint4 e = ld(kKMeta + (w * 16 + (lane >> 2) * 2 + (lane & 1)) * 16);
  f.ke[0] = e.x | 0x44444444u, f.ke[1] = e.y | 0x44444444u, f.ke[2] = e.z | 0x44444444u, f.ke[3] = e.w | 0x44444444u;
#pragma unroll
  for (int mb = 0; mb < 2; ++mb)
#pragma unroll
    for (int kk = 0; kk < 2; ++kk) {
      if (!kMetaOnly) f.va[mb][kk] = ld(kVVals + ((kk * 8 + 4 * mb + w) * 32 + lane) * 16);
      f.ve[mb][kk] = ld32(kVMeta + ((kk * 16 + (lane >> 2) * 2 + (lane & 1)) * 8 + 4 * mb + w) * 4) | 0x44444444u;
    }
}

// P^T of a slab (placeholder values) with the kernel's NQ / 16 transposed stmatrix a thread into a
// [query][key] 128B-swizzled tile; then, as chosen, the proxy fence and the warpgroup's named barrier. Not the
// kernel's store_p (templates/sm90/softmax.cuh): same addresses for NQ = 64, but NQ / 16 stores, placeholder
// registers and the fence and barrier as options.
template <bool kFence, bool kBarrier>
__device__ __forceinline__ void store_p(unsigned char* tile, int j, int w, int lane, int bar) {
  const int mi = lane >> 3, r = lane & 7;
#pragma unroll
  for (int t = 0; t < NQ / 16; ++t) {
    const int row = 8 * (2 * t + (mi >> 1)) + r, col = 16 * w + 8 * (mi & 1);
    asm volatile("stmatrix.sync.aligned.m8n8.x4.trans.shared.b16 [%0], {%1, %2, %3, %4};\n" ::"r"(
                     smem_addr(tile + sw128(row, col))),
                 "r"(j), "r"(j + 1), "r"(j + 2), "r"(j + 3)
                 : "memory");
  }
  if constexpr (kFence) async_proxy_fence();
  if constexpr (kBarrier) named_barrier(bar, 128);
}

__global__ void __launch_bounds__(NWG * 128, 1) slabs(float* out, const unsigned char* gsrc) {
  extern __shared__ unsigned char raw[];
  Smem& sm = *reinterpret_cast<Smem*>(raw + ((1024u - (smem_addr(raw) & 1023u)) & 1023u));
  for (int i = threadIdx.x; i < (int)sizeof(Smem) / 4; i += blockDim.x)  // finite f16 values in [1, 2)
    reinterpret_cast<uint32_t*>(&sm)[i] = 0x3c003c00u ^ (i * 0x9e3779b9u & 0x03ff03ffu);
  async_proxy_fence();
  __syncthreads();
  const int wg = __shfl_sync(~0u, threadIdx.x / 128, 0), w = (threadIdx.x / 32) % 4, lane = threadIdx.x % 32;
  float s[kAcc], o0[kAcc], o1[kAcc];
  for (int i = 0; i < kAcc; ++i) s[i] = o0[i] = o1[i] = 0.f;
  Frags f;
  for (int i = 0; i < 4; ++i) f.ka[i] = make_uint4(i, 2 * i, 3 * i, 4 * i), f.ke[i] = 0x44444444u;
  for (int i = 0; i < 4; ++i) f.va[i / 2][i % 2] = make_uint4(i, i, i, i), f.ve[i / 2][i % 2] = 0x44444444u;
  for (int j = 0; j < kIters; ++j) {
    const unsigned char* st = sm.stage[j % kStages];
#if LOADS == 2
    Frags next;  // one slab ahead: the global loads' latency overlaps this slab
    load_frags<true>(next, gsrc + (size_t)((blockIdx.x * 7 + j) & 1023) * kStageBytes, w, lane);
#elif LOADS == 1 || LOADS == 3
    load_frags<false>(f, st, w, lane);
#elif LOADS == 4
    load_frags<false, true>(f, st, w, lane);
#endif
#if PSTORE == 4
    store_p<true, true>(sm.p[wg][j & 1], j, w, lane, 1 + wg);
#endif
    fence_acc(s);
    fence_acc(o0);
    fence_acc(o1);
    mma_fence();
#pragma unroll
    for (int ks = 0; ks < 4; ++ks) {
      const uint64_t b = desc_sw128(smem_addr(sm.q[wg][ks / 2]) + (ks % 2) * 64);
#if LOADS >= 3
      mma_ss(s, desc_sw128(smem_addr(st) + ks * 32), b, f.ke[ks]);
#else
      mma_rs(s, f.ka[ks], b, f.ke[ks]);
#endif
    }
    const unsigned char* pt = sm.p[wg][(j - 1) & 1];
#if LOADS == 4  // both channel blocks point at the stage's first V tile: same bytes, inside the stage
#pragma unroll
    for (int kk = 0; kk < 2; ++kk)
      mma_ss(o0, desc_sw128(smem_addr(st) + kVVals + kk * 32), desc_sw128(smem_addr(pt) + kk * 64), f.ve[0][kk]);
#pragma unroll
    for (int kk = 0; kk < 2; ++kk)
      mma_ss(o1, desc_sw128(smem_addr(st) + kVVals + kk * 32), desc_sw128(smem_addr(pt) + kk * 64), f.ve[1][kk]);
#else
#pragma unroll
    for (int kk = 0; kk < 2; ++kk) mma_rs(o0, f.va[0][kk], desc_sw128(smem_addr(pt) + kk * 64), f.ve[0][kk]);
#pragma unroll
    for (int kk = 0; kk < 2; ++kk) mma_rs(o1, f.va[1][kk], desc_sw128(smem_addr(pt) + kk * 64), f.ve[1][kk]);
#endif
    mma_commit();
#if PSTORE == 1 || PSTORE == 2 || PSTORE == 3
    store_p<PSTORE != 2, PSTORE != 3>(sm.p[wg][j & 1], j, w, lane, 1 + wg);
#endif
    mma_wait<0>();
    fence_acc(s);
    fence_acc(o0);
    fence_acc(o1);
#if LOADS == 2
    f = next;
#endif
  }
  float acc = 0.f;
  for (int i = 0; i < kAcc; ++i) acc += s[i] + o0[i] + o1[i];
  out[blockIdx.x * blockDim.x + threadIdx.x] = acc;  // keeps the work
}

int main() {
  int sms = 0;
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0);
  const int smem = sizeof(Smem) + 1024, grid = sms * 4;
  cudaFuncSetAttribute(slabs, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  float* out = nullptr;
  unsigned char* gsrc = nullptr;
  cudaMalloc(&out, size_t(grid) * NWG * 128 * sizeof(float));
  cudaMalloc(&gsrc, size_t(1024) * kStageBytes);  // 18 MB of stages: L2-resident
  cudaMemset(gsrc, 0x11, size_t(1024) * kStageBytes);
  slabs<<<grid, NWG * 128, smem>>>(out, gsrc);  // warm-up
  cudaEvent_t t0, t1;
  cudaEventCreate(&t0);
  cudaEventCreate(&t1);
  cudaEventRecord(t0);
  for (int r = 0; r < 5; ++r) slabs<<<grid, NWG * 128, smem>>>(out, gsrc);
  cudaEventRecord(t1);
  cudaEventSynchronize(t1);
  float ms = 0.f;
  cudaEventElapsedTime(&ms, t0, t1);
  const cudaError_t err = cudaGetLastError();
  // dense-equivalent FLOPs: a 2:4 m64n64k32 does the work of a dense 64x64x32 product
  const double flops = 5.0 * grid * NWG * double(kIters) * 8 * (64.0 * NQ * 32 * 2);
  printf("NQ=%d NWG=%d LOADS=%d PSTORE=%d: %.0f dense-eq TFLOP/s, %.1f ns a slab of the CTA (%s)\n", NQ, NWG, LOADS, PSTORE,
         flops / ms / 1e9, ms * 1e6 / 5 / (grid / sms) / kIters, cudaGetErrorString(err));
  return err == cudaSuccess ? 0 : 1;
}
