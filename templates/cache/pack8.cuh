// e4m3 quantize-and-pack of flat K/V tensors into format_fp8's kernel layout, bit for bit: one float16 scale per
// token (its largest kept magnitude over 448, rounded up), the kept values (2:4, chosen on the original values as
// pack.cuh's units choose) or every value (dense) divided by it and rounded to nearest even. A token's scale needs
// all of its channels, so one warp packs a whole 16-token K tile or 32-token V chunk: a first pass takes the
// magnitudes, a second quantizes and writes. Included inside the variant's namespace after pack.cuh; sm_89+.

// format_fp8.token_scales of a token whose (kept) values have largest magnitude `amax` (finite, checked on the
// host): amax / 448 rounded up to a float16, bumped once more when the float32 quotient lands above 448; 1 for 0.
__device__ __forceinline__ __half e4m3_scale(float amax) {
  if (amax == 0.f) return __float2half(1.f);
  const float x = amax / 448.f;
  __half h = __float2half_rn(x);
  if (__half2float(h) < x) h = __ushort_as_half(__half_as_ushort(h) + 1);
  if (amax / __half2float(h) > 448.f) h = __ushort_as_half(__half_as_ushort(h) + 1);
  return h;
}

// Two values divided by their scales, as e4m3 bytes (lo in the low byte).
__device__ __forceinline__ uint32_t e4m3x2(float lo, float lo_scale, float hi, float hi_scale) {
  uint16_t d;
  asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(d) : "f"(hi / hi_scale), "f"(lo / lo_scale));
  return d;
}

// The largest magnitudes of a K tile's rows g and g + 8 over this lane's quarter of the channels (the quad holds
// the row; row_scales reduces across it): the dense packer's scales (the 2:4 one takes the kept values').
__device__ __forceinline__ void row_amax(const Element* __restrict__ base, long long st, int length, int T,
                                         float (&amax)[2]) {
  const int lane = threadIdx.x % 32, g = lane >> 2, q = lane & 3;
  amax[0] = amax[1] = 0.f;
#pragma unroll
  for (int c = 0; c < kHeadDim / 16; ++c)
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int row = T * 16 + g + 8 * r;
      Element x[4];
      load4(base + row * st + c * 16 + 4 * q, length, row, x);
#pragma unroll
      for (int i = 0; i < 4; ++i) amax[r] = fmaxf(amax[r], fabsf(float(x[i])));
    }
}

// The scales of a K tile's rows g and g + 8 from each lane's largest magnitudes (the quad holds a row): written
// by lanes q == 0, returned to every lane as floats.
__device__ __forceinline__ void row_scales(float (&amax)[2], int T, __half* __restrict__ scales, float (&sc)[2]) {
  const int lane = threadIdx.x % 32, g = lane >> 2, q = lane & 3;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    amax[r] = fmaxf(amax[r], __shfl_xor_sync(0xffffffffu, amax[r], 1));
    amax[r] = fmaxf(amax[r], __shfl_xor_sync(0xffffffffu, amax[r], 2));
    const __half h = e4m3_scale(amax[r]);
    sc[r] = __half2float(h);
    if (q == 0) scales[T * 16 + g + 8 * r] = h;
  }
}

// K 2:4 in e4m3: 16-token tile T of one sequence (rows base + t * st, t < length). The fragment order and
// metadata are compress_k_unit's; values are one byte each (8 a lane and k-step), scales float16 per token. `w`:
// the sequence's channel weights [D] of the 2:4 choice (or null: magnitudes). A first pass selects and takes the
// kept magnitudes (with weights a token's largest value may be dropped), a second quantizes and writes.
__device__ __forceinline__ void compress_k8_unit(const Element* __restrict__ base, long long st, int length, int T,
                                                 uint2* __restrict__ vals, uint32_t* __restrict__ meta,
                                                 __half* __restrict__ scales, const float* __restrict__ w = nullptr) {
  const int lane = threadIdx.x % 32, g = lane >> 2, q = lane & 3;
  float amax[2] = {0.f, 0.f};
#pragma unroll
  for (int ks = 0; ks < kKSteps; ++ks)
#pragma unroll
    for (int slot = 0; slot < 2; ++slot)
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int row = T * 16 + g + 8 * r;
        Element x[4], v0, v1;
        load4(base + row * st + ks * 32 + slot * 16 + 4 * q, length, row, x);
        select_2of4(x, v0, v1, w ? w + ks * 32 + slot * 16 + 4 * q : nullptr);
        amax[r] = fmaxf(amax[r], fmaxf(fabsf(float(v0)), fabsf(float(v1))));
      }
  float sc[2];
  row_scales(amax, T, scales, sc);
