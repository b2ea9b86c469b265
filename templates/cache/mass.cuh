// Attention mass per key of a prompt's observation window (its last W queries), on the tensor cores: what
// hierasparse_gen/selection.py's token_mass computes in torch, for the cache's fill. Included inside the variant's
// namespace after common.cuh.j2's helpers (Element, kHeadDim, mma_dense, fast_exp2).
//
// Rows are the G x W queries of a KV head's group (row r: query head h * G + r / W at position L - W + r % W);
// the mass of key j is the sum over rows of softmax_r(j), causal. Two passes over the keys, each a CTA per
// (range of kMassKeys keys, sequence x KV head) with the range's keys in shared memory and a warp per 16 rows
// at a time, S = Q K^T by mma.sync (Q in registers): the first writes every row's softmax state (max, sum) over
// the range, mass_lse_kernel combines them into the row's log2-sum-exp, the second sums exp2(s - lse) over the
// rows per key. The sums run in a fixed order (no atomics), so a fill gives the same bits every time.

constexpr int kMassWarps = 4;
constexpr int kMassKeys = kHeadDim <= 128 ? 256 : 128;  // keys a CTA: at most 64 KB of K
constexpr int kMassSmem = kMassKeys * kHeadDim * 2 + kMassWarps * kMassKeys * 4;  // K rows + each warp's sums

struct MassArgs {
  const Element* q;  // q_obs [B, Hq, W, D], channel stride 1
  long long qb, qh, qw;
  const Element* k;  // k [B, Hkv, L, D], channel stride 1
  long long kb, kh, kt;
  int heads, group, window, length, ranges;
  float scale_log2;
  float2* partial;   // [B * Hkv, ranges, G * W]: (max, sum) of each row over each range, log2 domain
  float* lse;        // [B * Hkv, G * W]
  float* mass;       // [B, Hkv, L]
};

