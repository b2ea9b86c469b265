// Decode-step append into the hierarchical cache and the re-tiering of the block leaving the window
// (HieraCache.append). Included inside the variant's namespace after pack.cuh (Dest, compress_k_unit,
// compress_v_unit).

// Graph-capturable: every decision is made on the device from the cache's own state, so a
// captured step replays correctly. Per sequence b, ctrl[b] holds (column):
constexpr int kCtrlElig = 0;      // blocks that have left the window past the sink
constexpr int kCtrlNsp = 1;       // + 2 * tensor: 2:4 blocks held
constexpr int kCtrlTop = 2;       // + 2 * tensor: free dense slots (stack height)
constexpr int kCtrlStatus = 5;    // 0 ok, 1 an append found the cache full (nothing written), 2 no free slot
constexpr int kCtrlStack = 6;     // free dense slot stacks: K's n_dense entries, then V's

struct Pools {                    // one tensor (K or V) of the cache
  int* table;                     // [B, H, max_blocks]: e >= 0 dense slot, e < 0 2:4 slot -e-1
  Element* dense;                 // [B, H, n_dense, block, D]
  uint4* vals;                    // [B, H, n_sparse, block * D / 2]
  uint32_t* meta;
  int n_dense, n_sparse;
  double ratio;                   // 2:4 blocks per eligible block
  Pools8 f8;                      // e4m3 storage (HSG_FP8 builds): every block leaving the window moves to its
                                  // e4m3 pools, 2:4 by the ratio, else dense; dense8 null: the model dtype
};

struct AppendArgs {
  const Element* x[2];            // the new rows [B, H, D] of K and V (channel stride 1)
  long long sb[2], sh[2];
  int* seqlens;                   // [B] tokens held before the step
  int* ctrl;                      // [B, ctrl_width]
  int ctrl_width, heads, max_blocks, block, sink_blocks, window_blocks, max_len;
  Pools t[2];
  const float* k_weight;          // K's per-channel weights [B*H, D] of the 2:4 choice, or null: magnitudes
  const float* v_weight;          // V's per-token weights [B*H, max_blocks * block] (ones: magnitudes), or null
  // per block score of re-tiering [B*H, max_blocks], or null: when a block leaves the window and one more 2:4
  // block is due, the least-mass dense eligible block of the head becomes 2:4 (the leaving one on ties)
  const float* block_mass;
};

// Warp-then-CTA argmin of (mass, rank) pairs, lexicographic; returns the winning rank to every thread.
__device__ __forceinline__ int argmin_rank(float m, int r) {
  __shared__ float s_m[32];
  __shared__ int s_r[32];
  for (int off = 16; off; off >>= 1) {
    const float om = __shfl_xor_sync(0xffffffffu, m, off);
    const int orr = __shfl_xor_sync(0xffffffffu, r, off);
    if (om < m || (om == m && orr < r)) m = om, r = orr;
  }
  const int warp = threadIdx.x / 32, warps = blockDim.x / 32;
  if (threadIdx.x % 32 == 0) s_m[warp] = m, s_r[warp] = r;
  __syncthreads();
  m = s_m[0], r = s_r[0];
  for (int w = 1; w < warps; ++w)
    if (s_m[w] < m || (s_m[w] == m && s_r[w] < r)) m = s_m[w], r = s_r[w];
  __syncthreads();
  return r;
}

// Same rounding as cache.ratio_count: round half up, never more than all.
__device__ __forceinline__ int ratio_count(double ratio, int eligible) {
  return min(eligible, int(floor(ratio * eligible + 0.5)));
}

// What one step does to sequence b's tensor z, decided from the state before it.
struct StepPlan {
  bool skip;         // full, or an earlier failure: nothing happens
  int blk, row;      // where the new row goes
  int out;           // the block leaving the window, or -1
  bool flush;        // ... and it becomes 2:4
  bool moves;        // ... and leaves its dense slot (2:4, or an e4m3 tensor's dense e4m3 block)
};

