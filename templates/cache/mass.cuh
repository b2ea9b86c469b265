// Attention mass per key of a prompt's observation window (its last W queries), on the tensor cores: what
// hierasparse_gen/selection.py's token_mass computes in torch, for the cache's fill. Included inside the variant's
// namespace after common.cuh.j2's helpers (Element, kHeadDim, mma_dense, fast_exp2, swizzle_chunk, cp_async16,
// wait_pending, warp sums and maxima).
//
// Rows are the G x W queries of a KV head's group (row r: query head h * G + r / W at position L - W + r % W);
// the mass of key j is the sum over rows of softmax_r(j), causal. Two passes over the keys, each a CTA per
// (range of kMassKeys keys, sequence x KV head) with the range's keys in shared memory. Scores are computed
// key-major, S^T = K Q^T (keys the MMA's rows, from shared memory by ldmatrix; a warp's kMassRows queries the
// columns, held in registers), so that a lane holds 2 kMassN8 queries of each of its keys: the second pass adds
// them in registers and the quad's four lanes by three shuffles. The first pass keeps every row's softmax state
// (max, sum) over the range, mass_lse_kernel combines the ranges into the row's log2-sum-exp, the second sums
// exp2(s - lse) per key. K arrives in stages of 64 keys that a warp's first tile reads as they land; the second
// pass walks the ranges backwards, to find the first pass's last ones in L2. Sums in a fixed order (no atomics): a
// fill gives the same bits every time. Given the rows' log-sum-exp (an attention over the prompt computes it
// anyway: lse_in), only the second pass runs.

constexpr int kMassWarps = 4;
constexpr int kMassKeys = kHeadDim <= 128 ? 256 : 128;  // keys a CTA: at most 64 KB of K
constexpr int kMassN8 = kHeadDim <= 128 ? 4 : 2;        // query columns a warp holds, in n8 tiles (Q in registers)
constexpr int kMassRows = 8 * kMassN8;
constexpr int kMassSmem = kMassKeys * kHeadDim * 2 + kMassWarps * kMassKeys * 4;  // K rows + each warp's sums
struct MassArgs {
  const Element* q;  // q_obs [B, Hq, W, D], channel stride 1
  long long qb, qh, qw;
  const Element* k;  // k [B, Hkv, L, D], channel stride 1
  long long kb, kh, kt;
  int heads, group, window, length, ranges;
  float scale_log2;
  float2* partial;   // [B * Hkv, G * W, ranges]: (max, sum) of each row over each range, log2 domain
  float* lse;        // [B * Hkv, G * W]
  const float* lse_in;  // or the rows' natural log-sum-exp given, lse_in [B, Hq, W] (null: the first pass's)
  long long lb, lh, lw;
  float* mass;       // [B, Hkv, L]
};

// Per-tile state of a warp: the B fragments of its kMassRows query columns, the accumulator columns' positions and
// (second pass) log2-sum-exp, and (first pass) their running softmax state.
template <int kKSteps16>
struct MassTile {
  uint32_t qf[kKSteps16][kMassN8][2];
  int qpos[kMassN8][2];
  float lse2[kMassN8][2];
  float m_run[kMassN8][2], l_run[kMassN8][2];
};

// Row r's log2-sum-exp: the first pass's, or the given natural one times log2(e).
__device__ __forceinline__ float row_lse2(const MassArgs& a, long long bh, int b, int h, int r) {
  if (a.lse_in == nullptr) return a.lse[bh * a.group * a.window + r];
  return a.lse_in[b * a.lb + (h * a.group + r / a.window) * a.lh + (r % a.window) * a.lw] * kLog2e;
}