#pragma unroll
  for (int ks = 0; ks < kKSteps; ++ks) {
    uint32_t nib[2][2], bytes[2] = {0u, 0u};  // fragment elements 0..3 and 4..7
#pragma unroll
    for (int slot = 0; slot < 2; ++slot)
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int row = T * 16 + g + 8 * r;
        Element x[4], v0, v1;
        load4(base + row * st + ks * 32 + slot * 16 + 4 * q, length, row, x);
        nib[slot][r] = select_2of4(x, v0, v1, w ? w + ks * 32 + slot * 16 + 4 * q : nullptr);
        // fragment element e = 4*slot + 2*r + {0,1}
        bytes[slot] |= e4m3x2(float(v0), sc[r], float(v1), sc[r]) << (16 * r);
      }
    vals[(T * kKSteps + ks) * 32 + lane] = make_uint2(bytes[0], bytes[1]);
    const uint32_t w_lo = quad_words(nib[0][0], nib[0][1], q);
    const uint32_t w_hi = quad_words(nib[1][0], nib[1][1], q);
    if (q < 2) meta[(T * 16 + g * 2 + q) * kKSteps + ks] = q == 0 ? w_lo : w_hi;
  }
}

// The warp's 32-token x 16-channel tile (tokens C*32.., channels mt*16..) through shared memory: returns the
// lane's view [32 tokens][16 channels].
__device__ __forceinline__ const Element* stage_tile(const Element* __restrict__ base, long long st, int length,
                                                     int C, int mt, uint4 (&tile)[32][2]) {
  const int lane = threadIdx.x % 32, tok = C * 32 + lane;
  uint4 row[2] = {};
  if (tok < length) {
    row[0] = *reinterpret_cast<const uint4*>(base + tok * st + mt * 16);
    row[1] = *reinterpret_cast<const uint4*>(base + tok * st + mt * 16 + 8);
  }
  __syncwarp();
  tile[lane][0] = row[0];
  tile[lane][1] = row[1];
  __syncwarp();
  return reinterpret_cast<const Element*>(&tile[0][0]);
}

// V 2:4 in e4m3: 32-token chunk C of one sequence, every channel tile. A token's scale is over the values kept
// of it in every channel (a token may lose its largest channels to its neighbours), so a first pass selects and
// takes those magnitudes, a second quantizes each kept value with its own token's scale. `w`: the chunk's 32
// token weights of the 2:4 choice and its compensation (or null: magnitudes); the scales are over the kept values
// as stored, compensated.
__device__ __forceinline__ void compress_v8_unit(const Element* __restrict__ base, long long st, int length, int C,
                                                 uint2* __restrict__ vals, uint32_t* __restrict__ meta,
                                                 __half* __restrict__ scales, const float* __restrict__ w = nullptr) {
  const int lane = threadIdx.x % 32, g = lane >> 2, q = lane & 3;
  __shared__ uint4 tile_smem[kWarpsPerBlock][32][2];
  uint4 (&tile)[32][2] = tile_smem[threadIdx.x / 32];
  float amax[2][4] = {};  // tokens slot*16 + 4q + i
#pragma unroll 1
  for (int mt = 0; mt < kMTiles; ++mt) {
    const Element* t_el = stage_tile(base, st, length, C, mt, tile);
#pragma unroll
    for (int slot = 0; slot < 2; ++slot)
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        Element x[4], v0, v1;
#pragma unroll
        for (int i = 0; i < 4; ++i) x[i] = t_el[(slot * 16 + 4 * q + i) * 16 + g + 8 * r];
        const uint32_t nib = select_2of4<true>(x, v0, v1, w ? w + slot * 16 + 4 * q : nullptr);
        const int i0 = nib & 3, i1 = nib >> 2;
#pragma unroll
        for (int i = 0; i < 4; ++i) {  // the kept values as stored (with weights, compensated)
          if (i == i0) amax[slot][i] = fmaxf(amax[slot][i], fabsf(float(v0)));
          if (i == i1) amax[slot][i] = fmaxf(amax[slot][i], fabsf(float(v1)));
        }
      }
  }
  float sc[2][4];
