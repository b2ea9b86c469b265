// 2:4 pruning of one fragment tile and its metadata registers, and where the tile goes (flat packed tensors
// or the hierarchical cache's pools): the per-warp units the fill and append kernels share. Included inside
// the variant's namespace after its constants (Element, kHeadDim, kKSteps, kMTiles, kWarpsPerBlock).

// Keep the 2 largest |x| of 4 (ties to the lower index), or the 2 largest |x| * w[i] when weights are given
// (the cache's query-weighted K channels or attention-weighted V tokens; the same float32 products as
// format.keep_mask_2to4); returns the nibble i0 | i1 << 2. kCompensate (V's token weights): the kept pair also
// takes over what the dropped pair carried under the expected attention m = w^2 (format.compensate_v, bit for
// bit: IEEE float32 steps in its order, no contractions), unless the 4 weights are equal.
template <bool kCompensate = false>
__device__ __forceinline__ uint32_t select_2of4(const Element (&x)[4], Element& v0, Element& v1,
                                                const float* __restrict__ w = nullptr) {
  float a[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) a[i] = w ? fabsf(float(x[i])) * w[i] : fabsf(float(x[i]));
  int i0 = 4, i1 = -1;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    int beaten = 0;
#pragma unroll
    for (int j = 0; j < 4; ++j) beaten += (a[j] > a[i]) || (a[j] == a[i] && j < i);
    if (beaten < 2) { i0 = min(i0, i); i1 = max(i1, i); }
  }
  // selects, not x[i0]: a run-time index would move x to local memory
  v0 = i0 == 0 ? x[0] : i0 == 1 ? x[1] : x[2];
  v1 = i1 == 3 ? x[3] : i1 == 2 ? x[2] : x[1];
  if (kCompensate && w && !(w[0] == w[1] && w[1] == w[2] && w[2] == w[3])) {
    float r = 0.f, bound = 0.f, m[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      m[i] = __fmul_rn(w[i], w[i]);
      bound = fmaxf(bound, fabsf(float(x[i])));
      if (i != i0 && i != i1) r = __fadd_rn(r, __fmul_rn(m[i], float(x[i])));
    }
    const float m0 = i0 == 0 ? m[0] : i0 == 1 ? m[1] : m[2], m1 = i1 == 3 ? m[3] : i1 == 2 ? m[2] : m[1];
    const float den = fmaxf(__fadd_rn(__fmul_rn(m0, m0), __fmul_rn(m1, m1)), 1e-30f);
    v0 = Element(fminf(fmaxf(__fadd_rn(float(v0), __fdiv_rn(__fmul_rn(r, m0), den)), -bound), bound));
    v1 = Element(fminf(fmaxf(__fadd_rn(float(v1), __fdiv_rn(__fmul_rn(r, m1), den)), -bound), bound));
  }
  return uint32_t(i0) | (uint32_t(i1) << 2);
}

// Metadata register of lanes q in {0, 1}: nibble `mine` of group slot q of rows (r0, r1)
// is OR-ed across the quad into 16-bit words.
__device__ __forceinline__ uint32_t quad_words(uint32_t nib_r0, uint32_t nib_r1, int q) {
  uint32_t w = (nib_r0 << (4 * q)) | (nib_r1 << (16 + 4 * q));
  w |= __shfl_xor_sync(0xffffffffu, w, 1);
  w |= __shfl_xor_sync(0xffffffffu, w, 2);
  return w;
}

struct alignas(16) Fragment { Element v[8]; };

// Four consecutive elements of row r (zeros past `length`), one 8-byte load.
__device__ __forceinline__ void load4(const Element* __restrict__ at, int length, int r, Element (&x)[4]) {
  if (r < length) {
    const uint2 raw = *reinterpret_cast<const uint2*>(at);
    const Element* xr = reinterpret_cast<const Element*>(&raw);
#pragma unroll
    for (int i = 0; i < 4; ++i) x[i] = xr[i];
  } else {
#pragma unroll
    for (int i = 0; i < 4; ++i) x[i] = Element(0.f);
  }
}

