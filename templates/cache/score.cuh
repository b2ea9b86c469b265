// Scoring of cache blocks for select.cuh. Included inside the variant's namespace after its constants
// (Element, kHeadDim).

// Prune loss of 2:4 per cache block: the summed |x| of the 2 smallest of every group of 4
// (K: groups along head_dim; V: groups of 4 tokens per channel). Grid (blocks, H, B).
template <bool kAlongTokens>
__global__ void __launch_bounds__(256)
score_kernel(const Element* __restrict__ x, long long sb, long long sh, long long st, int block_size,
             float* __restrict__ loss) {
  const int blk = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  const Element* base = x + b * sb + h * sh + (long long)blk * block_size * st;
  // a thread reads 8 channels (16 bytes) of 4 consecutive tokens: two K groups per token row,
  // or eight V groups (4 tokens of one channel each)
  constexpr int kVecs = kHeadDim / 8;  // 16-byte vectors a token row
  float acc = 0.f;
  for (int u = threadIdx.x; u < block_size / 4 * kVecs; u += blockDim.x) {
    const int t0 = u / kVecs * 4, c0 = u % kVecs * 8;
    float a[4][8];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const uint4 raw = *reinterpret_cast<const uint4*>(base + (t0 + i) * st + c0);
      const Element* xr = reinterpret_cast<const Element*>(&raw);
#pragma unroll
      for (int c = 0; c < 8; ++c) a[i][c] = fabsf(float(xr[c]));
    }
#pragma unroll
    for (int grp = 0; grp < 8; ++grp) {
      // kAlongTokens: group = channel grp over the 4 tokens; else row grp / 2, channels 4 * (grp % 2)..
      const float x0 = kAlongTokens ? a[0][grp] : a[grp / 2][4 * (grp % 2) + 0];
      const float x1 = kAlongTokens ? a[1][grp] : a[grp / 2][4 * (grp % 2) + 1];
      const float x2 = kAlongTokens ? a[2][grp] : a[grp / 2][4 * (grp % 2) + 2];
      const float x3 = kAlongTokens ? a[3][grp] : a[grp / 2][4 * (grp % 2) + 3];
      const float top1 = fmaxf(fmaxf(x0, x1), fmaxf(x2, x3));
      // second largest: the larger of (smaller pair maximum, larger pair minimum)
      const float top2 = fmaxf(fminf(fmaxf(x0, x1), fmaxf(x2, x3)), fmaxf(fminf(x0, x1), fminf(x2, x3)));
      acc += x0 + x1 + x2 + x3 - top1 - top2;
    }
  }
  __shared__ float partial[8];
  acc = warp_sum(acc);
  if (threadIdx.x % 32 == 0) partial[threadIdx.x / 32] = acc;
  __syncthreads();
  if (threadIdx.x == 0) {
    float total = 0.f;
    for (int w = 0; w < blockDim.x / 32; ++w) total += partial[w];
    loss[((long long)b * gridDim.y + h) * gridDim.x + blk] = total;
  }
}
