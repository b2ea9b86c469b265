// sm_90a building blocks of the wgmma prefill kernel: shared-memory descriptors and swizzle, wgmma fences and
// groups, named barriers, mbarriers, TMA tile loads and bulk copies, and the m64n64 wgmma forms it issues.
// Plain C++ included by prefill_sm90.cu.j2 inside the variant's namespace; needs HSG_WGMMA_TYPE ("f16" or
// "bf16", the wgmma operand type) defined before it.

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// A 64-row operand tile of 128-byte rows (64 halves): one 64-channel half of Q or of a block's dense rows, or a
// [query][key] P tile. 8-row swizzle atoms of 1024 B.
constexpr int kHalfBytes = 64 * 128;

// Descriptor of a K-major operand in 128B-swizzled shared memory: rows of 64 halves (128 B),
// 8-row atoms of 1024 B stacked along N (stride byte offset 1024; leading offset unused).
__device__ __forceinline__ uint64_t desc_sw128(uint32_t addr) {
  return uint64_t((addr & 0x3FFFF) >> 4) | (uint64_t(1) << 16) | (uint64_t(1024 >> 4) << 32) |
         (uint64_t(1) << 62);
}

// Byte offset of half (row, col < 64) in such a region (1024-byte aligned): 16-byte chunks XOR row % 8.
__device__ __forceinline__ uint32_t sw128(int row, int col) {
  return row * 128 + (((col >> 3) ^ (row & 7)) << 4) + (col & 7) * 2;
}

// Descriptor of 16-channel step ks of a [row][channel] operand held as 64-channel swizzled halves kHalfBytes
// apart (dense K rows, Q): 32 bytes a step along the 128-byte rows.
__device__ __forceinline__ uint64_t desc_k16(uint32_t halves, int ks) {
  return desc_sw128(halves + (ks / 4) * kHalfBytes + (ks % 4) * 32);
}

__device__ __forceinline__ void mma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void mma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void mma_wait() { asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory"); }

// Pins the accumulators in place around a wgmma window (the compiler must not move their reads
// or writes across the fence/commit/wait, which only clobber memory), as CUTLASS's
// warpgroup_fence_operand does.
__device__ __forceinline__ void fence_acc(float (&d)[32]) {
#pragma unroll
  for (int i = 0; i < 32; ++i) asm volatile("" : "+f"(d[i])::"memory");
}
__device__ __forceinline__ void async_proxy_fence() {  // generic-proxy smem stores -> wgmma reads
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}

// Named barrier of `count` threads (id 0 is __syncthreads).
__device__ __forceinline__ void named_barrier(int id, int count) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(count) : "memory");
}

// mbarriers and 1-D bulk copies (cp.async.bulk, completion counted in bytes on an mbarrier).
__device__ __forceinline__ void mbar_init(uint64_t* bar, int count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_addr(bar)), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_expect_tx(uint64_t* bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(smem_addr(bar)), "r"(bytes)
               : "memory");
}
__device__ __forceinline__ void mbar_arrive(uint64_t* bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(smem_addr(bar)) : "memory");
}
__device__ __forceinline__ void mbar_wait(uint64_t* bar, uint32_t parity) {
  asm volatile(
      "{\n.reg .pred done;\nwait_%=:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra wait_%=;\n}\n" ::"r"(smem_addr(bar)),
      "r"(parity)
      : "memory");
}
// A 64 x 64 tile of the dense K rows (box of the tensor map) at channel c0, token t0 of (KV head, batch).
__device__ __forceinline__ void tma_load_k(void* dst, const CUtensorMap* map, int c0, int t0, int kvh, int b,
                                           uint64_t* bar) {
  asm volatile(
      "cp.async.bulk.tensor.4d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4, %5}], "
      "[%6];\n" ::"r"(smem_addr(dst)),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(t0), "r"(kvh), "r"(b), "r"(smem_addr(bar))
      : "memory");
}
__device__ __forceinline__ void bulk_copy(void* dst, const void* src, uint32_t bytes, uint64_t* bar) {
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n" ::"r"(
          smem_addr(dst)),
      "l"(src), "r"(bytes), "r"(smem_addr(bar))
      : "memory");
}

