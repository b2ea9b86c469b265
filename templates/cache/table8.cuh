// The hierarchical cache with e4m3 tensors: an e4m3 tensor's eligible blocks live in e4m3 pools, dense (table
// entry kDense8 + slot) or 2:4 (entry -slot-1: e4m3 values, format.py's metadata), each with float16 scales per
// token (pack.cuh's Pools8); its sink and window blocks stay dense in the model dtype. The fill grid and the block
// packer the append kernel shares, on pack8.cuh's units. Included inside the variant's namespace after pack8.cuh.

// Unit u (K: 16-token tile, V: 32-token chunk) of one block, rows `rows` (valid below `length`), into 2:4 slot
// `slot` (sparse) or e4m3 dense slot `slot` of head bh. `w`: K's channel weights [D] or the block's V token
// weights [block] of the 2:4 choice (null: magnitudes).
template <bool kIsK>
__device__ __forceinline__ void pack8_block_unit(const Element* rows, long long st, int length, int u, bool sparse,
                                                 long long bh, int slot, int block, char* vals, uint32_t* meta,
                                                 int n_sparse, const Pools8& p, const float* w) {
  if (sparse) {
    const long long s = bh * n_sparse + slot;
    uint2* v = reinterpret_cast<uint2*>(vals + s * block * (kHeadDim / 2));
    uint32_t* m = meta + s * block * (kHeadDim / 32);
    __half* sc = p.sparse_scales + s * block;
    if constexpr (kIsK) compress_k8_unit(rows, st, length, u, v, m, sc, w);
    else compress_v8_unit(rows, st, length, u, v, m, sc, w ? w + u * 32 : nullptr);
  } else {
    const long long s = bh * p.n_dense8 + slot;
    uint4* v = reinterpret_cast<uint4*>(p.dense8 + s * block * kHeadDim);
    if constexpr (kIsK) compress_kd8_unit(rows, st, length, u, v, p.dense8_scales + s * block);
    else compress_vd8_unit(rows, st, length, u, v, p.dense8_scales + s * block);
  }
}

// Fill: every unit of a [B, H, L, D] tensor where the table says (model-dtype dense rows copied, e4m3 dense or 2:4
// packed). One warp per (bh, unit).
template <bool kIsK>
__global__ void __launch_bounds__(kWarpsPerBlock * 32)
fill8_kernel(const Element* __restrict__ x, long long sb, long long sh, long long st, int heads, int length,
             int tokens, long long total_warps, const Dest d, const Pools8 p) {
  constexpr int kTile = kIsK ? 16 : 32;
  const long long w = (long long)blockIdx.x * kWarpsPerBlock + threadIdx.x / 32;
  if (w >= total_warps) return;  // warp-uniform
  const int lane = threadIdx.x % 32;
  const int unit = int(w % (tokens / kTile));
  const long long bh = w / (tokens / kTile);
  const int blk = unit * kTile / d.block, in_blk = unit % (d.block / kTile);
  const int e = d.table[bh * d.max_blocks + blk];
  const Element* rows = x + (bh / heads) * sb + (bh % heads) * sh + (long long)blk * d.block * st;
  const int len = length - blk * d.block;
  if (e >= 0 && e < kDense8) {  // model-dtype dense: copy the unit's rows (zeros past the length)
    Element* dst = d.dense + ((bh * d.n_dense + e) * d.block + in_blk * kTile) * (long long)kHeadDim;
    for (int i = lane; i < kTile * kHeadDim / 8; i += 32) {
      const int r = in_blk * kTile + i / (kHeadDim / 8), c = (i % (kHeadDim / 8)) * 8;
      uint4 val = {};
      if (r < len) val = *reinterpret_cast<const uint4*>(rows + r * st + c);
      reinterpret_cast<uint4*>(dst)[i] = val;
    }
    return;
  }
  const float* wt = !d.weight ? nullptr : kIsK ? d.weight + bh * kHeadDim : d.weight + bh * tokens + blk * d.block;
  pack8_block_unit<kIsK>(rows, st, len, in_blk, e < 0, bh, e < 0 ? -e - 1 : e - kDense8, d.block,
                         reinterpret_cast<char*>(d.vals), d.meta, d.n_sparse, p, wt);
}

template <bool kIsK>
int launch_fill8(const void* x, long long sb, long long sh, long long st, int batch, int heads, int length,
                 const Dest& d, const Pools8& p, void* stream) {
  if (batch < 1 || heads < 1 || length < 0 || d.block < 32 || d.block % 32 || !p.dense8 || !p.dense8_scales ||
      !p.sparse_scales || (length + d.block - 1) / d.block > d.max_blocks)
    return cudaErrorInvalidValue;
  constexpr int kTile = kIsK ? 16 : 32;
  const int tokens = (length + d.block - 1) / d.block * d.block;
  const long long total = (long long)batch * heads * (tokens / kTile);
  const long long blocks = (total + kWarpsPerBlock - 1) / kWarpsPerBlock;
  if (blocks > 0x7fffffffLL) return cudaErrorInvalidValue;
  if (total == 0) return cudaSuccess;
  fill8_kernel<kIsK><<<unsigned(blocks), kWarpsPerBlock * 32, 0, static_cast<cudaStream_t>(stream)>>>(
      static_cast<const Element*>(x), sb, sh, st, heads, length, tokens, total, d, p);
  return cudaGetLastError();
}
