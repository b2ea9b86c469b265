// The consumers' operands: O^T += V^T P^T in its 2:4 and dense forms, the V fragments of a stage, Q into shared
// memory. Included inside the variant's namespace after layout.cuh.

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
    for (int kk = 0; kk < 2; ++kk) mma_sp<false>(o[mb], va[mb][kk], desc_sw128(smem_addr(p_tile) + kk * 64), ve[mb][kk]);
}

// O^T += V_slab^T P^T for a dense V block: A = V^T read by descriptor from the stage's two [key][64 channel]
// halves as an MN-major operand (imm-trans-a; 16 keys a step = 2048 bytes), B = the P tile, 32 bytes a step.
__device__ __forceinline__ void issue_pv_dense(float (&o)[2][32], const unsigned char* stage,
                                               const unsigned char* p_tile) {
#pragma unroll
  for (int mb = 0; mb < 2; ++mb)
#pragma unroll
    for (int ks = 0; ks < 4; ++ks)
      mma_dense_ss<false, 1>(o[mb], desc_sw128(smem_addr(stage + kVRows) + mb * kHalfBytes + ks * 2048),
                             desc_sw128(smem_addr(p_tile) + ks * 32));
}

// V fragments of a stage for warp w: 32-token chunk kk, channel tile mt = 4 mb + w.
__device__ __forceinline__ void load_v(const unsigned char* stage, int w, int lane, uint4 (&va)[2][2],
                                       uint32_t (&ve)[2][2]) {
  const int g = lane >> 2, qq = lane & 3;
#pragma unroll
  for (int mb = 0; mb < 2; ++mb)
#pragma unroll
    for (int kk = 0; kk < 2; ++kk)
      va[mb][kk] = *reinterpret_cast<const uint4*>(stage + kVVals + ((kk * 8 + 4 * mb + w) * 32 + lane) * 16);
  // Metadata word (chunk kk, row 2g + qq % 2, channel tile 4 mb + w) at word (16 kk + row) * 8 + tile: the
  // warp's words sit in 8 of the 32 banks. Loading tile w for half the rows and w + 4 for the other half in
  // each load (mb flipped by g / 2) makes it 2 words a bank, not 4 (all-2:4 +1-2 % at 32K; with dense K
  // it measured no faster and cost spills, so there the loads stay in order).
  const int flip = kDenseK ? 0 : (g >> 1) & 1;
#pragma unroll
  for (int kk = 0; kk < 2; ++kk) {
    uint32_t x[2];
#pragma unroll
    for (int t = 0; t < 2; ++t)
      x[t] = *reinterpret_cast<const uint32_t*>(stage + kVMeta +
                                                ((kk * 16 + g * 2 + (qq & 1)) * 8 + 4 * (t ^ flip) + w) * 4);
    ve[0][kk] = flip ? x[1] : x[0];
    ve[1][kk] = flip ? x[0] : x[1];
    // computed here, not sunk past the next wgmma.fence (ptxas would then insert its own, C7519)
    asm volatile("" : "+r"(ve[0][kk]), "+r"(ve[1][kk])::"memory");
  }
}

// Q rows [q0, q0 + 64) of one head into the WG's two 64-channel swizzled halves; rows past the prompt are zeros.
__device__ __forceinline__ void load_q(unsigned char (&dst)[kHalves][kN * 128], const Element* qh, long long q_st, int rows,
                                       int tid) {
  // All of a thread's loads before any store: as a loop of load-store pairs the compiler kept them in
  // order, 8 round trips to memory, and Q took 3.5 us a CTA -- longer than the first stage's copies.
  constexpr int kPer = kN * kD / 8 / 128;
  uint4 x[kPer];
#pragma unroll
  for (int k = 0; k < kPer; ++k) {
    const int i = tid + 128 * k, n = i / (kD / 8), c = (i % (kD / 8)) * 8;
    x[k] = n < rows ? *reinterpret_cast<const uint4*>(qh + n * q_st + c) : make_uint4(0, 0, 0, 0);
  }
#pragma unroll
  for (int k = 0; k < kPer; ++k) {
    const int i = tid + 128 * k, n = i / (kD / 8), c = (i % (kD / 8)) * 8;
    *reinterpret_cast<uint4*>(dst[c / 64] + sw128(n, c % 64)) = x[k];
  }
}