// Where compressed tiles go. Flat: packed tensors [B*H, cap, ...], tile after tile. Table:
// the hierarchical cache's pools; entry e = table[bh][block] sends the block's tiles to 2:4
// slot -e-1 (compressed) or copies its rows to dense slot e.
struct Dest {
  uint4* vals;             // 2:4 values (flat tensor, or pool [B*H, n_sparse, block*D/2])
  uint32_t* meta;          // 2:4 metadata registers
  const int* table;        // nullptr: flat
  int max_blocks, block, n_sparse, n_dense;
  Element* dense;          // dense pool [B*H, n_dense, block, D]
  // weights of the 2:4 choice, or none (magnitudes): K per channel [B*H, D]; V per token [B*H, tokens]
  const float* weight = nullptr;
};

// An e4m3 tensor of the cache (templates/cache/table8.cuh): table entry kDense8 + s is its e4m3 dense slot s.
constexpr int kDense8 = 1 << 30;

struct Pools8 {                   // one e4m3 tensor's pools (all null for a model-dtype tensor)
  char* dense8;                   // [B*H, n_dense8, block * D] bytes (format_fp8's dense layout)
  __half* dense8_scales;          // [B*H, n_dense8, block]
  __half* sparse_scales;          // [B*H, n_sparse, block] (values and metadata: the 2:4 pool's)
  int n_dense8;
};

// Tile `unit` (16 tokens for K, 32 for V) of sequence bh: its index among the 2:4 tiles of
// the destination, or -1 - dense row offset (in elements) when the block is dense.
template <int kUnit>
__device__ __forceinline__ long long place(const Dest& d, long long bh, int unit, int units_per_seq) {
  if (!d.table) return bh * units_per_seq + unit;
  const int per_block = d.block / kUnit, blk = unit / per_block, in_blk = unit % per_block;
  const int e = d.table[bh * d.max_blocks + blk];
  if (e < 0) return (bh * d.n_sparse + (-e - 1)) * per_block + in_blk;
  return -1 - ((bh * d.n_dense + e) * d.block + (long long)in_blk * kUnit) * kHeadDim;
}

// One warp: 16-token tile T, k-step ks of one K sequence (rows base + t * st, t < length) to
// 2:4 tile `tile` of d (tile >= 0) or to the dense rows at element -1 - tile of d.dense. `w`: the
// sequence's channel weights [D] (or null: magnitudes).
__device__ __forceinline__ void compress_k_unit(const Element* __restrict__ base, long long st, int length,
                                                int T, int ks, long long tile, const Dest& d,
                                                const float* __restrict__ w = nullptr) {
  const int lane = threadIdx.x % 32, g = lane >> 2, q = lane & 3;
  if (tile < 0) {  // dense block: a lane pair copies a row's 64 bytes of this 16 x 32 piece, 32 contiguous an access
    const int row = T * 16 + lane / 2, c0 = ks * 32 + (lane % 2) * 8;  // (so each access fills whole sectors)
    uint4 v[2] = {};
    if (row < length) {
      v[0] = *reinterpret_cast<const uint4*>(base + row * st + c0);
      v[1] = *reinterpret_cast<const uint4*>(base + row * st + c0 + 16);
    }
    Element* dst = d.dense + (-1 - tile) + (long long)(lane / 2) * kHeadDim + c0;
    reinterpret_cast<uint4*>(dst)[0] = v[0];
    reinterpret_cast<uint4*>(dst + 16)[0] = v[1];
    return;
  }
  Fragment f;
  uint32_t nib[2][2];  // [group slot: q, 4+q][row: g, g+8]
#pragma unroll
  for (int slot = 0; slot < 2; ++slot)
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int row = T * 16 + g + 8 * r;
      Element x[4];
      load4(base + row * st + ks * 32 + slot * 16 + 4 * q, length, row, x);
      // fragment element e = 4*slot + 2*r + {0,1}: row g + 8r, kept column 8*slot + 2q + {0,1}
      nib[slot][r] = select_2of4(x, f.v[4 * slot + 2 * r], f.v[4 * slot + 2 * r + 1],
                                 w ? w + ks * 32 + slot * 16 + 4 * q : nullptr);
    }
  d.vals[(tile * kKSteps + ks) * 32 + lane] = *reinterpret_cast<uint4*>(&f);
  const uint32_t w_lo = quad_words(nib[0][0], nib[0][1], q);  // dense columns [0, 16)
  const uint32_t w_hi = quad_words(nib[1][0], nib[1][1], q);  // dense columns [16, 32)
  if (q < 2) d.meta[(tile * 16 + g * 2 + q) * kKSteps + ks] = q == 0 ? w_lo : w_hi;
}

