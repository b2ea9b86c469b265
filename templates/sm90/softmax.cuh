// The consumers' softmax on wgmma accumulator tiles: the accumulator layout, the causal mask, P to shared memory
// (stmatrix), the lazy softmax's exponentials and its exact path. Included inside the variant's namespace after
// layout.cuh. With 2:4 K the scores tile is S^T (keys along the rows), with dense K it is S (queries along the
// rows); kDenseK picks the layout at compile time (the block-table kernel computes S^T in both of its forms).

// Accumulator register i of thread (warp w, g = lane / 4, qq = lane % 4) of a m64n64 tile: row acc_row, column
// acc_col. The scores tile is S^T (rows = keys, columns = queries) with 2:4 K, S (rows = queries, columns =
// keys) with dense K; O^T always has channels along the rows and queries along the columns.
__device__ __forceinline__ int acc_row(int w, int g, int i) { return 16 * w + g + 8 * ((i >> 1) & 1); }
__device__ __forceinline__ int acc_col(int qq, int i) { return 8 * (i >> 2) + 2 * qq + (i & 1); }
__device__ __forceinline__ int col_slot(int i) { return 2 * (i >> 2) + (i & 1); }  // per-thread column slot
// Per-query softmax state a thread keeps: one per query column (16) of S^T, one per query row (2) of S.
constexpr int kSlots = kDenseK ? 2 : 16;
__device__ __forceinline__ int query_slot(int i) { return kDenseK ? (i >> 1) & 1 : col_slot(i); }
__device__ __forceinline__ int slot_query(int w, int g, int qq, int c) {  // the query (of the WG's 64) of slot c
  return kDenseK ? 16 * w + g + 8 * c : 8 * (c >> 1) + 2 * qq + (c & 1);
}
// Key past the query on a slab whose first key is delta positions after the first query of the WG (0 on the
// diagonal of a whole prompt; the block-table kernel's chunks after cached tokens shift it).
__device__ __forceinline__ bool causal_masked(int w, int g, int qq, int i, int delta = 0) {
  return kDenseK ? acc_col(qq, i) - acc_row(w, g, i) > delta : acc_row(w, g, i) - acc_col(qq, i) > delta;
}

// P -> [query][key] tile (the K-major B of P.V): 16 packed registers (pk[k] = accumulator pair 2k, 2k + 1),
// 4 stmatrix.x4 -- transposed from S^T; straight from S, whose rows are already queries. (kTrans: the
// epilogue stores O^T, channels along the rows, as [query][channel] the same way.)
// pk[4t + k] is the 8x8 block (rows 16w + 8 (k & 1) + 0..7, columns 8 (2t + (k >> 1)) + 0..7) of the tile.
template <bool kTrans = !kDenseK>
__device__ __forceinline__ void store_p(unsigned char* tile, const uint32_t (&pk)[16], int w, int lane) {
  const int mi = lane >> 3, r = lane & 7;
#pragma unroll
  for (int t = 0; t < 4; ++t) {
    const int row = 16 * w + 8 * (mi & 1), col = 8 * (2 * t + (mi >> 1));
    if constexpr (!kTrans)
      asm volatile("stmatrix.sync.aligned.m8n8.x4.shared.b16 [%0], { %1, %2, %3, %4};\n" ::"r"(
                       smem_addr(tile + sw128(row + r, col))),
                   "r"(pk[4 * t]), "r"(pk[4 * t + 1]), "r"(pk[4 * t + 2]), "r"(pk[4 * t + 3])
                   : "memory");
    else
      asm volatile("stmatrix.sync.aligned.m8n8.x4.trans.shared.b16 [%0], { %1, %2, %3, %4};\n" ::"r"(
                       smem_addr(tile + sw128(col + r, row))),
                   "r"(pk[4 * t]), "r"(pk[4 * t + 1]), "r"(pk[4 * t + 2]), "r"(pk[4 * t + 3])
                   : "memory");
  }
}

// p = exp2(s * scale - m) (causal mask on the diagonal slab), packed to f16 for the P.V GEMM, and the
// slab's sums per query slot; returns the largest p (from the packed values: 16 HMNMX2, not 32 FMNMX).
template <bool kDiag>
__device__ __forceinline__ float exponentiate_(const float (&s)[32], const float (&m)[kSlots], float scale_log2,
                                               int w, int g, int qq, uint32_t (&pk)[16], float (&ls)[kSlots],
                                               int delta) {
  float p[32];
#pragma unroll
  for (int i = 0; i < 32; ++i) {
    float x = fmaf(s[i], scale_log2, -m[query_slot(i)]);
    if (kDiag && causal_masked(w, g, qq, i, delta)) x = -INFINITY;
    p[i] = fast_exp2(x);
  }
  Element2 hm[4];
#pragma unroll
  for (int k = 0; k < 16; ++k) {
    pk[k] = pack2(p[2 * k], p[2 * k + 1]);
    const Element2 h = *reinterpret_cast<const Element2*>(&pk[k]);
    hm[k & 3] = k < 4 ? h : __hmax2(hm[k & 3], h);
  }
  if constexpr (kDenseK) {  // row c: registers i with (i >> 1) & 1 == c, summed as a tree
    float u[2][8];
#pragma unroll
    for (int k = 0; k < 8; ++k) u[0][k] = p[4 * k] + p[4 * k + 1], u[1][k] = p[4 * k + 2] + p[4 * k + 3];
#pragma unroll
    for (int c = 0; c < 2; ++c)
      ls[c] = ((u[c][0] + u[c][1]) + (u[c][2] + u[c][3])) + ((u[c][4] + u[c][5]) + (u[c][6] + u[c][7]));
  } else {  // slot c = 2 v2 + v0 holds the thread's two keys (v1 = 0, 1) of one query
#pragma unroll
    for (int c = 0; c < 16; ++c) ls[c] = p[(c & 1) + 4 * (c >> 1)] + p[(c & 1) + 2 + 4 * (c >> 1)];
  }
  const Element2 h = __hmax2(__hmax2(hm[0], hm[1]), __hmax2(hm[2], hm[3]));
  return fmaxf(__low2float(h), __high2float(h));
}