template <bool kSum, int kKSteps16>
__device__ __forceinline__ void mass_tile_begin(const MassArgs& a, MassTile<kKSteps16>& st, int tile, long long bh,
                                                int b, int h, int g, int t) {
  const int rows = a.group * a.window;
  // B operand: this lane's query column 8 j + g of the tile, channels 16 kk + 2t (+1) and + 8
#pragma unroll
  for (int j = 0; j < kMassN8; ++j) {
    const int r = tile * kMassRows + 8 * j + g;
    const bool real = r < rows;
    const Element* qrow = a.q + b * a.qb + (h * a.group + (real ? r / a.window : 0)) * a.qh +
                          (real ? r % a.window : 0) * a.qw + 2 * t;
#pragma unroll
    for (int kk = 0; kk < kKSteps16; ++kk) {
      st.qf[kk][j][0] = real ? *reinterpret_cast<const uint32_t*>(qrow + 16 * kk) : 0u;
      st.qf[kk][j][1] = real ? *reinterpret_cast<const uint32_t*>(qrow + 16 * kk + 8) : 0u;
    }
  }
  // the accumulator's columns: rows 8 j + 2t + c of the tile; a padding row has position -1 (sees no key) and
  // log2-sum-exp +inf (probabilities 0)
#pragma unroll
  for (int j = 0; j < kMassN8; ++j)
#pragma unroll
    for (int c = 0; c < 2; ++c) {
      const int r = tile * kMassRows + 8 * j + 2 * t + c;
      st.qpos[j][c] = r < rows ? a.length - a.window + r % a.window : -1;
      st.lse2[j][c] = kSum && r < rows ? row_lse2(a, bh, b, h, r) : INFINITY;
      st.m_run[j][c] = -INFINITY;
      st.l_run[j][c] = 0.f;
    }
}

// Keys [16 mt0, 16 mt1) of the CTA's range against one tile: S^T = K Q^T two key m-tiles at a time (s[i][j]: keys
// 16 (mt + i) + g (+8), queries 8 j + 2t (+1)); the first pass folds them into the running (max, sum), the second
// adds each key's probabilities summed over the tile's queries to this warp's sums.
template <bool kSum, int kRowChunks, int kKSteps16>
__device__ __forceinline__ void mass_tile_keys(const MassArgs& a, MassTile<kKSteps16>& st, const char* smem,
                                               float* warp_sums, int key0, int mt0, int mt1, int lane) {
  const int g = lane >> 2, t = lane & 3;
  const int first_masked = a.length - a.window + 1;  // keys from here on may lie after some row's position
  for (int mt = mt0; mt < mt1; mt += 2) {
    float s[2][kMassN8][4] = {};
#pragma unroll
    for (int kk = 0; kk < kKSteps16; ++kk)
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        const int row = 16 * (mt + i) + (lane & 7) + 8 * ((lane >> 3) & 1);
        uint32_t ak[4];
        cute::SM75_U32x4_LDSM_N::copy(
            *reinterpret_cast<const cute::uint128_t*>(smem + 16 * swizzle_chunk<kRowChunks>(row, 2 * kk + (lane >> 4))),
            ak[0], ak[1], ak[2], ak[3]);
#pragma unroll
        for (int j = 0; j < kMassN8; ++j) mma_dense(s[i][j], ak, st.qf[kk][j]);
      }
    const int k16 = key0 + 16 * mt + g;  // key of s[0][j][0]
    const bool masked = key0 + 16 * mt + 31 >= first_masked;
    // log2-domain scores; the second pass's already less its row's log2-sum-exp (one FFMA)
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < kMassN8; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const float x = kSum ? fmaf(s[i][j][e], a.scale_log2, -st.lse2[j][e & 1]) : s[i][j][e] * a.scale_log2;
          s[i][j][e] = masked && k16 + 16 * i + 8 * (e >> 1) > st.qpos[j][e & 1] ? -INFINITY : x;
        }
    if (!kSum) {  // online (max, sum) of this lane's 2 kMassN8 columns over its 4 keys of the step
#pragma unroll
      for (int j = 0; j < kMassN8; ++j)
#pragma unroll
        for (int c = 0; c < 2; ++c) {
          const float mx = fmaxf(fmaxf(s[0][j][c], s[0][j][c + 2]), fmaxf(s[1][j][c], s[1][j][c + 2]));
          const float m_new = fmaxf(st.m_run[j][c], mx);
          const float base = m_new == -INFINITY ? 0.f : m_new;  // no key seen yet: every term is 0
          st.l_run[j][c] = st.l_run[j][c] * fast_exp2(st.m_run[j][c] - base) + fast_exp2(s[0][j][c] - base) +
                           fast_exp2(s[0][j][c + 2] - base) + fast_exp2(s[1][j][c] - base) +
                           fast_exp2(s[1][j][c + 2] - base);
          st.m_run[j][c] = m_new;
        }
    } else {
      // v[2 i + hi]: this lane's queries of key 16 (mt + i) + g + 8 hi
      float v[4];
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int hi = 0; hi < 2; ++hi) {
          float acc = 0.f;
#pragma unroll
          for (int j = 0; j < kMassN8; ++j)
            acc += fast_exp2(s[i][j][2 * hi]) + fast_exp2(s[i][j][2 * hi + 1]);
          v[2 * i + hi] = acc;
        }
      // the quad's sums, scattered: lane t keeps v[t]'s (pairs over t's bit 1, then over bit 0)
      const bool up = t & 2, odd = t & 1;
      const float keep0 = (up ? v[2] : v[0]) + __shfl_xor_sync(0xffffffffu, up ? v[0] : v[2], 2);
      const float keep1 = (up ? v[3] : v[1]) + __shfl_xor_sync(0xffffffffu, up ? v[1] : v[3], 2);
      const float total = (odd ? keep1 : keep0) + __shfl_xor_sync(0xffffffffu, odd ? keep0 : keep1, 1);
      warp_sums[16 * (mt + (t >> 1)) + g + 8 * (t & 1)] += total;  // 32 lanes, 32 keys: no bank conflicts
    }
  }
}

