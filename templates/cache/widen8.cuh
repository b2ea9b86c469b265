// 2:4 e4m3 values in format_fp8's kernel layout as 16-bit values of the same layout, under the same metadata
// (format_fp8.model_dtype_k/v, bit for bit): each value times its token's float16 scale in float32, rounded once
// to Element. What the 16-bit prefill kernels read of an e4m3 tensor (flat, or a cache's 2:4 pool). The e4m3 bytes
// sit in the fp16 fragment order, so value i of the output is value i of the input: only its token's scale has to
// be found. One thread widens one 8-value run (a lane's row pair in a fragment): for K the run's tokens follow
// from its position (16-token tile T, rows g and g + 8), for V (2:4 along the tokens) from its metadata nibbles.
// Included inside the variant's namespace; sm_89+.

// Two e4m3 bytes (low byte first) as floats: exact (every e4m3 value is an fp16).
__device__ __forceinline__ float2 e4m3x2_to_float2(uint16_t pair) {
  uint32_t h;
  asm("cvt.rn.f16x2.e4m3x2 %0, %1;" : "=r"(h) : "h"(pair));
  return __half22float2(*reinterpret_cast<const __half2*>(&h));
}

// vals [planes, cap * D / 2] bytes, meta (V: [planes, cap * D / 16] int16 words), scales [planes, cap] float16 ->
// out [planes, cap * D / 2] Element. A run of 8 is (hh, r8, lo) of the tiled index [T|c, ks|mt, g, q, hh, r8, lo].
template <bool kIsK>
__global__ void __launch_bounds__(256) widen8_kernel(const uint2* __restrict__ vals, const uint16_t* __restrict__ meta,
                                                     const __half* __restrict__ scales, uint4* __restrict__ out,
                                                     int cap, long long runs) {
  constexpr int kOuter = kIsK ? kKSteps : kMTiles;  // ks (K) or mt (V): the dim after the tile / chunk
  const int per_plane = cap * kHeadDim / 16;
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < runs;
       i += (long long)gridDim.x * blockDim.x) {
    const long long plane = i / per_plane;
    const int r = int(i % per_plane);
    const int q = r & 3, g = (r >> 2) & 7, outer = (r >> 5) % kOuter, tile = (r >> 5) / kOuter;
    const __half* sc = scales + plane * cap;
    const uint2 raw = vals[i];
    float s[8];
    if (kIsK) {  // K tile `tile`: element (hh, r8, lo) is token 16 tile + 8 r8 + g
      const float s0 = __half2float(sc[tile * 16 + g]), s1 = __half2float(sc[tile * 16 + 8 + g]);
#pragma unroll
      for (int j = 0; j < 8; ++j) s[j] = (j >> 1) & 1 ? s1 : s0;
    } else {     // V chunk `tile`: element (hh, r8, lo) is kept value 2 q + lo of word (channel 16 mt + 8 r8 + g,
                 // tokens 32 tile + 16 hh ...), whose nibble q gives its token within the group of 4
      const uint16_t* m = meta + plane * per_plane;
#pragma unroll
      for (int hh = 0; hh < 2; ++hh)
#pragma unroll
        for (int r8 = 0; r8 < 2; ++r8) {
          const int nib = (m[(((tile * 8 + g) * 2 + hh) * kMTiles + outer) * 2 + r8] >> (4 * q)) & 0xF;
#pragma unroll
          for (int lo = 0; lo < 2; ++lo)
            s[hh * 4 + r8 * 2 + lo] = __half2float(sc[tile * 32 + hh * 16 + q * 4 + (lo ? nib >> 2 : nib & 3)]);
        }
    }
    uint32_t o[4];
    const uint32_t w[2] = {raw.x, raw.y};
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const float2 f = e4m3x2_to_float2(uint16_t(w[j / 2] >> (16 * (j % 2))));
      o[j] = pack2(f.x * s[2 * j], f.y * s[2 * j + 1]);
    }
    out[i] = make_uint4(o[0], o[1], o[2], o[3]);
  }
}

template <bool kIsK>
int launch_widen8(const void* vals, const void* meta, const void* scales, int planes, int cap, void* out,
                  void* stream) {
  if (planes < 1 || cap < 32 || cap % 32 || (!kIsK && !meta)) return cudaErrorInvalidValue;
  const long long runs = (long long)planes * cap * kHeadDim / 16;
  const long long blocks = (runs + 255) / 256 < 65536 ? (runs + 255) / 256 : 65536;
  widen8_kernel<kIsK><<<unsigned(blocks), 256, 0, static_cast<cudaStream_t>(stream)>>>(
      static_cast<const uint2*>(vals), static_cast<const uint16_t*>(meta), static_cast<const __half*>(scales),
      static_cast<uint4*>(out), cap, runs);
  return cudaGetLastError();
}