template <bool kSum>
__global__ void __launch_bounds__(kMassWarps * 32)
mass_pass_kernel(const MassArgs a) {
  extern __shared__ __align__(16) char smem[];
  constexpr int kRowChunks = kHeadDim / 8, kKSteps16 = kHeadDim / 16;
  const int range = blockIdx.x;
  const long long bh = blockIdx.y;
  const int b = int(bh / a.heads), h = int(bh % a.heads);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane >> 2, t = lane & 3;
  const int key0 = range * kMassKeys, rows = a.group * a.window;

  const Element* kbase = a.k + b * a.kb + h * a.kh;
  for (int i = threadIdx.x; i < kMassKeys * kRowChunks; i += blockDim.x) {
    const int r = i / kRowChunks, c = i % kRowChunks;
    char* dst = smem + 16 * swizzle_chunk<kRowChunks>(r, c);
    if (key0 + r < a.length) cp_async16(dst, kbase + (key0 + r) * a.kt + c * 8);
    else *reinterpret_cast<uint4*>(dst) = make_uint4(0u, 0u, 0u, 0u);  // past the prompt: masked below
  }
  cutlass::arch::cp_async_fence();
  float* sums = reinterpret_cast<float*>(smem + kMassKeys * kHeadDim * 2);  // [kMassWarps][kMassKeys]
  if (kSum)
    for (int i = threadIdx.x; i < kMassWarps * kMassKeys; i += blockDim.x) sums[i] = 0.f;
  cutlass::arch::cp_async_wait<0>();
  __syncthreads();

  for (int tile = warp; tile * 16 < rows; tile += kMassWarps) {
    // this lane's rows g and g + 8 of the tile: their query fragments (the A operand), positions, lse
    uint32_t qf[kKSteps16][4];
    int qpos[2];
    float lse2[2] = {0.f, 0.f};
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int r = tile * 16 + g + 8 * i;
      const bool real = r < rows;
      const int j = real ? r / a.window : 0, w = real ? r % a.window : 0;
      qpos[i] = real ? a.length - a.window + w : -1;  // a padding row sees no key
      const Element* qrow = a.q + b * a.qb + (h * a.group + j) * a.qh + w * a.qw + 2 * t;
#pragma unroll
      for (int kk = 0; kk < kKSteps16; ++kk) {
        qf[kk][i] = real ? *reinterpret_cast<const uint32_t*>(qrow + 16 * kk) : 0u;
        qf[kk][i + 2] = real ? *reinterpret_cast<const uint32_t*>(qrow + 16 * kk + 8) : 0u;
      }
      if (kSum && real) lse2[i] = a.lse[bh * rows + r];
    }
    float m_run[2] = {-INFINITY, -INFINITY}, l_run[2] = {0.f, 0.f};
    for (int sub = 0; sub < kMassKeys / 64; ++sub) {
      // S for 16 rows x 64 keys: n-tile nt holds keys sub * 64 + 8 nt + 2t + {0, 1} (rows g, g + 8)
      float s[8][4] = {};
#pragma unroll
      for (int kk = 0; kk < kKSteps16; ++kk) {
#pragma unroll
        for (int np = 0; np < 4; ++np) {  // two n-tiles a ldmatrix.x4: keys np * 16 + (0..7, 8..15)
          const int row = sub * 64 + np * 16 + (lane & 7) + 8 * (lane >> 4);
          uint32_t bk[4];
          cute::SM75_U32x4_LDSM_N::copy(
              *reinterpret_cast<const cute::uint128_t*>(smem + 16 * swizzle_chunk<kRowChunks>(row, 2 * kk + ((lane >> 3) & 1))),
              bk[0], bk[1], bk[2], bk[3]);
          const uint32_t b0[2] = {bk[0], bk[1]}, b1[2] = {bk[2], bk[3]};
          mma_dense(s[2 * np], qf[kk], b0);
          mma_dense(s[2 * np + 1], qf[kk], b1);
        }
      }
      const int kbase_tok = key0 + sub * 64 + 2 * t;
      if (!kSum) {  // online (max, sum) of rows g and g + 8 (a quad's 4 lanes share a row)
#pragma unroll
        for (int i = 0; i < 2; ++i) {
          float mx = -INFINITY;
#pragma unroll
          for (int nt = 0; nt < 8; ++nt)
#pragma unroll
            for (int e = 0; e < 2; ++e) {
              const float x = kbase_tok + 8 * nt + e <= qpos[i] ? s[nt][2 * i + e] * a.scale_log2 : -INFINITY;
              s[nt][2 * i + e] = x;
              mx = fmaxf(mx, x);
            }
          mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
          mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
          const float m_new = fmaxf(m_run[i], mx);
          const float base = m_new == -INFINITY ? 0.f : m_new;  // no key seen yet: every term is 0
          float sum = 0.f;
#pragma unroll
          for (int nt = 0; nt < 8; ++nt) sum += fast_exp2(s[nt][2 * i] - base) + fast_exp2(s[nt][2 * i + 1] - base);
          sum += __shfl_xor_sync(0xffffffffu, sum, 1);
          sum += __shfl_xor_sync(0xffffffffu, sum, 2);
          l_run[i] = l_run[i] * fast_exp2(m_run[i] - base) + sum;
          m_run[i] = m_new;
        }
      } else {  // each key's probabilities summed over the tile's 16 rows, added to this warp's sums
#pragma unroll
        for (int nt = 0; nt < 8; ++nt)
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const int tok = kbase_tok + 8 * nt + e;
            float p = (tok <= qpos[0] ? fast_exp2(s[nt][e] * a.scale_log2 - lse2[0]) : 0.f) +
                      (tok <= qpos[1] ? fast_exp2(s[nt][2 + e] * a.scale_log2 - lse2[1]) : 0.f);
            p += __shfl_xor_sync(0xffffffffu, p, 4);
            p += __shfl_xor_sync(0xffffffffu, p, 8);
            p += __shfl_xor_sync(0xffffffffu, p, 16);
            if (g == 0) sums[warp * kMassKeys + sub * 64 + 8 * nt + 2 * t + e] += p;
          }
      }
    }
    if (!kSum && t == 0)
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        const int r = tile * 16 + g + 8 * i;
        if (r < rows) a.partial[(bh * a.ranges + range) * rows + r] = make_float2(m_run[i], l_run[i]);
      }
  }
  if (kSum) {
    __syncthreads();
    for (int i = threadIdx.x; i < kMassKeys; i += blockDim.x) {
      float total = 0.f;
#pragma unroll
      for (int w = 0; w < kMassWarps; ++w) total += sums[w * kMassKeys + i];
      if (key0 + i < a.length) a.mass[bh * a.length + key0 + i] = total;
    }
  }
}