#pragma unroll
  for (int slot = 0; slot < 2; ++slot)
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float a = warp_max_over_rows(amax[slot][i]);  // over the channels of the other lanes (g)
      const __half h = e4m3_scale(a);
      sc[slot][i] = __half2float(h);
      if (g == 0) scales[C * 32 + slot * 16 + 4 * q + i] = h;
    }
#pragma unroll 1
  for (int mt = 0; mt < kMTiles; ++mt) {
    const Element* t_el = stage_tile(base, st, length, C, mt, tile);
    uint32_t nib[2][2], bytes[2] = {0u, 0u};
#pragma unroll
    for (int slot = 0; slot < 2; ++slot)
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        Element x[4], v0, v1;
#pragma unroll
        for (int i = 0; i < 4; ++i) x[i] = t_el[(slot * 16 + 4 * q + i) * 16 + g + 8 * r];
        nib[slot][r] = select_2of4<true>(x, v0, v1, w ? w + slot * 16 + 4 * q : nullptr);
        const int i0 = nib[slot][r] & 3, i1 = nib[slot][r] >> 2;
        // selects, not sc[slot][i0]: a run-time index would move sc to local memory
        const float s0 = i0 == 0 ? sc[slot][0] : i0 == 1 ? sc[slot][1] : sc[slot][2];
        const float s1 = i1 == 3 ? sc[slot][3] : i1 == 2 ? sc[slot][2] : sc[slot][1];
        bytes[slot] |= e4m3x2(float(v0), s0, float(v1), s1) << (16 * r);
      }
    vals[(C * kMTiles + mt) * 32 + lane] = make_uint2(bytes[0], bytes[1]);
    const uint32_t w_lo = quad_words(nib[0][0], nib[0][1], q);
    const uint32_t w_hi = quad_words(nib[1][0], nib[1][1], q);
    if (q < 2) meta[(C * 16 + g * 2 + q) * kMTiles + mt] = q == 0 ? w_lo : w_hi;
  }
}

// Dense K in e4m3 (format_fp8.pack_k_dense): 16-token tile T; lane (g, q) holds, per 32-channel k-step, rows
// g + 8 r8 and channels 16 j + 8 hi + 2 q + lo as element j*8 + hi*4 + r8*2 + lo of its 16 bytes.
__device__ __forceinline__ void compress_kd8_unit(const Element* __restrict__ base, long long st, int length, int T,
                                                  uint4* __restrict__ vals, __half* __restrict__ scales) {
  const int lane = threadIdx.x % 32, g = lane >> 2, q = lane & 3;
  auto pair = [&](int row, int col, float& a, float& b) {
    a = b = 0.f;
    if (row < length) {
      const Element* p = base + row * st + col;
      a = float(p[0]);
      b = float(p[1]);
    }
  };
  float amax[2];
  row_amax(base, st, length, T, amax);
  float sc[2];
  row_scales(amax, T, scales, sc);
#pragma unroll
  for (int ks = 0; ks < kKSteps; ++ks) {
    uint32_t w[4];  // bytes j*8 + hi*4 + r8*2 + lo: word jh = j*2 + hi holds r8 = 0, 1
#pragma unroll
    for (int jh = 0; jh < 4; ++jh) {
      w[jh] = 0u;
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        float a, b;
        pair(T * 16 + g + 8 * r, ks * 32 + 8 * jh + 2 * q, a, b);
        w[jh] |= e4m3x2(a, sc[r], b, sc[r]) << (16 * r);
      }
    }
    vals[(T * kKSteps + ks) * 32 + lane] = make_uint4(w[0], w[1], w[2], w[3]);
  }
}

