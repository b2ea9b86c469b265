// The block table of a cache prefill from score.cuh's losses. Included inside the variant's namespace.

// Block selection for one cache prefill, per (batch, head) CTA: of the n_elig eligible blocks
// (first, first + n_elig), the n_sparse of least prune loss (ties: lower block) become 2:4,
// slots -1, -2, ... in block order; the other eligible blocks take dense slots 0, 1, ...; the
// sink blocks [0, min(first, blocks)) and the window [first + n_elig, blocks) follow, at dense
// slots n_elig - n_sparse + 0, 1, ... Writes table[bh][0, blocks).
__global__ void __launch_bounds__(1024)
select_kernel(const float* __restrict__ loss, int loss_blocks, int first, int n_elig, int n_sparse, int blocks,
              int* __restrict__ table, int max_blocks) {
  extern __shared__ float s_loss[];              // [n_elig] losses (+ slack, see the launcher)
  __shared__ int warp_sums[32];
  const long long bh = blockIdx.x;
  const float* l = loss + bh * loss_blocks + first;
  int* row = table + bh * max_blocks;
  for (int i = threadIdx.x; i < n_elig; i += blockDim.x) s_loss[i] = n_sparse ? l[i] : 0.f;  // no loss needed
  __syncthreads();
  int carry = 0;  // 2:4 blocks before this 1024-block tile
  for (int base = 0; base < n_elig; base += blockDim.x) {
    const int i = base + threadIdx.x;
    int sparse = 0;
    if (i < n_elig && n_sparse) {
      const float li = s_loss[i];
      int rank = 0;  // blocks of smaller loss (ties: lower index)
      for (int j = 0; j < n_elig; ++j) rank += s_loss[j] < li || (s_loss[j] == li && j < i);
      sparse = rank < n_sparse;
    }
    // exclusive prefix count of 2:4 flags across the CTA: warp ballots, then warp totals
    const unsigned ballot = __ballot_sync(0xffffffffu, sparse);
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    if (lane == 0) warp_sums[warp] = __popc(ballot);
    __syncthreads();
    int before = carry + __popc(ballot & ((1u << lane) - 1));
    for (int w = 0; w < warp; ++w) before += warp_sums[w];
    if (i < n_elig) row[first + i] = sparse ? -(before + 1) : i - before;
    int tile_total = 0;
    for (int w = 0; w < blockDim.x / 32; ++w) tile_total += warp_sums[w];
    __syncthreads();
    carry += tile_total;
  }
  const int sink = min(first, blocks), n_dense_elig = n_elig - n_sparse;
  for (int u = threadIdx.x; u < blocks - n_elig; u += blockDim.x)
    row[u < sink ? u : first + n_elig + (u - sink)] = n_dense_elig + u;
}
