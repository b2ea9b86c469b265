// Probe: the dense wgmma forms a mixed-tier (block-table) sm_90a prefill needs beside the 2:4 ones, and the
// tier chosen per slab by a runtime branch inside one wgmma window (docs/hopper.md, section 9).
//
// In the all-2:4 kernel's transposed formulation a dense block enters as:
//   scores  S^T (64 keys x 64 queries) = K Q^T:  8 x m64n64k16, A = the dense K rows (K-major, 128-byte swizzle,
//           the layout TMA writes), B = Q as in the kernel (K-major); A advances 32 bytes a 16-channel step
//   P.V     O^T (64 channels x 64 queries) += V^T P^T:  8 x m64n64k16, A = V^T read from the dense V rows
//           ([key][64 channels], 128-byte swizzle) as an MN-major operand (imm-trans-a = 1; the same
//           descriptor bits as K-major: stride byte offset 1024 between 8-key groups, +2048 bytes a step),
//           B = the P tile (K-major) advancing 32 bytes a 16-key step
// and a 2:4 block as in the kernel (register fragments, m64n64k32.sp). One warpgroup runs NS slabs, each slab's
// K and V tier from a table read at run time; every slab issues its scores and its P.V in one
// fence / commit / wait window, the tier picked by a warp-uniform branch for each.
//
// The 2:4 blocks here keep elements 0 and 1 of every group of 4 (channels for K, keys for V), so the fragments
// are read straight from the dense tile and every metadata nibble is 0b0100; the cache's own fragment format
// is checked by wgmma_sp_probe.cu. Values are multiples of 1/8 in [-1, 1]: every product and sum is exact in
// f32, so the comparison with the CPU is exact.
//
//   nvcc -std=c++17 -O3 -gencode arch=compute_90a,code=sm_90a -o tiers experiments/mma_probes/wgmma_tiers_probe.cu && ./tiers
//
// Prints the largest |difference| to the CPU for each slab's scores and for O^T, per tier mix, and exits 1
// unless all are 0; then a control that flips imm-trans-a of the dense V^T operand and must differ.
#include <cuda_fp16.h>

#include <cuda.h>  // CUtensorMap, named by ptx.cuh

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <vector>

#if defined(__CUDA_ARCH__) && !defined(__CUDA_ARCH_FEAT_SM90_ALL)
#error "wgmma: build for sm_90a (arch=compute_90a,code=sm_90a)"
#endif

constexpr int NS = 4;  // slabs of 64 keys
constexpr int kTileBytes = 64 * 128;  // 64 rows of 64 halves

// The wgmma wrappers, descriptors and swizzle of the prefill kernel (templates/sm90/ptx.cuh), f16 operands.
#define HSG_WGMMA_TYPE "f16"
#include "../../templates/sm90/ptx.cuh"

// An A fragment of a 2:4 block read from the dense tile: elements (r0, c0) and (r1, c1) packed low first.
__device__ __forceinline__ uint32_t pair(const unsigned char* tile, int r0, int c0, int r1, int c1) {
  const __half lo = *reinterpret_cast<const __half*>(tile + sw128(r0, c0));
  const __half hi = *reinterpret_cast<const __half*>(tile + sw128(r1, c1));
  return uint32_t(__half_as_ushort(lo)) | uint32_t(__half_as_ushort(hi)) << 16;
}

struct Smem {
  alignas(1024) unsigned char q[2][kTileBytes];      // [query][64 channels] per channel half
  alignas(1024) unsigned char k[NS][2][kTileBytes];  // [key][64 channels]
  alignas(1024) unsigned char v[NS][2][kTileBytes];  // [key][64 channels]
  alignas(1024) unsigned char p[NS][kTileBytes];     // [query][key]
};