// The 32 accumulator operands of a m64n64 wgmma (constraint c: "+f" accumulates, "=f" overwrites: with
// scale-d 0 the old values are not read, so they need not stay live until the issue).
#define HSG_ACC32(c)                                                                                            \
  c(d[0]), c(d[1]), c(d[2]), c(d[3]), c(d[4]), c(d[5]), c(d[6]), c(d[7]), c(d[8]), c(d[9]), c(d[10]), c(d[11]), \
      c(d[12]), c(d[13]), c(d[14]), c(d[15]), c(d[16]), c(d[17]), c(d[18]), c(d[19]), c(d[20]), c(d[21]),       \
      c(d[22]), c(d[23]), c(d[24]), c(d[25]), c(d[26]), c(d[27]), c(d[28]), c(d[29]), c(d[30]), c(d[31])
#define HSG_ACC32_REGS                                                                                 \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, " \
  "%22, %23, %24, %25, %26, %27, %28, %29, %30, %31}"
// d (64 x 64, f32) (+)= A (64 x 32 dense-equivalent, 2:4, registers) * B (32 x 64, shared memory).
// Accumulator register i of thread (warp w, g = lane / 4, q = lane % 4): row 16w + g + 8 ((i >> 1) & 1),
// column 8 (i >> 2) + 2q + (i & 1). kZero: d = A * B.
template <bool kZero>
__device__ __forceinline__ void mma_sp(float (&d)[32], const uint4& a, uint64_t b, uint32_t meta) {
  if constexpr (kZero)
    asm volatile("wgmma.mma_async.sp.sync.aligned.m64n64k32.f32." HSG_WGMMA_TYPE "." HSG_WGMMA_TYPE " " HSG_ACC32_REGS
                 ", {%32, %33, %34, %35}, %36, %37, 0, 0, 1, 1, 0;\n"
                 : HSG_ACC32("=f")
                 : "r"(a.x), "r"(a.y), "r"(a.z), "r"(a.w), "l"(b), "r"(meta));
  else
    asm volatile("wgmma.mma_async.sp.sync.aligned.m64n64k32.f32." HSG_WGMMA_TYPE "." HSG_WGMMA_TYPE " " HSG_ACC32_REGS
                 ", {%32, %33, %34, %35}, %36, %37, 0, 1, 1, 1, 0;\n"
                 : HSG_ACC32("+f")
                 : "r"(a.x), "r"(a.y), "r"(a.z), "r"(a.w), "l"(b), "r"(meta));
}
// d (64 x 64, f32) (+)= A (64 x 16, dense, registers: the m16n8k16 A fragment of each warp's 16 rows) *
// B (16 x 64, shared memory, K-major).
template <bool kZero>
__device__ __forceinline__ void mma_dense(float (&d)[32], const uint32_t (&a)[4], uint64_t b) {
  if constexpr (kZero)
    asm volatile("wgmma.mma_async.sync.aligned.m64n64k16.f32." HSG_WGMMA_TYPE "." HSG_WGMMA_TYPE " " HSG_ACC32_REGS
                 ", {%32, %33, %34, %35}, %36, 0, 1, 1, 0;\n"
                 : HSG_ACC32("=f")
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b));
  else
    asm volatile("wgmma.mma_async.sync.aligned.m64n64k16.f32." HSG_WGMMA_TYPE "." HSG_WGMMA_TYPE " " HSG_ACC32_REGS
                 ", {%32, %33, %34, %35}, %36, 1, 1, 1, 0;\n"
                 : HSG_ACC32("+f")
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b));
}
// d (64 x 64, f32) (+)= A (64 x 16, dense, shared memory by descriptor; kTransA 1: MN-major) * B (16 x 64, shared
// memory, K-major): the block-table kernel's dense blocks (experiments/mma_probes/wgmma_tiers_probe.cu).
template <bool kZero, int kTransA>
__device__ __forceinline__ void mma_dense_ss(float (&d)[32], uint64_t a, uint64_t b) {
  if constexpr (kZero)
    asm volatile("wgmma.mma_async.sync.aligned.m64n64k16.f32." HSG_WGMMA_TYPE "." HSG_WGMMA_TYPE " " HSG_ACC32_REGS
                 ", %32, %33, 0, 1, 1, %34, 0;\n"
                 : HSG_ACC32("=f")
                 : "l"(a), "l"(b), "n"(kTransA));
  else
    asm volatile("wgmma.mma_async.sync.aligned.m64n64k16.f32." HSG_WGMMA_TYPE "." HSG_WGMMA_TYPE " " HSG_ACC32_REGS
                 ", %32, %33, 1, 1, 1, %34, 0;\n"
                 : HSG_ACC32("+f")
                 : "l"(a), "l"(b), "n"(kTransA));
}