__device__ __forceinline__ StepPlan plan_step(const AppendArgs& a, int b, int z) {
  const int* c = a.ctrl + (long long)b * a.ctrl_width;
  const int pos = a.seqlens[b];
  StepPlan p{c[kCtrlStatus] != 0 || pos >= a.max_len, pos / a.block, pos % a.block, -1, false, false};
  if (!p.skip && (pos + 1) % a.block == 0) {
    const int out = (pos + 1) / a.block - a.window_blocks - 1;
    if (out >= a.sink_blocks) {
      p.out = out;
      const int nsp = c[kCtrlNsp + 2 * z];
      p.flush = nsp < ratio_count(a.t[z].ratio, c[kCtrlElig] + 1) && nsp < a.t[z].n_sparse;
      // an e4m3 tensor's dense eligible blocks: slot (eligible - 2:4) of its dense e4m3 pool
      p.moves = p.flush || (a.t[z].f8.dense8 && c[kCtrlElig] - nsp < a.t[z].f8.n_dense8);
    }
  }
  return p;
}

// Grid (H, B, 2: K and V). Writes the row into the newest dense block (taking a free slot
// when a block starts); when a block leaves the window and the ratio asks for it, compresses
// it into the next 2:4 slot, repoints the table and returns its dense slot to the stack.
__global__ void __launch_bounds__(128) append_kernel(const AppendArgs a) {
  const int h = blockIdx.x, b = blockIdx.y, z = blockIdx.z;
  const StepPlan p = plan_step(a, b, z);
  if (p.skip) return;
  const Pools& t = a.t[z];
  int* c = a.ctrl + (long long)b * a.ctrl_width;
  int* stack = c + kCtrlStack + (z ? a.t[0].n_dense : 0);
  const int top = c[kCtrlTop + 2 * z];
  const long long bh = (long long)b * a.heads + h;
  int* row = t.table + bh * a.max_blocks;
  if (p.row == 0 && top == 0) return;  // no free slot: the commit flags it
  const int slot = p.row == 0 ? stack[top - 1] : row[p.blk];
  const uint4* src = reinterpret_cast<const uint4*>(a.x[z] + b * a.sb[z] + h * a.sh[z]);
  uint4* dst = reinterpret_cast<uint4*>(t.dense + ((bh * t.n_dense + slot) * a.block + p.row) * kHeadDim);
  for (int i = threadIdx.x; i < kHeadDim / 8; i += blockDim.x) dst[i] = src[i];
  if (!p.moves) {
    if (p.row == 0 && threadIdx.x == 0) row[p.blk] = slot;
    return;
  }
  // a block starting and one leaving the window never share a step (block >= 32)
  const int out_slot = p.out == p.blk ? slot : row[p.out];
  const int nsp = c[kCtrlNsp + 2 * z];
  __syncthreads();  // the row just written may be in the block (window 0)
  const int warp = threadIdx.x / 32, warps = blockDim.x / 32;
#if HSG_FP8
  if (t.f8.dense8) {  // e4m3: the leaving block itself moves (no re-tiering: a dense e4m3 block lost its values)
    const Element* rows = t.dense + (bh * t.n_dense + out_slot) * (long long)a.block * kHeadDim;
    const int slot8 = p.flush ? nsp : c[kCtrlElig] - nsp;
    const float* w = z == 0 ? (a.k_weight ? a.k_weight + bh * kHeadDim : nullptr)
                            : (a.v_weight ? a.v_weight + bh * (long long)a.max_blocks * a.block + p.out * (long long)a.block
                                          : nullptr);
    for (int u = warp; u < a.block / (z == 0 ? 16 : 32); u += warps) {
      if (z == 0) pack8_block_unit<true>(rows, kHeadDim, a.block, u, p.flush, bh, slot8, a.block,
                                         reinterpret_cast<char*>(t.vals), t.meta, t.n_sparse, t.f8, w);
      else pack8_block_unit<false>(rows, kHeadDim, a.block, u, p.flush, bh, slot8, a.block,
                                   reinterpret_cast<char*>(t.vals), t.meta, t.n_sparse, t.f8, w);
      __syncwarp();  // the warp's staging tile is reused by its next unit
    }
    if (threadIdx.x == 0) {
      row[p.out] = p.flush ? -(nsp + 1) : kDense8 + slot8;
      if (h == 0) stack[top] = out_slot;  // the commit raises the stack height
    }
    return;
  }
#endif
  // which block becomes 2:4: the leaving one, or (re-tiering) the head's least-mass dense eligible block
  int pick = p.out;
  if (a.block_mass) {
    const float* mass = a.block_mass + bh * a.max_blocks;
    float m = mass[p.out];
    int r = -1;  // rank: the leaving block first, then block order
    for (int blk = a.sink_blocks + threadIdx.x; blk < p.out; blk += blockDim.x)
      if (row[blk] >= 0 && (mass[blk] < m || (mass[blk] == m && blk < r && r >= 0))) m = mass[blk], r = blk;
    r = argmin_rank(m, r < 0 ? -1 : r);
    if (r >= 0) pick = r;
  }
  const int pick_slot = pick == p.out ? out_slot : row[pick];
  const Element* base = t.dense + (bh * t.n_dense + pick_slot) * (long long)a.block * kHeadDim;
  const Dest d{t.vals, t.meta, nullptr, 0, 0, 0, 0, nullptr};
  if (z == 0) {
    const float* w = a.k_weight ? a.k_weight + bh * kHeadDim : nullptr;  // the prefill's channel weights
    for (int u = warp; u < a.block / 16 * kKSteps; u += warps)
      compress_k_unit(base, kHeadDim, a.block, u / kKSteps, u % kKSteps,
                      (bh * t.n_sparse + nsp) * (a.block / 16) + u / kKSteps, d, w);
  } else {
    const float* w = a.v_weight ? a.v_weight + bh * (long long)a.max_blocks * a.block + pick * (long long)a.block
                                : nullptr;
    for (int u = warp; u < a.block / 32 * kMTiles; u += warps) {
      compress_v_unit(base, kHeadDim, a.block, u / kMTiles, u % kMTiles,
                      (bh * t.n_sparse + nsp) * (a.block / 32) + u / kMTiles, d,
                      w ? w + (u / kMTiles) * 32 : nullptr);
      __syncwarp();  // the warp's staging tile is reused by its next unit
    }
  }
  if (pick != p.out) {  // the leaving block's rows move into the slot the re-tiered block frees
    __syncthreads();
    const uint4* from = reinterpret_cast<const uint4*>(t.dense + (bh * t.n_dense + out_slot) * (long long)a.block * kHeadDim);
    uint4* to = reinterpret_cast<uint4*>(t.dense + (bh * t.n_dense + pick_slot) * (long long)a.block * kHeadDim);
    for (int i = threadIdx.x; i < a.block * kHeadDim / 8; i += blockDim.x) to[i] = from[i];
  }
  if (threadIdx.x == 0) {
    row[pick] = -(nsp + 1);
    if (pick != p.out) row[p.out] = pick_slot;
    if (h == 0) stack[top] = out_slot;  // the commit raises the stack height
  }
}

// One thread per sequence, after append_kernel: advance the counters it planned from.
__global__ void __launch_bounds__(128) commit_kernel(const AppendArgs a, int batch) {
  const int b = blockIdx.x * blockDim.x + threadIdx.x;
  if (b >= batch) return;
  int* c = a.ctrl + (long long)b * a.ctrl_width;
  if (c[kCtrlStatus]) return;
  if (a.seqlens[b] >= a.max_len) { c[kCtrlStatus] = 1; return; }
  const StepPlan p[2] = {plan_step(a, b, 0), plan_step(a, b, 1)};
  for (int z = 0; z < 2; ++z)
    if (p[z].row == 0 && c[kCtrlTop + 2 * z] == 0) { c[kCtrlStatus] = 2; return; }
  for (int z = 0; z < 2; ++z) {
    c[kCtrlTop + 2 * z] += (p[z].moves ? 1 : 0) - (p[z].row == 0 ? 1 : 0);
    c[kCtrlNsp + 2 * z] += p[z].flush ? 1 : 0;
  }
  if (p[0].out >= 0) c[kCtrlElig] += 1;
  a.seqlens[b] += 1;
}