// q [64][128], k/v [NS][64][128], p [NS][64][64] (f16, row-major); tiers[j]: bit 0 = K of slab j is 2:4,
// bit 1 = V of slab j is 2:4. s_out [NS][64 keys][64 queries], o_out [128 channels][64 queries].
template <int kVTrans>
__global__ void __launch_bounds__(128, 1) probe(const __half* q, const __half* k, const __half* v, const __half* p,
                                                const int* tiers, float* s_out, float* o_out) {
  extern __shared__ unsigned char raw[];
  Smem& sm = *reinterpret_cast<Smem*>(raw + ((1024u - (smem_addr(raw) & 1023u)) & 1023u));
  const int t = threadIdx.x, w = t / 32, g = (t % 32) / 4, qq = t % 4;
  for (int i = t; i < 64 * 128; i += 128) {
    const int r = i / 128, c = i % 128;
    *reinterpret_cast<__half*>(sm.q[c / 64] + sw128(r, c % 64)) = q[i];
    for (int j = 0; j < NS; ++j) {
      *reinterpret_cast<__half*>(sm.k[j][c / 64] + sw128(r, c % 64)) = k[j * 8192 + i];
      *reinterpret_cast<__half*>(sm.v[j][c / 64] + sw128(r, c % 64)) = v[j * 8192 + i];
      if (c < 64) *reinterpret_cast<__half*>(sm.p[j] + sw128(r, c)) = p[j * 4096 + r * 64 + c];
    }
  }
  async_proxy_fence();  // generic stores -> wgmma reads
  __syncthreads();

  constexpr uint32_t kMeta = 0x44444444u;  // every group keeps elements 0 and 1: nibble i0 | i1 << 2 = 0b0100
  float o[2][32];
#pragma unroll
  for (int i = 0; i < 32; ++i) o[0][i] = o[1][i] = 0.f;
  for (int j = 0; j < NS; ++j) {
    const int tier = __shfl_sync(0xffffffffu, tiers[j], 0);  // warp-uniform
    const bool k_sparse = tier & 1, v_sparse = tier & 2;
    // Fragments of both 2:4 forms, loaded whatever the tier (a dense slab ignores them): registers defined
    // under the branch made ptxas inject more warpgroup arrives. K: rows = keys, k = channels; V^T: rows =
    // channels, k = keys, read down the [key][channel] tile.
    uint32_t ka[4][4], va[2][2][4];
#pragma unroll
    for (int ks = 0; ks < 4; ++ks) {
      const unsigned char* tile = sm.k[j][ks / 2];
      const int c = (ks % 2) * 32 + 4 * qq, r = 16 * w + g;
      ka[ks][0] = pair(tile, r, c, r, c + 1);
      ka[ks][1] = pair(tile, r + 8, c, r + 8, c + 1);
      ka[ks][2] = pair(tile, r, c + 16, r, c + 17);
      ka[ks][3] = pair(tile, r + 8, c + 16, r + 8, c + 17);
    }
#pragma unroll
    for (int mb = 0; mb < 2; ++mb)
#pragma unroll
      for (int kk = 0; kk < 2; ++kk) {
        const unsigned char* tile = sm.v[j][mb];
        const int ch = 16 * w + g, key = 32 * kk + 4 * qq;
        va[mb][kk][0] = pair(tile, key, ch, key + 1, ch);
        va[mb][kk][1] = pair(tile, key, ch + 8, key + 1, ch + 8);
        va[mb][kk][2] = pair(tile, key + 16, ch, key + 17, ch);
        va[mb][kk][3] = pair(tile, key + 16, ch + 8, key + 17, ch + 8);
      }
    float s[32];
#pragma unroll
    for (int i = 0; i < 32; ++i) s[i] = 0.f;
    fence_acc(s), fence_acc(o[0]), fence_acc(o[1]);
    mma_fence();
    if (k_sparse) {
#pragma unroll
      for (int ks = 0; ks < 4; ++ks)
        mma_sp<false>(s, make_uint4(ka[ks][0], ka[ks][1], ka[ks][2], ka[ks][3]),
                      desc_sw128(smem_addr(sm.q[ks / 2]) + (ks % 2) * 64), kMeta);
    } else {
#pragma unroll
      for (int ks = 0; ks < 8; ++ks)
        mma_dense_ss<false, 0>(s, desc_sw128(smem_addr(sm.k[j][ks / 4]) + (ks % 4) * 32),
                               desc_sw128(smem_addr(sm.q[ks / 4]) + (ks % 4) * 32));
    }
    if (v_sparse) {
#pragma unroll
      for (int mb = 0; mb < 2; ++mb)
#pragma unroll
        for (int kk = 0; kk < 2; ++kk)
          mma_sp<false>(o[mb], make_uint4(va[mb][kk][0], va[mb][kk][1], va[mb][kk][2], va[mb][kk][3]),
                        desc_sw128(smem_addr(sm.p[j]) + kk * 64), kMeta);
    } else {
#pragma unroll
      for (int mb = 0; mb < 2; ++mb)
#pragma unroll
        for (int ks = 0; ks < 4; ++ks)
          mma_dense_ss<false, kVTrans>(o[mb], desc_sw128(smem_addr(sm.v[j][mb]) + ks * 2048),
                                       desc_sw128(smem_addr(sm.p[j]) + ks * 32));
    }
    mma_commit();
    mma_wait<0>();
    fence_acc(s), fence_acc(o[0]), fence_acc(o[1]);
#pragma unroll
    for (int i = 0; i < 32; ++i) {  // accumulator i: row 16w + g + 8 ((i >> 1) & 1), column 8 (i >> 2) + 2 qq + (i & 1)
      const int row = 16 * w + g + 8 * ((i >> 1) & 1), col = 8 * (i >> 2) + 2 * qq + (i & 1);
      s_out[(j * 64 + row) * 64 + col] = s[i];
    }
  }
#pragma unroll
  for (int mb = 0; mb < 2; ++mb)
#pragma unroll
    for (int i = 0; i < 32; ++i) {
      const int row = 64 * mb + 16 * w + g + 8 * ((i >> 1) & 1), col = 8 * (i >> 2) + 2 * qq + (i & 1);
      o_out[row * 64 + col] = o[mb][i];
    }
}

