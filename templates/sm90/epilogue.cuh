// The consumers' epilogue: the softmax sums completed across the WG, O / l written to out as whole rows through
// shared memory, and the natural-log LSE. Included inside the variant's namespace after softmax.cuh.

// Final sums per query (S^T: over g, then the WG's 4 warps; S: over the quad, then to the column owners of
// O^T), O / l to out [query][channel] and the natural-log LSE. tiles: the WG's two P tiles, reused as O's two
// 64-channel halves (one of the places that need kD == 128, layout.cuh).
__device__ __forceinline__ void epilogue(float (&o)[2][32], float (&l)[kSlots], const float (&m)[kSlots], int w,
                                         int g, int qq, float (&red)[4][kN], unsigned char (&tiles)[2][kN * 128],
                                         int bar, Element* oh, float* lse_q, int rows, int pad_to = 0) {
  // rows: inside the prompt, written; rows .. pad_to: padding of a shorter sequence's chunk, zeros and -inf
  constexpr int kLanes = kDenseK ? 3 : 28;  // shuffle masks: lanes holding parts of a query's sum
#pragma unroll
  for (int c = 0; c < kSlots; ++c)
#pragma unroll
    for (int x = 1; x < 32; x *= 2)
      if (kLanes & x) l[c] += __shfl_xor_sync(0xffffffffu, l[c], x);
  named_barrier(bar, 128);  // red is free
  if (kDenseK ? qq == 0 : g == 0)
#pragma unroll
    for (int c = 0; c < kSlots; ++c) red[kDenseK ? 0 : w][slot_query(w, g, qq, c)] = l[c];
  named_barrier(bar, 128);
  float lc[16], inv[16];  // per query column of O^T: the sum and its reciprocal (16 divisions, not 64)
#pragma unroll
  for (int c = 0; c < 16; ++c) {
    const int q = 8 * (c >> 1) + 2 * qq + (c & 1);
    lc[c] = kDenseK ? red[0][q] : red[0][q] + red[1][q] + red[2][q] + red[3][q];
    inv[c] = 1.f / lc[c];
  }
  // O / l through the WG's two P tiles (free: the last P.V has completed) as [query][channel] halves, then
  // 16-byte row stores: a warp writes two whole 256-byte rows of out an instruction, where storing from the
  // accumulators would write 2 bytes a lane into 4 rows (the epilogue took ~3.5 us a CTA that way).
#pragma unroll
  for (int mb = 0; mb < 2; ++mb) {
    uint32_t pk[16];
#pragma unroll
    for (int k = 0; k < 16; ++k)
      pk[k] = pack2(o[mb][2 * k] * inv[col_slot(2 * k)], o[mb][2 * k + 1] * inv[col_slot(2 * k + 1)]);
    store_p<true>(tiles[mb], pk, w, 4 * g + qq);
  }
  named_barrier(bar, 128);
  const int lane = 4 * g + qq, tid = 32 * w + lane;
#pragma unroll
  for (int k = 0; k < kN * kD / 8 / 128; ++k) {
    const int c = tid + 128 * k, n = c / (kD / 8), cc = c % (kD / 8);  // query n, 16-byte chunk cc of its row
    if (n < rows)
      *reinterpret_cast<uint4*>(oh + n * kD + cc * 8) =
          *reinterpret_cast<const uint4*>(tiles[cc / 8] + n * 128 + (((cc % 8) ^ (n & 7)) << 4));
    else if (n < pad_to)
      *reinterpret_cast<uint4*>(oh + n * kD + cc * 8) = make_uint4(0, 0, 0, 0);
  }
  if (kDenseK ? qq == 0 : w == 0 && g == 0)
#pragma unroll
    for (int c = 0; c < kSlots; ++c) {
      const int q = slot_query(w, g, qq, c);
      if (q < rows)
        lse_q[q] = (m[c] + __log2f(kDenseK ? l[c] : lc[c])) * 0.69314718f;
      else if (q < pad_to)
        lse_q[q] = -INFINITY;
    }
}
