// Shared-memory cost of the P stores: stmatrix.m8n8.x4 with .trans (the sm_90a prefill kernel's store_p: [query][key]
// rows of a 128-byte-swizzled tile, from the S^T accumulator fragments), without .trans ([key][query] rows), and a
// plain 16-byte st.shared a lane, each 4 x 1000 times a warp in 132 CTAs of 4 warps. On an H200:
//   nvcc -O3 -gencode arch=compute_90a,code=sm_90a experiments/mma_probes/stmatrix_wavefront_probe.cu -o stm
//   ncu --metrics l1tex__data_pipe_lsu_wavefronts_mem_shared_op_st.sum,l1tex__data_bank_conflicts_pipe_lsu_mem_shared_op_st.sum ./stm
// Measured: 8,448,000 wavefronts (4 an instruction, 512 bytes: no bank conflicts) and 0 conflicts for all three.
#include <cstdio>
#include <cstdint>
__device__ __forceinline__ uint32_t smem_addr(const void* p) { return (uint32_t)__cvta_generic_to_shared(p); }
__device__ __forceinline__ uint32_t sw128(int row, int col) { return row * 128 + (((col >> 3) ^ (row & 7)) << 4) + (col & 7) * 2; }
template <int MODE>
__global__ void k(int iters, uint32_t seed, int* out) {
  __shared__ alignas(1024) unsigned char tile[64 * 128];
  const int lane = threadIdx.x % 32, w = threadIdx.x / 32, mi = lane >> 3, r = lane & 7;
  uint32_t pk[16];
  for (int i = 0; i < 16; ++i) pk[i] = seed * (i + 1) + threadIdx.x;
  for (int it = 0; it < iters; ++it) {
#pragma unroll
    for (int t = 0; t < 4; ++t) {
      const int row = 16 * w + 8 * (mi & 1), col = 8 * (2 * t + (mi >> 1));
      if (MODE == 0)  // transposed into [query][key], as store_p
        asm volatile("stmatrix.sync.aligned.m8n8.x4.trans.shared.b16 [%0], {%1, %2, %3, %4};\n" ::"r"(smem_addr(tile + sw128(col + r, row))),
                     "r"(pk[4 * t]), "r"(pk[4 * t + 1]), "r"(pk[4 * t + 2]), "r"(pk[4 * t + 3]) : "memory");
      else if (MODE == 1)  // untransposed into [key][query]
        asm volatile("stmatrix.sync.aligned.m8n8.x4.shared.b16 [%0], {%1, %2, %3, %4};\n" ::"r"(smem_addr(tile + sw128(row + r, col))),
                     "r"(pk[4 * t]), "r"(pk[4 * t + 1]), "r"(pk[4 * t + 2]), "r"(pk[4 * t + 3]) : "memory");
      else  // 16-byte st.shared per lane (a whole 512 B a warp)
        asm volatile("st.shared.v4.b32 [%0], {%1, %2, %3, %4};\n" ::"r"(smem_addr(tile + (((t * 4 + w) * 32 + lane) * 16) % 8192)),
                     "r"(pk[4 * t]), "r"(pk[4 * t + 1]), "r"(pk[4 * t + 2]), "r"(pk[4 * t + 3]) : "memory");
    }
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