// First pass, end of a tile: combine the 8 lanes that share a column (equal t), write each row's state.
template <int kKSteps16>
__device__ __forceinline__ void mass_tile_end(const MassArgs& a, MassTile<kKSteps16>& st, int tile, long long bh,
                                              int range, int g, int t) {
  const int rows = a.group * a.window;
#pragma unroll
  for (int j = 0; j < kMassN8; ++j)
#pragma unroll
    for (int c = 0; c < 2; ++c) {
      const float m = warp_max_over_rows(st.m_run[j][c]);
      const float base = m == -INFINITY ? 0.f : m;
      const float l = warp_sum_over_rows(st.l_run[j][c] * fast_exp2(st.m_run[j][c] - base));
      const int r = tile * kMassRows + 8 * j + 2 * t + c;
      if (g == 0 && r < rows) a.partial[(bh * rows + r) * a.ranges + range] = make_float2(m, l);
    }
}

template <bool kSum>
__global__ void __launch_bounds__(kMassWarps * 32)
mass_pass_kernel(const MassArgs a) {
  extern __shared__ __align__(16) char smem[];
  constexpr int kRowChunks = kHeadDim / 8, kKSteps16 = kHeadDim / 16;
  constexpr int kStages = kMassKeys / 64, kStageTiles = 4;  // K arrives in stages of 64 keys (4 m-tiles)
  static_assert(kStages >= 1 && kStages <= 8, "wait_pending waits for at most 7 pending stages");
  // the second pass walks the ranges backwards: the first pass's last ranges may still be in L2
  const int range = kSum ? gridDim.x - 1 - blockIdx.x : blockIdx.x;
  const long long bh = kSum ? gridDim.y - 1 - blockIdx.y : blockIdx.y;
  const int b = int(bh / a.heads), h = int(bh % a.heads);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane >> 2, t = lane & 3;
  const int key0 = range * kMassKeys, rows = a.group * a.window;

  const Element* kbase = a.k + b * a.kb + h * a.kh;
#pragma unroll
  for (int stage = 0; stage < kStages; ++stage) {
    for (int i = threadIdx.x; i < 64 * kRowChunks; i += blockDim.x) {
      const int r = 64 * stage + i / kRowChunks, c = i % kRowChunks;
      char* dst = smem + 16 * swizzle_chunk<kRowChunks>(r, c);
      if (key0 + r < a.length) cp_async16(dst, kbase + (key0 + r) * a.kt + c * 8);
      else *reinterpret_cast<uint4*>(dst) = make_uint4(0u, 0u, 0u, 0u);  // past the prompt: masked below
    }
    cutlass::arch::cp_async_fence();
  }
  float* sums = reinterpret_cast<float*>(smem + kMassKeys * kHeadDim * 2);  // [kMassWarps][kMassKeys]
  float* warp_sums = sums + warp * kMassKeys;
  if (kSum)
    for (int i = threadIdx.x; i < kMassWarps * kMassKeys; i += blockDim.x) sums[i] = 0.f;

  // the warp's first tile runs stage by stage as K arrives; later tiles find every key in place
  MassTile<kKSteps16> st;
  const bool any = warp * kMassRows < rows;
  if (any) mass_tile_begin<kSum>(a, st, warp, bh, b, h, g, t);
#pragma unroll
  for (int stage = 0; stage < kStages; ++stage) {
    wait_pending(kStages - 1 - stage);
    __syncthreads();
    if (any)
      mass_tile_keys<kSum, kRowChunks>(a, st, smem, warp_sums, key0, stage * kStageTiles, (stage + 1) * kStageTiles,
                                       lane);
  }
  if (any && !kSum) mass_tile_end(a, st, warp, bh, range, g, t);
  for (int tile = warp + kMassWarps; tile * kMassRows < rows; tile += kMassWarps) {
    mass_tile_begin<kSum>(a, st, tile, bh, b, h, g, t);
    mass_tile_keys<kSum, kRowChunks>(a, st, smem, warp_sums, key0, 0, kMassKeys / 16, lane);
    if (!kSum) mass_tile_end(a, st, tile, bh, range, g, t);
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

// Each row's log2-sum-exp over every range: a warp a row, lanes over the ranges. Grid (ceil(rows / 4), B * Hkv).
__global__ void __launch_bounds__(128) mass_lse_kernel(const MassArgs a) {
  const long long bh = blockIdx.y;
  const int rows = a.group * a.window, r = blockIdx.x * 4 + threadIdx.x / 32, lane = threadIdx.x % 32;
  if (r >= rows) return;
  const float2* p = a.partial + (bh * rows + r) * a.ranges;
  float m = -INFINITY, l = 0.f;
  for (int i = lane; i < a.ranges; i += 32) m = fmaxf(m, p[i].x);
  m = warp_max(m);
  for (int i = lane; i < a.ranges; i += 32) {
    const float2 x = p[i];
    if (x.y > 0.f) l += x.y * fast_exp2(x.x - m);
  }
  l = warp_sum(l);
  if (lane == 0) a.lse[bh * rows + r] = m + log2f(l);  // every row sees key 0, so l > 0
}

// What the fill reads from the masses [rows, L] (selection.mass_stats in torch): per whole block of `block` keys
// their sum (the selection's score) and the sum of mass / seen, seen = min(W, L - t) the window's queries that see
// key t (re-tiering's score; null: not wanted), and V's weights sqrt(mass / mean mass) of every key (null: not
// wanted). One kernel where torch took about twenty. A CTA a chunk of a row, a warp 32 keys at a time (lane = key);
// every CTA of a row sums the whole row in the same order, so they agree on its mean. Approximate division and
// root (no slow-path calls; a few ulp).
constexpr int kStatsThreads = 256;
constexpr int kStatsTokens = 2048;  // keys a CTA, rounded down to whole blocks

__global__ void __launch_bounds__(kStatsThreads)
mass_stats_kernel(const float* __restrict__ mass, int length, int window, int block, int chunk,
                  float* __restrict__ block_mass, float* __restrict__ seen_mass, long long seen_stride,
                  float* __restrict__ weights, long long weight_stride) {
  __shared__ float warp_totals[kStatsThreads / 32];
  __shared__ float2 group_sums[kStatsTokens / 32];  // (mass, mass / seen) of each 32 keys of the chunk
  const long long r = blockIdx.y;
  const float* row = mass + r * length;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  float mean = 1.f;
  if (weights) {
    // the whole row, 16 keys a thread in flight (a key at a time left each CTA waiting ~128 round trips)
    float total = 0.f;
    // float4 rows where every row starts 16-byte aligned (a uniform test: every CTA of a row sums it alike)
    if (length % 4 == 0 && (reinterpret_cast<uintptr_t>(mass) & 15) == 0) {
      const float4* row4 = reinterpret_cast<const float4*>(row);
      float part[4] = {0.f, 0.f, 0.f, 0.f};
      int i = threadIdx.x;
      for (; i + 3 * kStatsThreads < length / 4; i += 4 * kStatsThreads) {
#pragma unroll
        for (int u = 0; u < 4; ++u) {
          const float4 v = row4[i + u * kStatsThreads];
          part[u] += (v.x + v.y) + (v.z + v.w);
        }
      }
      for (; i < length / 4; i += kStatsThreads) {
        const float4 v = row4[i];
        part[0] += (v.x + v.y) + (v.z + v.w);
      }
      total = (part[0] + part[1]) + (part[2] + part[3]);
    } else {
      for (int t = threadIdx.x; t < length; t += kStatsThreads) total += row[t];
    }
    total = warp_sum(total);
    if (lane == 0) warp_totals[warp] = total;
    __syncthreads();
    total = 0.f;
#pragma unroll
    for (int w = 0; w < kStatsThreads / 32; ++w) total += warp_totals[w];
    mean = fmaxf(__fdividef(total, float(length)), 1e-30f);
  }
  const int t0 = blockIdx.x * chunk, t1 = min(length, t0 + chunk);
  for (int g = warp; 32 * g < t1 - t0; g += kStatsThreads / 32) {
    const int t = t0 + 32 * g + lane;
    const float x = t < t1 ? row[t] : 0.f;
    if (weights && t < t1) {
      const float q = __fdividef(x, mean);
      weights[r * weight_stride + t] = q > 0.f ? q * rsqrtf(q) : 0.f;
    }
    const float sum = warp_sum(x);
    // keys every window query sees (t < L - W + 1): the group's sum / W
    const float seen = t0 + 32 * g + 31 < length - window + 1
                           ? __fdividef(sum, float(window))
                           : warp_sum(t < t1 ? __fdividef(x, float(min(window, length - t))) : 0.f);
    if (lane == 0) group_sums[g] = make_float2(sum, seen);
  }
  __syncthreads();
  const int groups = block / 32, blk0 = t0 / block;
  for (int i = threadIdx.x; i < chunk / block && (blk0 + i + 1) * block <= length; i += kStatsThreads) {
    float sum = 0.f, seen = 0.f;
    for (int j = 0; j < groups; ++j) {
      sum += group_sums[i * groups + j].x;
      seen += group_sums[i * groups + j].y;
    }
    block_mass[r * (length / block) + blk0 + i] = sum;
    if (seen_mass) seen_mass[r * seen_stride + blk0 + i] = seen;
  }
}

inline int launch_mass_stats(const float* mass, int rows, int length, int window, int block, float* block_mass,
                             float* seen_mass, long long seen_stride, float* weights, long long weight_stride,
                             void* stream) {
  // (block_mass may be null when the row holds no whole block: nothing is written there)
  if (rows < 1 || rows > 65535 || length < 1 || window < 1 || block < 32 || block % 32 || block > kStatsTokens ||
      (block_mass == nullptr && length >= block))
    return cudaErrorInvalidValue;
  const int chunk = kStatsTokens / block * block;
  mass_stats_kernel<<<dim3((length + chunk - 1) / chunk, rows), kStatsThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      mass, length, window, block, chunk, block_mass, seen_mass, seen_stride, weights, weight_stride);
  return cudaGetLastError();
}

// K's channel weights E|q_c| (selection.channel_weights): per (sequence, KV head) the mean |q| of each channel over
// the window's G x W queries of its group, [B * Hkv, D] float32. A CTA a row; 1024 / D thread groups take every so
// many queries (loads unrolled: a few rows a thread in flight), then add up in order (the same bits every call).
constexpr int kChannelThreads = 1024;

__global__ void __launch_bounds__(kChannelThreads)
channel_weights_kernel(const Element* __restrict__ q, long long qb, long long qh, long long qw, int heads, int group,
                       int window, float* __restrict__ out) {
  __shared__ float partial[kChannelThreads];
  constexpr int kGroups = kChannelThreads / kHeadDim;
  const long long bh = blockIdx.x;
  const int b = int(bh / heads), h = int(bh % heads);
  const int c = threadIdx.x % kHeadDim, grp = threadIdx.x / kHeadDim, rows = group * window;
  float sum = 0.f;
  if (grp < kGroups)  // (1024 threads need not be a multiple of D)
    for (int g = 0; g < group; ++g) {
      const Element* head = q + b * qb + (h * group + g) * qh + c;
#pragma unroll 4
      for (int w = grp; w < window; w += kGroups) sum += fabsf(float(head[w * qw]));
    }
  partial[threadIdx.x] = sum;
  __syncthreads();
  if (threadIdx.x < kHeadDim) {
    float total = 0.f;
#pragma unroll
    for (int g = 0; g < kGroups; ++g) total += partial[g * kHeadDim + threadIdx.x];
    out[bh * kHeadDim + threadIdx.x] = __fdividef(total, float(rows));
  }
}

inline int launch_channel_weights(const void* q, long long qb, long long qh, long long qw, int batch, int heads,
                                  int group, int window, float* out, void* stream) {
  if (batch < 1 || heads < 1 || group < 1 || window < 1 || (long long)batch * heads > 0x7fffffffLL)
    return cudaErrorInvalidValue;
  channel_weights_kernel<<<batch * heads, kChannelThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      static_cast<const Element*>(q), qb, qh, qw, heads, group, window, out);
  return cudaGetLastError();
}