// The mask only costs on the diagonal slab: a uniform branch picks the unmasked code elsewhere.
__device__ __forceinline__ float exponentiate(const float (&s)[32], const float (&m)[kSlots], float scale_log2,
                                              bool diag, int w, int g, int qq, uint32_t (&pk)[16],
                                              float (&ls)[kSlots], int delta = 0) {
  return diag ? exponentiate_<true>(s, m, scale_log2, w, g, qq, pk, ls, delta)
              : exponentiate_<false>(s, m, scale_log2, w, g, qq, pk, ls, delta);
}


// Exact path of the lazy softmax (the whole WG takes it together): new reference max per query over the
// WG's 64 keys, O and l rescaled, P recomputed and stored, then the barrier that publishes it.
// S^T: a query's keys are spread over g and the 4 warps (shuffles, then red); S: over the 4 lanes of a quad,
// but O^T holds queries along its columns, so the rescale factors go through red to the column owners.
__device__ __forceinline__ void exact_path(const float (&s)[32], float (&m)[kSlots], float (&l)[kSlots],
                                           float (&o)[2][32], float scale_log2, bool diag, int w, int g, int qq,
                                           int lane, float (&red)[4][kN], unsigned char* p_tile, int bar,
                                           int delta = 0) {
  float cm[kSlots];
#pragma unroll
  for (int c = 0; c < kSlots; ++c) cm[c] = -INFINITY;
#pragma unroll
  for (int i = 0; i < 32; ++i) {
    const float x = diag && causal_masked(w, g, qq, i, delta) ? -INFINITY : s[i] * scale_log2;
    cm[query_slot(i)] = fmaxf(cm[query_slot(i)], x);
  }
  float alpha[kSlots];
  if constexpr (kDenseK) {
#pragma unroll
    for (int c = 0; c < kSlots; ++c) {
      cm[c] = fmaxf(cm[c], __shfl_xor_sync(0xffffffffu, cm[c], 1));
      cm[c] = fmaxf(cm[c], __shfl_xor_sync(0xffffffffu, cm[c], 2));
      const float mn = fmaxf(m[c], cm[c]);
      alpha[c] = fast_exp2(m[c] - mn);  // 0 while m is -inf
      m[c] = mn;
    }
    if (qq == 0)
#pragma unroll
      for (int c = 0; c < kSlots; ++c) red[0][slot_query(w, g, qq, c)] = alpha[c];
    named_barrier(bar, 128);
#pragma unroll
    for (int i = 0; i < 32; ++i) {
      const float a = red[0][acc_col(qq, i)];
      o[0][i] *= a, o[1][i] *= a;
    }
  } else {
#pragma unroll
    for (int c = 0; c < kSlots; ++c) {
      cm[c] = fmaxf(cm[c], __shfl_xor_sync(0xffffffffu, cm[c], 4));
      cm[c] = fmaxf(cm[c], __shfl_xor_sync(0xffffffffu, cm[c], 8));
      cm[c] = fmaxf(cm[c], __shfl_xor_sync(0xffffffffu, cm[c], 16));
    }
    if (g == 0)
#pragma unroll
      for (int c = 0; c < kSlots; ++c) red[w][slot_query(w, g, qq, c)] = cm[c];
    named_barrier(bar, 128);
#pragma unroll
    for (int c = 0; c < kSlots; ++c) {
      const int q = slot_query(w, g, qq, c);
      const float mn = fmaxf(m[c], fmaxf(fmaxf(red[0][q], red[1][q]), fmaxf(red[2][q], red[3][q])));
      alpha[c] = fast_exp2(m[c] - mn);  // 0 while m is -inf
      m[c] = mn;
    }
#pragma unroll
    for (int i = 0; i < 32; ++i) o[0][i] *= alpha[col_slot(i)], o[1][i] *= alpha[col_slot(i)];
  }
  uint32_t pk[16];
  float ls[kSlots];
  exponentiate(s, m, scale_log2, diag, w, g, qq, pk, ls, delta);
#pragma unroll
  for (int c = 0; c < kSlots; ++c) l[c] = l[c] * alpha[c] + ls[c];
  store_p(p_tile, pk, w, lane);
  async_proxy_fence();
  named_barrier(bar, 128);
}
