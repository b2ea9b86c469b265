// Tensor-core ceilings of Hopper's warpgroup MMAs, registers and one shared-memory B tile only
// (no loads in the loop): wgmma.mma_async.sp m64n256k32 (2:4 A from registers, "RS") against the
// dense wgmma m64n256k16, f16 inputs, fp32 accumulators. The Hopper path's ceiling, as
// mma_ceiling.cu is the warp-level path's (see docs/hopper.md).
// Build: nvcc -std=c++17 -O3 -gencode arch=compute_90a,code=sm_90a experiments/mma_probes/wgmma_ceiling.cu -o wgmma_ceiling
#include <cstdint>
#include <cstdio>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

constexpr int kIters = 2048, kPerGroup = 4;

// 128 fp32 accumulators of one thread (m64n256, f32: N / 2 registers)
#define ACC_OUT(d) \
  "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), \
  "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), \
  "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), \
  "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), \
  "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), \
  "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), \
  "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), \
  "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]), \
  "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]), \
  "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79]), \
  "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]), \
  "+f"(d[88]), "+f"(d[89]), "+f"(d[90]), "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95]), \
  "+f"(d[96]), "+f"(d[97]), "+f"(d[98]), "+f"(d[99]), "+f"(d[100]), "+f"(d[101]), "+f"(d[102]), "+f"(d[103]), \
  "+f"(d[104]), "+f"(d[105]), "+f"(d[106]), "+f"(d[107]), "+f"(d[108]), "+f"(d[109]), "+f"(d[110]), "+f"(d[111]), \
  "+f"(d[112]), "+f"(d[113]), "+f"(d[114]), "+f"(d[115]), "+f"(d[116]), "+f"(d[117]), "+f"(d[118]), "+f"(d[119]), \
  "+f"(d[120]), "+f"(d[121]), "+f"(d[122]), "+f"(d[123]), "+f"(d[124]), "+f"(d[125]), "+f"(d[126]), "+f"(d[127])
#define ACC_LIST "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, %64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, %80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, %96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, %112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127}"

// Shared-memory matrix descriptor, no swizzle (layout type 0): start, leading and stride byte
// offsets, each >> 4. The B tile's values do not matter here, only that every address is inside it.
__device__ __forceinline__ uint64_t smem_desc(const void* p, uint32_t lbo, uint32_t sbo) {
  const uint32_t s = static_cast<uint32_t>(__cvta_generic_to_shared(p));
  return uint64_t((s & 0x3FFFF) >> 4) | (uint64_t(lbo >> 4) << 16) | (uint64_t(sbo >> 4) << 32);
}

__device__ __forceinline__ void sparse_mma(float (&d)[128], const uint32_t (&a)[4], uint64_t b, uint32_t meta) {
  // operands 128-131: A, 132: B descriptor, 133: metadata; selector 0, scale-d 1, scales 1, no B transpose
  asm volatile("wgmma.mma_async.sp.sync.aligned.m64n256k32.f32.f16.f16 " ACC_LIST
               ", {%128, %129, %130, %131}, %132, %133, 0, 1, 1, 1, 0;\n"
               : ACC_OUT(d) : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(meta));
}

__device__ __forceinline__ void dense_mma(float (&d)[128], const uint32_t (&a)[4], uint64_t b) {
  asm volatile("wgmma.mma_async.sync.aligned.m64n256k16.f32.f16.f16 " ACC_LIST
               ", {%128, %129, %130, %131}, %132, 1, 1, 1, 0;\n"
               : ACC_OUT(d) : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b));
}

template <bool kSparse>
__global__ void __launch_bounds__(256) spin(float* out) {
  // B: 256 (N) x 32 (sparse: dense K of k32) or 16 (dense k16) halves, 8-row x 16-byte core matrices
  __shared__ __align__(1024) __half b_tile[256 * 32];
  for (int i = threadIdx.x; i < 256 * 32; i += blockDim.x) b_tile[i] = __float2half(0.001f * (i % 97));
  __syncthreads();
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");  // generic stores -> wgmma reads
  __syncthreads();
  const uint64_t b = smem_desc(b_tile, 128, kSparse ? 512 : 256);
  uint32_t a[4];
  for (int i = 0; i < 4; ++i) {
    const __half2 h = __floats2half2_rn(0.001f * (threadIdx.x % 31 + i), 0.002f);
    a[i] = *reinterpret_cast<const uint32_t*>(&h);
  }
  float d[128];
  for (int i = 0; i < 128; ++i) d[i] = 0.f;
  for (int it = 0; it < kIters; ++it) {
    asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#pragma unroll
    for (int k = 0; k < kPerGroup; ++k) {
      if constexpr (kSparse) sparse_mma(d, a, b, 0x44444444u);  // nibble 0b0100: keep elements 0 and 1
      else dense_mma(d, a, b);
    }
    asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
    asm volatile("wgmma.wait_group.sync.aligned 1;\n" ::: "memory");
  }
  asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");
  float s = 0.f;
  for (int i = 0; i < 128; ++i) s += d[i];
  if (s == 123.f) out[0] = s;  // keeps the loop alive
}

template <bool kSparse>
void run(const char* name, float* out) {
  int sms;
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0);
  const dim3 grid(sms * 2), block(256);  // two warpgroups a CTA, two CTAs an SM where registers allow
  spin<kSparse><<<grid, block>>>(out);
  cudaEvent_t t0, t1;
  cudaEventCreate(&t0);
  cudaEventCreate(&t1);
  cudaEventRecord(t0);
  for (int r = 0; r < 5; ++r) spin<kSparse><<<grid, block>>>(out);
  cudaEventRecord(t1);
  cudaEventSynchronize(t1);
  float ms;
  cudaEventElapsedTime(&ms, t0, t1);
  // dense-equivalent FLOPs: a 2:4 m64n256k32 does the work of a dense 64x256x32 product
  const double flops = 5.0 * grid.x * (block.x / 128) * kIters * kPerGroup * 2.0 * 64 * 256 * (kSparse ? 32 : 16);
  printf("%-44s %7.0f dense-equivalent TFLOP/s (%s)\n", name, flops / ms / 1e9,
         cudaGetErrorString(cudaGetLastError()));
}

int main() {
  float* out;
  cudaMalloc(&out, 4);
  run<true>("wgmma.sp m64n256k32 f16 -> f32, A in registers", out);
  run<false>("wgmma m64n256k16 f16 -> f32, A in registers", out);
  return cudaDeviceSynchronize() != cudaSuccess;
}
