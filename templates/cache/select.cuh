// The block table of a cache prefill from score.cuh's losses. Included inside the variant's namespace.

// A score as an unsigned key in the scores' order: -0 ties +0, NaN after every number and NaNs tie (the order
// of torch.argsort, which the simulation uses).
__device__ __forceinline__ unsigned score_key(float x) {
  unsigned u = __float_as_uint(x);
  if (x != x) return 0xffffffffu;
  if ((u << 1) == 0u) u = 0u;
  return (u & 0x80000000u) ? ~u : u | 0x80000000u;
}

// Exclusive count of `flag` over the CTA's threads before this one; `total`: the CTA's. Every thread calls it.
__device__ __forceinline__ int cta_prefix_count(bool flag, int* warp_counts, int& total) {
  const unsigned ballot = __ballot_sync(0xffffffffu, flag);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) warp_counts[warp] = __popc(ballot);
  __syncthreads();
  int before = __popc(ballot & ((1u << lane) - 1));
  total = 0;
  for (int w = 0; w < int(blockDim.x / 32); ++w) {
    before += w < warp ? warp_counts[w] : 0;
    total += warp_counts[w];
  }
  __syncthreads();
  return before;
}

// The n-th least key (n >= 1) of s_key[0, count) and how many keys equal to it are among the n least (`take`): a
// radix select, 8 bits a pass from the top (4 passes of a shared-memory histogram over the keys that match the digits
// found so far, whose 256 bins one warp scans for the digit holding the take-th key; 3 barriers a pass, where a bit
// at a time took 32). Counts are integers: the same result whatever order the atomics land in.
__device__ __forceinline__ unsigned nth_key(const unsigned* s_key, int count, int n, int& take, int* scratch) {
  int* hist = scratch;          // [256]
  int* found = scratch + 256;   // the digit, and take within it
  unsigned cut = 0u, known = 0u;  // the digits found so far, and their bits
  take = n;
  for (int shift = 24; shift >= 0; shift -= 8) {
    for (int i = threadIdx.x; i < 256; i += blockDim.x) hist[i] = 0;
    __syncthreads();
    for (int i = threadIdx.x; i < count; i += blockDim.x) {
      const unsigned key = s_key[i];
      if ((key & known) == cut) atomicAdd(&hist[(key >> shift) & 255u], 1);
    }
    __syncthreads();
    if (threadIdx.x < 32) {  // lane l holds bins 8 l .. 8 l + 7; 1 <= take <= the bins' total
      const int lane = threadIdx.x;
      int c[8], sum = 0;
#pragma unroll
      for (int j = 0; j < 8; ++j) sum += c[j] = hist[8 * lane + j];
      int incl = sum;
#pragma unroll
      for (int o = 1; o < 32; o <<= 1) {
        const int up = __shfl_up_sync(0xffffffffu, incl, o);
        if (lane >= o) incl += up;
      }
      if (incl - sum < take && take <= incl) {
        int run = incl - sum;
#pragma unroll
        for (int j = 0; j < 8; ++j) {
          if (run < take && take <= run + c[j]) {
            found[0] = 8 * lane + j;
            found[1] = take - run;
          }
          run += c[j];
        }
      }
    }
    __syncthreads();
    cut |= unsigned(found[0]) << shift;
    take = found[1];
    known |= 255u << shift;
    // (the next pass writes found only after two more barriers: every thread has read it by then)
  }
  return cut;
}

// One table row: of the n_elig eligible blocks (first, first + n_elig), the n_sparse of least key (ties: lower
// block) become 2:4, slots -1, -2, ... in block order; the other eligible blocks take dense slots 0, 1, ...; the sink
// blocks [0, min(first, blocks)) and the window [first + n_elig, blocks) follow, at dense slots n_elig - n_sparse + 0,
// 1, ... Writes row[0, blocks).
__device__ __forceinline__ void write_row(const unsigned* s_key, int first, int n_elig, int n_sparse, int blocks,
                                          int* row, int* scratch) {
  int take = 0;
  const unsigned cut = n_sparse ? nth_key(s_key, n_elig, n_sparse, take, scratch) : 0u;
  int* warp_counts = scratch;  // (the histogram's: warp 0 read it before nth_key's last barrier)
  int carry = 0, equal_carry = 0;  // 2:4 blocks and keys equal to the cut before this tile of blockDim.x blocks
  for (int base = 0; base < n_elig; base += blockDim.x) {
    const int i = base + threadIdx.x;
    const unsigned key = i < n_elig && n_sparse ? s_key[i] : 0xffffffffu;
    const bool equal = i < n_elig && n_sparse && key == cut;
    int total;
    const int equal_before = equal_carry + cta_prefix_count(equal, warp_counts, total);
    equal_carry += total;
    const bool sparse = i < n_elig && n_sparse && (key < cut || (equal && equal_before < take));
    const int before = carry + cta_prefix_count(sparse, warp_counts, total);
    carry += total;
    if (i < n_elig) row[first + i] = sparse ? -(before + 1) : i - before;
  }
  const int sink = min(first, blocks), n_dense_elig = n_elig - n_sparse;
  for (int u = threadIdx.x; u < blocks - n_elig; u += blockDim.x)
    row[u < sink ? u : first + n_elig + (u - sink)] = n_dense_elig + u;
}

// Block selection for one cache prefill, per (batch, head) CTA (write_row), into `table` and, when given, into
// `table2` with n_sparse2 2:4 blocks by the same scores (K and V chosen by one attention mass).
constexpr int kSelectThreads = 256;  // (with 1024, 8 rows of 1014 blocks took 18 us on an H100: barriers of 32 warps)
// Shared memory kept beside the keys within the 48 KB a launch gets (the scratch below and what the compiler adds);
// hierasparse_gen/ops/cache_kernels.py's SELECT_MAX_ELIGIBLE counts the same.
constexpr int kSelectReservedSmem = 2048;

__global__ void __launch_bounds__(kSelectThreads)
select_kernel(const float* __restrict__ loss, int loss_blocks, int first, int n_elig, int n_sparse, int blocks,
              int* __restrict__ table, int max_blocks, int n_sparse2, int* __restrict__ table2) {
  extern __shared__ unsigned s_key[];            // [n_elig] keys of the losses
  __shared__ int scratch[258];  // nth_key's histogram and result, then cta_prefix_count's warp counts
  static_assert(sizeof(scratch) + 256 <= kSelectReservedSmem, "the launcher's shared-memory check counts it");
  const long long bh = blockIdx.x;
  const float* l = loss + bh * loss_blocks + first;
  if (n_sparse || (table2 && n_sparse2)) {  // (no loss is read when no block becomes 2:4)
    for (int i = threadIdx.x; i < n_elig; i += blockDim.x) s_key[i] = score_key(l[i]);
    __syncthreads();
  }
  write_row(s_key, first, n_elig, n_sparse, blocks, table + bh * max_blocks, scratch);
  if (table2) write_row(s_key, first, n_elig, n_sparse2, blocks, table2 + bh * max_blocks, scratch);
}