// Each row's log2-sum-exp over every range. Grid (ceil(rows / 128), B * Hkv).
__global__ void __launch_bounds__(128) mass_lse_kernel(const MassArgs a) {
  const long long bh = blockIdx.y;
  const int rows = a.group * a.window, r = blockIdx.x * blockDim.x + threadIdx.x;
  if (r >= rows) return;
  const float2* p = a.partial + bh * a.ranges * rows + r;
  float m = -INFINITY, l = 0.f;
  for (int i = 0; i < a.ranges; ++i) m = fmaxf(m, p[(long long)i * rows].x);
  for (int i = 0; i < a.ranges; ++i) {
    const float2 x = p[(long long)i * rows];
    if (x.y > 0.f) l += x.y * fast_exp2(x.x - m);
  }
  a.lse[bh * rows + r] = m + log2f(l);  // every row sees key 0, so l > 0
}

// Host launcher: mass [B, Hkv, L] float32 of q_obs [B, Hkv * group, window, D] over k [B, Hkv, L, D] (strides in
// elements); `workspace` holds the passes' states (mass_workspace_bytes).
inline long long mass_workspace_bytes(int batch, int heads, int group, int window, int length) {
  const long long rows = (long long)group * window, ranges = (length + kMassKeys - 1) / kMassKeys;
  return (long long)batch * heads * rows * (ranges * 8 + 4);
}

inline int launch_token_mass(const void* q, long long qb, long long qh, long long qw, const void* k, long long kb,
                             long long kh, long long kt, int batch, int heads, int group, int window, int length,
                             float scale, void* workspace, long long workspace_bytes, float* mass, void* stream) {
  if (batch < 1 || heads < 1 || group < 1 || window < 1 || window > length || batch * heads > 65535 ||
      mass_workspace_bytes(batch, heads, group, window, length) > workspace_bytes)
    return cudaErrorInvalidValue;
  const int ranges = (length + kMassKeys - 1) / kMassKeys;
  MassArgs a{static_cast<const Element*>(q), qb, qh, qw, static_cast<const Element*>(k), kb, kh, kt, heads, group,
             window, length, ranges, scale * 1.4426950408889634f, nullptr, nullptr, mass};
  a.partial = static_cast<float2*>(workspace);
  a.lse = reinterpret_cast<float*>(a.partial + (long long)batch * heads * ranges * group * window);
  cudaError_t err = opt_in_smem<mass_pass_kernel<false>>(kMassSmem);
  if (err == cudaSuccess) err = opt_in_smem<mass_pass_kernel<true>>(kMassSmem);
  if (err != cudaSuccess) return err;
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  const dim3 grid(ranges, batch * heads);
  mass_pass_kernel<false><<<grid, kMassWarps * 32, kMassSmem, s>>>(a);
  mass_lse_kernel<<<dim3((group * window + 127) / 128, batch * heads), 128, 0, s>>>(a);
  mass_pass_kernel<true><<<grid, kMassWarps * 32, kMassSmem, s>>>(a);
  return cudaGetLastError();
}
