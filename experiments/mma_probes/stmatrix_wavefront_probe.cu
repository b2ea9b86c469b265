// Shared-memory cost of the P stores: stmatrix.m8n8.x4 with .trans (the sm_90a prefill kernel's store_p: [query][key]
// rows of a 128-byte-swizzled tile, from the S^T accumulator fragments), without .trans ([key][query] rows), and a
// plain 16-byte st.shared a lane, each 4 x 1000 times a warp in 132 CTAs of 4 warps. On an H200:
//   nvcc -O3 -gencode arch=compute_90a,code=sm_90a experiments/mma_probes/stmatrix_wavefront_probe.cu -o stm
//   ncu --metrics l1tex__data_pipe_lsu_wavefronts_mem_shared_op_st.sum,l1tex__data_bank_conflicts_pipe_lsu_mem_shared_op_st.sum ./stm
// Measured: 8,448,000 wavefronts (4 an instruction, 512 bytes: no bank conflicts) and 0 conflicts for all three.
#include <cuda.h>  // CUtensorMap, named by ptx.cuh
#include <cuda_fp16.h>

#include <cstdint>
#include <cstdio>

// The kernel's store_p (templates/sm90/softmax.cuh) and what it needs before it: the constants layout.cuh and the
// helpers common.cuh.j2 give the kernel (the exponentials are only declared: the probe calls none of them).
#define HSG_WGMMA_TYPE "f16"
namespace sm90 {
constexpr bool kDenseK = false;  // scores as S^T: store_p<true> transposes into [query][key]
constexpr int kN = 64;
using Element2 = __half2;
__device__ uint32_t pack2(float lo, float hi);
__device__ float fast_exp2(float x);
#include "../../templates/sm90/ptx.cuh"
#include "../../templates/sm90/softmax.cuh"
}  // namespace sm90
using sm90::smem_addr;
using sm90::store_p;
template <int MODE>
__global__ void k(int iters, uint32_t seed, int* out) {
  __shared__ alignas(1024) unsigned char tile[64 * 128];
  const int lane = threadIdx.x % 32, w = threadIdx.x / 32;
  uint32_t pk[16];
  for (int i = 0; i < 16; ++i) pk[i] = seed * (i + 1) + threadIdx.x;
  for (int it = 0; it < iters; ++it) {
    if (MODE == 0)  // transposed into [query][key], the kernel's P store
      store_p<true>(tile, pk, w, lane);
    else if (MODE == 1)  // untransposed into [key][query]
      store_p<false>(tile, pk, w, lane);
    else
#pragma unroll
      for (int t = 0; t < 4; ++t)  // 16-byte st.shared per lane (a whole 512 B a warp)
        asm volatile("st.shared.v4.b32 [%0], {%1, %2, %3, %4};\n" ::"r"(smem_addr(tile + (((t * 4 + w) * 32 + lane) * 16) % 8192)),
                     "r"(pk[4 * t]), "r"(pk[4 * t + 1]), "r"(pk[4 * t + 2]), "r"(pk[4 * t + 3]) : "memory");
  }
  __syncthreads();
  out[blockIdx.x * blockDim.x + threadIdx.x] = tile[threadIdx.x * 7 % 8192];
}
int main() {
  int* out; cudaMalloc(&out, 132 * 128 * 4);
  k<0><<<132, 128>>>(1000, 1, out);
  k<1><<<132, 128>>>(1000, 1, out);
  k<2><<<132, 128>>>(1000, 1, out);
  cudaDeviceSynchronize();
  printf("done %s\n", cudaGetErrorString(cudaGetLastError()));
}