#define CHECK(x)                                                                     \
  do {                                                                               \
    cudaError_t e_ = (x);                                                            \
    if (e_ != cudaSuccess) {                                                         \
      std::printf("%s:%d %s: %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(e_)); \
      std::exit(2);                                                                  \
    }                                                                                \
  } while (0)

// One run with the given tiers: the largest |GPU - CPU| over the scores of all slabs and over O^T.
template <int kVTrans>
static void run(const std::vector<int>& tiers, double* s_err, double* o_err) {
  std::srand(1234 + tiers[0] * 7 + tiers[1] * 5 + tiers[2] * 3 + tiers[3]);
  auto val = [] { return float(std::rand() % 17 - 8) / 8.f; };  // multiples of 1/8 in [-1, 1]
  std::vector<float> q(64 * 128), k(NS * 64 * 128), v(NS * 64 * 128), p(NS * 64 * 64);
  for (auto& x : q) x = val();
  for (auto& x : p) x = val();
  for (int j = 0; j < NS; ++j)
    for (int r = 0; r < 64; ++r)
      for (int c = 0; c < 128; ++c) {  // 2:4 slabs keep elements 0, 1 of each group (channels of K, keys of V)
        k[(j * 64 + r) * 128 + c] = (tiers[j] & 1) && c % 4 >= 2 ? 0.f : val();
        v[(j * 64 + r) * 128 + c] = (tiers[j] & 2) && r % 4 >= 2 ? 0.f : val();
      }
  std::vector<__half> hq(q.size()), hk(k.size()), hv(v.size()), hp(p.size());
  for (size_t i = 0; i < q.size(); ++i) hq[i] = __float2half(q[i]);
  for (size_t i = 0; i < k.size(); ++i) hk[i] = __float2half(k[i]), hv[i] = __float2half(v[i]);
  for (size_t i = 0; i < p.size(); ++i) hp[i] = __float2half(p[i]);
  __half *dq, *dk, *dv, *dp;
  int* dt;
  float *ds, *dout;
  CHECK(cudaMalloc(&dq, hq.size() * 2));
  CHECK(cudaMalloc(&dk, hk.size() * 2));
  CHECK(cudaMalloc(&dv, hv.size() * 2));
  CHECK(cudaMalloc(&dp, hp.size() * 2));
  CHECK(cudaMalloc(&dt, NS * sizeof(int)));
  CHECK(cudaMalloc(&ds, NS * 64 * 64 * sizeof(float)));
  CHECK(cudaMalloc(&dout, 128 * 64 * sizeof(float)));
  CHECK(cudaMemcpy(dq, hq.data(), hq.size() * 2, cudaMemcpyHostToDevice));
  CHECK(cudaMemcpy(dk, hk.data(), hk.size() * 2, cudaMemcpyHostToDevice));
  CHECK(cudaMemcpy(dv, hv.data(), hv.size() * 2, cudaMemcpyHostToDevice));
  CHECK(cudaMemcpy(dp, hp.data(), hp.size() * 2, cudaMemcpyHostToDevice));
  CHECK(cudaMemcpy(dt, tiers.data(), NS * sizeof(int), cudaMemcpyHostToDevice));
  CHECK(cudaMemset(ds, 0xff, NS * 64 * 64 * sizeof(float)));  // NaN: an unwritten value cannot pass
  CHECK(cudaMemset(dout, 0xff, 128 * 64 * sizeof(float)));
  const int smem = sizeof(Smem) + 1024;
  CHECK(cudaFuncSetAttribute(probe<kVTrans>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  probe<kVTrans><<<1, 128, smem>>>(dq, dk, dv, dp, dt, ds, dout);
  CHECK(cudaGetLastError());
  CHECK(cudaDeviceSynchronize());
  std::vector<float> s(NS * 64 * 64), o(128 * 64);
  CHECK(cudaMemcpy(s.data(), ds, s.size() * 4, cudaMemcpyDeviceToHost));
  CHECK(cudaMemcpy(o.data(), dout, o.size() * 4, cudaMemcpyDeviceToHost));
  *s_err = *o_err = 0;
  for (int j = 0; j < NS; ++j)
    for (int key = 0; key < 64; ++key)
      for (int n = 0; n < 64; ++n) {
        double ref = 0;
        for (int c = 0; c < 128; ++c) ref += double(k[(j * 64 + key) * 128 + c]) * q[n * 128 + c];
        const double got = s[(j * 64 + key) * 64 + n];
        *s_err = std::isnan(got) ? INFINITY : std::fmax(*s_err, std::fabs(got - ref));
      }
  for (int ch = 0; ch < 128; ++ch)
    for (int n = 0; n < 64; ++n) {
      double ref = 0;
      for (int j = 0; j < NS; ++j)
        for (int key = 0; key < 64; ++key) ref += double(v[(j * 64 + key) * 128 + ch]) * p[(j * 64 + n) * 64 + key];
      const double got = o[ch * 64 + n];
      *o_err = std::isnan(got) ? INFINITY : std::fmax(*o_err, std::fabs(got - ref));
    }
  cudaFree(dq), cudaFree(dk), cudaFree(dv), cudaFree(dp), cudaFree(dt), cudaFree(ds), cudaFree(dout);
}

int main() {
  const std::vector<std::vector<int>> mixes = {{0, 0, 0, 0}, {3, 3, 3, 3}, {1, 2, 3, 0}, {2, 0, 1, 3}};
  bool ok = true;
  for (const auto& mix : mixes) {
    double se, oe;
    run<1>(mix, &se, &oe);
    std::printf("tiers (bit 0: K 2:4, bit 1: V 2:4) %d %d %d %d: max |scores - CPU| %g, max |O^T - CPU| %g\n",
                mix[0], mix[1], mix[2], mix[3], se, oe);
    ok = ok && se == 0 && oe == 0;
  }
  double se, oe;
  run<0>({0, 0, 0, 0}, &se, &oe);  // dense V^T read K-major (imm-trans-a = 0): must be wrong
  std::printf("control, dense V^T without imm-trans-a: max |O^T - CPU| %g (must not be 0)\n", oe);
  ok = ok && oe > 0;
  std::printf(ok ? "PASS\n" : "FAIL\n");
  return ok ? 0 : 1;
}
