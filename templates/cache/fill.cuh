// Compression grids: every 16-token K tile / 32-token V chunk of a [B, H, L, D] tensor to the flat packed
// tensors or, by the block table, to the cache's pools (pack.cuh's units), and their host launcher. Included
// inside the variant's namespace after pack.cuh.

// K [B, H, L, D] (token stride st, channel stride 1): warp w = (bh, 16-token tile T, k-step).
__global__ void __launch_bounds__(kWarpsPerBlock * 32)
compress_k_kernel(const Element* __restrict__ k, long long sb, long long sh, long long st, int heads,
                  int length, int tokens, long long total_warps, const Dest d) {
  const long long w = (long long)blockIdx.x * kWarpsPerBlock + threadIdx.x / 32;
  if (w >= total_warps) return;
  const int ks = int(w % kKSteps);
  const long long bt = w / kKSteps;
  const int T = int(bt % (tokens / 16));
  const long long bh = bt / (tokens / 16);
  const Element* base = k + (bh / heads) * sb + (bh % heads) * sh;
  compress_k_unit(base, st, length, T, ks, place<16>(d, bh, T, tokens / 16), d,
                  d.weight ? d.weight + bh * kHeadDim : nullptr);
}

// V [B, H, L, D]: warp w = (bh, 32-token chunk C, 16-channel tile).
__global__ void __launch_bounds__(kWarpsPerBlock * 32)
compress_v_kernel(const Element* __restrict__ v, long long sb, long long sh, long long st, int heads,
                  int length, int tokens, long long total_warps, const Dest d) {
  const long long w = (long long)blockIdx.x * kWarpsPerBlock + threadIdx.x / 32;
  if (w >= total_warps) return;
  const int mt = int(w % kMTiles);
  const long long bc = w / kMTiles;
  const int C = int(bc % (tokens / 32));
  const long long bh = bc / (tokens / 32);
  const Element* base = v + (bh / heads) * sb + (bh % heads) * sh;
  const long long chunk = place<32>(d, bh, C, tokens / 32);
  const float* weight = d.weight ? d.weight + bh * tokens + C * 32 : nullptr;
  if constexpr (kMTiles % kWarpsPerBlock == 0) {
    // The CTA holds kWarpsPerBlock channel tiles of one chunk (so every warp is in range and takes the same
    // branch): its metadata rows go out whole through shared memory, where word by word eight warps wrote
    // each 32-byte sector of them.
    __shared__ __align__(16) uint32_t s_meta[16][kWarpsPerBlock];
    const bool staged = (reinterpret_cast<uintptr_t>(d.meta) & 15) == 0;
    compress_v_unit(base, st, length, C, mt, chunk, d, weight, staged ? &s_meta[0][mt % kWarpsPerBlock] : nullptr);
    if (chunk < 0 || !staged) return;
    __syncthreads();
    constexpr int kPerRow = kWarpsPerBlock / 4;  // 16-byte pieces a row
    if (threadIdx.x < 16 * kPerRow) {
      const int r = threadIdx.x / kPerRow, piece = threadIdx.x % kPerRow;
      reinterpret_cast<uint4*>(d.meta + (chunk * 16 + r) * kMTiles + mt - mt % kWarpsPerBlock)[piece] =
          reinterpret_cast<const uint4*>(s_meta[r])[piece];
    }
  } else {
    compress_v_unit(base, st, length, C, mt, chunk, d, weight);
  }
}

// Host launcher of compress_k_kernel / compress_v_kernel (strides in elements, channel stride 1).
template <typename Kernel>
int launch_compress(Kernel kernel, int units_per_token_tile, int tile_tokens, const void* x, long long sb,
                    long long sh, long long st, int batch, int heads, int length, int tokens, const Dest& d,
                    void* stream) {
  if (batch < 1 || heads < 1 || length < 0 || tokens < 32 || tokens % 32 || length > tokens)
    return cudaErrorInvalidValue;
  const long long total = (long long)batch * heads * (tokens / tile_tokens) * units_per_token_tile;
  const long long blocks = (total + kWarpsPerBlock - 1) / kWarpsPerBlock;
  if (blocks > 0x7fffffffLL) return cudaErrorInvalidValue;
  kernel<<<unsigned(blocks), kWarpsPerBlock * 32, 0, static_cast<cudaStream_t>(stream)>>>(
      static_cast<const Element*>(x), sb, sh, st, heads, length, tokens, total, d);
  return cudaGetLastError();
}
