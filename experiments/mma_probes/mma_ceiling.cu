// Tensor-core ceilings of the warp-level MMAs the kernels use, registers only (no loads):
// mma.sp m16n8k32 and mma.sync m16n8k16, f16 inputs, with fp32 and with fp16 accumulators.
// Build: nvcc -std=c++17 -O3 -arch=sm_90 -I<cutlass>/include experiments/mma_probes/mma_ceiling.cu -o mma_ceiling
#include <cstdio>
#include <cuda_runtime.h>
#include "cutlass/arch/mma_sm80.h"
#include "cutlass/arch/mma_sparse_sm80.h"

template <typename Acc>
using Sparse = cutlass::arch::SparseMma<cutlass::gemm::GemmShape<16, 8, 32>, 32, cutlass::half_t,
                                        cutlass::layout::RowMajor, cutlass::half_t, cutlass::layout::ColumnMajor,
                                        Acc, cutlass::layout::RowMajor, cutlass::arch::OpMultiplyAdd,
                                        cutlass::arch::SPFormatType::Thread>;
template <typename Acc>
using Dense = cutlass::arch::Mma<cutlass::gemm::GemmShape<16, 8, 16>, 32, cutlass::half_t, cutlass::layout::RowMajor,
                                 cutlass::half_t, cutlass::layout::ColumnMajor, Acc, cutlass::layout::RowMajor,
                                 cutlass::arch::OpMultiplyAdd>;

constexpr int kChains = 8, kIters = 4096;

template <typename Op, bool kSparse>
__global__ void spin(float* out) {
  typename Op::FragmentA a;
  typename Op::FragmentB b;
  typename Op::FragmentC c[kChains];
  for (int i = 0; i < a.size(); ++i) a[i] = typename Op::ElementA(0.001f * threadIdx.x);
  for (int i = 0; i < b.size(); ++i) b[i] = typename Op::ElementB(0.002f);
  for (int k = 0; k < kChains; ++k) c[k].clear();
  for (int it = 0; it < kIters; ++it)
#pragma unroll
    for (int k = 0; k < kChains; ++k) {
      if constexpr (kSparse) Op{}(c[k], a, b, c[k], 0x4444u, 0);
      else Op{}(c[k], a, b, c[k]);
    }
  float s = 0;
  for (int k = 0; k < kChains; ++k) s += float(c[k][0]);
  if (s == 123.f) out[0] = s;
}

template <typename Op, bool kSparse>
void run(const char* name, float* out) {
  int sms;
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0);
  dim3 grid(sms * 4), block(256);
  spin<Op, kSparse><<<grid, block>>>(out);
  cudaEvent_t a, b;
  cudaEventCreate(&a);
  cudaEventCreate(&b);
  cudaEventRecord(a);
  for (int r = 0; r < 5; ++r) spin<Op, kSparse><<<grid, block>>>(out);
  cudaEventRecord(b);
  cudaEventSynchronize(b);
  float ms;
  cudaEventElapsedTime(&ms, a, b);
  // dense-equivalent FLOPs: a 2:4 m16n8k32 MMA does the work of a dense 16x8x32 one
  const double flops = 5.0 * grid.x * (block.x / 32) * kIters * kChains * 2.0 * 16 * 8 * (kSparse ? 32 : 16);
  printf("%-40s %7.0f dense-equivalent TFLOP/s\n", name, flops / ms / 1e9);
}

int main() {
  float* out;
  cudaMalloc(&out, 4);
  run<Sparse<float>, true>("mma.sp m16n8k32 f16 -> f32", out);
  run<Sparse<cutlass::half_t>, true>("mma.sp m16n8k32 f16 -> f16", out);
  run<Dense<float>, false>("mma.sync m16n8k16 f16 -> f32", out);
  run<Dense<cutlass::half_t>, false>("mma.sync m16n8k16 f16 -> f16", out);
  return cudaDeviceSynchronize() != cudaSuccess;
}