// Dense V in e4m3 (format_fp8.pack_v_dense): 32-token chunk C; lane (g, q) holds, per 16-channel tile mt,
// channels g + 8 r8 and tokens 16 j + 8 hi + 2 q + lo as element j*8 + hi*4 + r8*2 + lo of its 16 bytes.
__device__ __forceinline__ void compress_vd8_unit(const Element* __restrict__ base, long long st, int length, int C,
                                                  uint4* __restrict__ vals, __half* __restrict__ scales) {
  const int lane = threadIdx.x % 32, g = lane >> 2, q = lane & 3;
  __shared__ uint4 tile_smem[kWarpsPerBlock][32][2];
  uint4 (&tile)[32][2] = tile_smem[threadIdx.x / 32];
  float amax[4][2] = {};  // tokens 8 jh + 2 q + lo
#pragma unroll 1
  for (int mt = 0; mt < kMTiles; ++mt) {
    const Element* t_el = stage_tile(base, st, length, C, mt, tile);
#pragma unroll
    for (int jh = 0; jh < 4; ++jh)
#pragma unroll
      for (int lo = 0; lo < 2; ++lo)
#pragma unroll
        for (int r = 0; r < 2; ++r)
          amax[jh][lo] = fmaxf(amax[jh][lo], fabsf(float(t_el[(8 * jh + 2 * q + lo) * 16 + g + 8 * r])));
  }
  float sc[4][2];
#pragma unroll
  for (int jh = 0; jh < 4; ++jh)
#pragma unroll
    for (int lo = 0; lo < 2; ++lo) {
      const __half h = e4m3_scale(warp_max_over_rows(amax[jh][lo]));
      sc[jh][lo] = __half2float(h);
      if (g == 0) scales[C * 32 + 8 * jh + 2 * q + lo] = h;
    }
#pragma unroll 1
  for (int mt = 0; mt < kMTiles; ++mt) {
    const Element* t_el = stage_tile(base, st, length, C, mt, tile);
    uint32_t w[4];
#pragma unroll
    for (int jh = 0; jh < 4; ++jh) {
      w[jh] = 0u;
#pragma unroll
      for (int r = 0; r < 2; ++r)
        w[jh] |= e4m3x2(float(t_el[(8 * jh + 2 * q) * 16 + g + 8 * r]), sc[jh][0],
                        float(t_el[(8 * jh + 2 * q + 1) * 16 + g + 8 * r]), sc[jh][1]) << (16 * r);
    }
    vals[(C * kMTiles + mt) * 32 + lane] = make_uint4(w[0], w[1], w[2], w[3]);
  }
}

// Grids: one warp per (sequence, 16-token K tile) or (sequence, 32-token V chunk) of a [B, H, L, D] tensor,
// packed into `capacity`-token flat tensors (values, metadata, scales [B*H, capacity]).
template <int kTile, bool kDense, bool kIsK>
__global__ void __launch_bounds__(kWarpsPerBlock * 32)
compress8_kernel(const Element* __restrict__ x, long long sb, long long sh, long long st, int heads, int length,
                 int capacity, long long total_warps, char* vals, uint32_t* meta, __half* scales) {
  const long long w = (long long)blockIdx.x * kWarpsPerBlock + threadIdx.x / 32;
  if (w >= total_warps) return;  // warp-uniform: the units' shuffles see whole warps
  const int unit = int(w % (capacity / kTile));
  const long long bh = w / (capacity / kTile);
  const Element* base = x + (bh / heads) * sb + (bh % heads) * sh;
  __half* sc = scales + bh * capacity;
  // bytes a token: D/2 (2:4) or D (dense); metadata D/16 words of 16 bits = D/32 registers a token
  char* v = vals + bh * capacity * (kDense ? kHeadDim : kHeadDim / 2);
  if constexpr (kDense && kIsK) compress_kd8_unit(base, st, length, unit, reinterpret_cast<uint4*>(v), sc);
  if constexpr (kDense && !kIsK) compress_vd8_unit(base, st, length, unit, reinterpret_cast<uint4*>(v), sc);
  if constexpr (!kDense) {
    uint32_t* m = meta + bh * capacity * (kHeadDim / 32);
    if constexpr (kIsK) compress_k8_unit(base, st, length, unit, reinterpret_cast<uint2*>(v), m, sc);
    else compress_v8_unit(base, st, length, unit, reinterpret_cast<uint2*>(v), m, sc);
  }
}

template <int kTile, bool kDense, bool kIsK>
int launch_compress8(const void* x, long long sb, long long sh, long long st, int batch, int heads, int length,
                     int capacity, void* vals, void* meta, void* scales, void* stream) {
  if (batch < 1 || heads < 1 || length < 0 || capacity < 32 || capacity % 32 || length > capacity ||
      (!kDense && !meta))
    return cudaErrorInvalidValue;
  const long long total = (long long)batch * heads * (capacity / kTile);
  const long long blocks = (total + kWarpsPerBlock - 1) / kWarpsPerBlock;
  if (blocks > 0x7fffffffLL) return cudaErrorInvalidValue;
  compress8_kernel<kTile, kDense, kIsK><<<unsigned(blocks), kWarpsPerBlock * 32, 0, static_cast<cudaStream_t>(stream)>>>(
      static_cast<const Element*>(x), sb, sh, st, heads, length, capacity, total, static_cast<char*>(vals),
      static_cast<uint32_t*>(meta), static_cast<__half*>(scales));
  return cudaGetLastError();
}