// Host launcher: mass [B, Hkv, L] float32 of q_obs [B, Hkv * group, window, D] over k [B, Hkv, L, D] (strides in
// elements); `workspace` holds the passes' states (mass_workspace_bytes). With lse_in (the queries' natural
// log-sum-exp [B, Hkv * group, window], strides in elements) the first pass is skipped and no workspace is needed.
inline long long mass_workspace_bytes(int batch, int heads, int group, int window, int length) {
  const long long rows = (long long)group * window, ranges = (length + kMassKeys - 1) / kMassKeys;
  return (long long)batch * heads * rows * (ranges * 8 + 4);
}

inline int launch_token_mass(const void* q, long long qb, long long qh, long long qw, const void* k, long long kb,
                             long long kh, long long kt, int batch, int heads, int group, int window, int length,
                             float scale, const float* lse_in, long long lb, long long lh, long long lw,
                             void* workspace, long long workspace_bytes, float* mass, void* stream) {
  if (batch < 1 || heads < 1 || group < 1 || window < 1 || window > length || batch * heads > 65535 ||
      (lse_in == nullptr && mass_workspace_bytes(batch, heads, group, window, length) > workspace_bytes))
    return cudaErrorInvalidValue;
  const int ranges = (length + kMassKeys - 1) / kMassKeys;
  MassArgs a{static_cast<const Element*>(q), qb, qh, qw, static_cast<const Element*>(k), kb, kh, kt, heads, group,
             window, length, ranges, scale * kLog2e, nullptr, nullptr, lse_in, lb, lh, lw, mass};
  if (lse_in == nullptr) {
    a.partial = static_cast<float2*>(workspace);
    a.lse = reinterpret_cast<float*>(a.partial + (long long)batch * heads * ranges * group * window);
  }
  cudaError_t err = opt_in_smem<mass_pass_kernel<false>>(kMassSmem);
  if (err == cudaSuccess) err = opt_in_smem<mass_pass_kernel<true>>(kMassSmem);
  if (err != cudaSuccess) return err;
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  const dim3 grid(ranges, batch * heads);
  if (lse_in == nullptr) {
    mass_pass_kernel<false><<<grid, kMassWarps * 32, kMassSmem, s>>>(a);
    mass_lse_kernel<<<dim3((group * window + 3) / 4, batch * heads), 128, 0, s>>>(a);
  }
  mass_pass_kernel<true><<<grid, kMassWarps * 32, kMassSmem, s>>>(a);
  return cudaGetLastError();
}