// One warp: 32-token chunk C, 16-channel tile mt of one V sequence, 2:4 along tokens per
// channel, to 2:4 chunk `chunk` of d (chunk >= 0) or to the dense rows at -1 - chunk. `w`: the
// chunk's 32 token weights of the choice and of the kept pairs' compensation (or null: magnitudes).
// `stage`: null, or where the chunk's metadata word of row r goes instead of d.meta (stage[r * kWarpsPerBlock]),
// for the caller to write a CTA's rows whole.
__device__ __forceinline__ void compress_v_unit(const Element* __restrict__ base, long long st, int length,
                                                int C, int mt, long long chunk, const Dest& d,
                                                const float* __restrict__ w = nullptr,
                                                uint32_t* stage = nullptr) {
  const int lane = threadIdx.x % 32, g = lane >> 2, q = lane & 3;
  // a lane pair reads a token's 16 channels (32 bytes, one sector an access): lane reads half `lane & 1` of
  // tokens C*32 + lane/2 and C*32 + 16 + lane/2
  const int half = lane & 1;
  uint4 row[2] = {};
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int tok = C * 32 + 16 * i + lane / 2;
    if (tok < length) row[i] = *reinterpret_cast<const uint4*>(base + tok * st + mt * 16 + 8 * half);
  }
  if (chunk < 0) {  // dense block: the rows go to the pool as they are
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      Element* dst = d.dense + (-1 - chunk) + (long long)(16 * i + lane / 2) * kHeadDim + mt * 16 + 8 * half;
      *reinterpret_cast<uint4*>(dst) = row[i];
    }
    return;
  }
  // 2:4 along tokens: the warp's 32 x 16 tile goes through shared memory to the lanes whose
  // groups need it (each lane then reads 4 tokens of 2 channels). Token T's two 16-byte halves sit at
  // 2T + T/4: the lanes of one read take tokens 4q + i (q = 0..3), 32 bytes apart with no padding, so all
  // four quads hit the same 4 banks; 16 bytes more every 4 tokens puts them in 16 different banks.
  __shared__ uint4 tile_smem[kWarpsPerBlock][72];
  uint4* tile = tile_smem[threadIdx.x / 32];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int T = 16 * i + lane / 2;
    tile[2 * T + T / 4 + half] = row[i];
  }
  __syncwarp();
  const Element* t_el = reinterpret_cast<const Element*>(tile);  // 8 elements a 16-byte half
  Fragment f;
  uint32_t nib[2][2];  // [group slot: q, 4+q][channel: g, g+8]
#pragma unroll
  for (int slot = 0; slot < 2; ++slot)
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      Element x[4];
#pragma unroll
      for (int i = 0; i < 4; ++i)  // token T = 16 slot + 4q + i (2T + T/4 = 36 slot + 9q + 2i), channel g + 8r
        x[i] = t_el[(36 * slot + 9 * q + 2 * i + r) * 8 + g];
      nib[slot][r] = select_2of4<true>(x, f.v[4 * slot + 2 * r], f.v[4 * slot + 2 * r + 1],
                                       w ? w + slot * 16 + 4 * q : nullptr);
    }
  d.vals[(chunk * kMTiles + mt) * 32 + lane] = *reinterpret_cast<uint4*>(&f);
  const uint32_t w_lo = quad_words(nib[0][0], nib[0][1], q);  // tokens [0, 16) of the chunk
  const uint32_t w_hi = quad_words(nib[1][0], nib[1][1], q);  // tokens [16, 32)
  if (q < 2) {
    const uint32_t word = q == 0 ? w_lo : w_hi;
    if (stage) stage[(g * 2 + q) * kWarpsPerBlock] = word;
    else d.meta[(chunk * 16 + g * 2 + q) * kMTiles + mt] = word;
  }
}
