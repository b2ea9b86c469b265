// A consumer warpgroup: statements of prefill_kernel's body (kernel_body.cuh), run by the two consumer WGs of the
// CTA for query block pair qb of head h, sequence b (warp, lane: of the CTA). Uses the kernel's sm, prm, qb, h, b,
// warp, lane and, for the block tables' chunk, num_q (queries of the chunk) and off (position of its row 0).
// Each WG (64 queries) reads every stage of the ring up to its last slab. Per slab: the scores (S^T = K Q^T with
// 2:4 K or the tables' dense K rows, S = Q K^T with balanced's dense K and Q in registers), the lazy softmax into
// P (softmax.cuh), P.V (O^T += V^T P^T); then the epilogue. All-2:4 and balanced issue the scores of slab j + 1
// and P.V of slab j - 1 before the softmax of slab j; the block tables pick the dense or 2:4 form of each wgmma
// per slab and issue only P.V ahead.
  asm volatile("setmaxnreg.inc.sync.aligned.u32 240;\n");
  // The WG index through a shuffle from lane 0: the compiler then knows it is warp-uniform and keeps the
  // descriptor and stage arithmetic derived from it on the uniform datapath (R2UR moves 108 -> 45 all-2:4,
  // 137 -> 7 balanced; ~18 % fewer instructions; all-2:4 at 32K +4-5 % on the H200).
  const int wg = __shfl_sync(0xffffffffu, warp / 4, 0), w = warp % 4, g = lane >> 2, qq = lane & 3;
  const int tid = threadIdx.x % 128;
  const int bar = 1 + wg;
  // The WG's first query (block tables: row of the chunk, and its position p0); its last slab, where its last
  // query sits (the diagonal slab of a whole prompt).
  const int q0 = kTable ? kCtaQ * qb + kN * wg : 64 * (2 * qb + wg), p0 = off + q0;
  const int last = kTable ? (p0 + kN - 1) / 64 : 2 * qb + wg;
  const int rows = kTail ? min(kN, max(0, num_q - q0)) : kN;  // of this WG's queries, inside the chunk / prompt
  load_q(sm.q[wg], prm.q + b * prm.q_sb + h * prm.q_sh + (long long)q0 * prm.q_st, prm.q_st, rows, tid);
  async_proxy_fence();
  named_barrier(bar, 128);
  uint32_t qf[kD / 16][4];
  if constexpr (kDenseK) {
    // Q is the A operand of S = Q K^T, held in registers for the whole loop (wgmma reads B, the K rows, from
    // shared memory; with Q there too both operands would be read from it for every slab): per 16-channel step
    // the m16n8k16 A fragment of the warp's 16 query rows, by ldmatrix.x4 from the swizzled tile.
#pragma unroll
    for (int ks = 0; ks < kD / 16; ++ks) {
      const int row = 16 * w + (lane & 7) + 8 * ((lane >> 3) & 1), col = 16 * ks + 8 * (lane >> 4);
      asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                   : "=r"(qf[ks][0]), "=r"(qf[ks][1]), "=r"(qf[ks][2]), "=r"(qf[ks][3])
                   : "r"(smem_addr(sm.q[wg][col / 64] + sw128(row, col % 64))));
    }
  }

  float m[kSlots], l[kSlots], o[2][32], sa[32], sb[32];  // sb: the pipelined loop only
#pragma unroll
  for (int c = 0; c < kSlots; ++c) m[c] = -INFINITY, l[c] = 0.f;
#pragma unroll
  for (int i = 0; i < 32; ++i) o[0][i] = o[1][i] = 0.f;
  uint4 va[2][2];
  uint32_t ve[2][2];

  // The scores of a slab into s from a stage (issued, not committed): S^T = K Q^T, with dense K S = Q K^T
  auto issue_qk = [&](float (&s)[32], const unsigned char* stage) {
    if constexpr (kDenseK) {
      const uint32_t k_rows = smem_addr(stage + kKRows);
      // 16 channels a step: 32 bytes along the swizzled 128-byte rows
      auto b_desc = [&](int ks) { return desc_k16(k_rows, ks); };
      mma_dense<true>(s, qf[0], b_desc(0));
#pragma unroll
      for (int ks = 1; ks < kD / 16; ++ks) mma_dense<false>(s, qf[ks], b_desc(ks));
    } else {
      uint4 ka[kKSteps];
#pragma unroll
      for (int ks = 0; ks < kKSteps; ++ks)
        ka[ks] = *reinterpret_cast<const uint4*>(stage + kKVals + ((w * kKSteps + ks) * 32 + lane) * 16);
      const uint4 ke = *reinterpret_cast<const uint4*>(stage + kKMeta + (w * 16 + g * 2 + (qq & 1)) * 16);
      const uint32_t kev[4] = {ke.x, ke.y, ke.z, ke.w};
      auto b_desc = [&](int ks) { return desc_sw128(smem_addr(sm.q[wg][ks / 2]) + (ks % 2) * 64); };
      mma_sp<true>(s, ka[0], b_desc(0), kev[0]);
#pragma unroll
      for (int ks = 1; ks < kKSteps; ++ks) mma_sp<false>(s, ka[ks], b_desc(ks), kev[ks]);
    }
  };

  if constexpr (kTable) {
    // Slab j: its scores (the dense or 2:4 form, by the stage's tier) in their own commit group, then P.V of slab
    // j - 1 (kPrev), which runs on the tensor cores during the softmax of slab j; the scores of slab j + 1 wait
    // for the next step: the pipelined step below with two forms of the scores' wgmma leaves ptxas no registers,
    // and it serializes every wgmma (C7512).
    int tp = 0;  // tier of slab j - 1
    auto step = [&](int j, auto prev) {
      constexpr bool kPrev = decltype(prev)::value;
      const int st = j % kStages;
      const unsigned char* stage = sm.stage[st];
      const unsigned char* pstage = sm.stage[(j + kStages - 1) % kStages];
      mbar_wait(&sm.full[st], (j / kStages) & 1);
      const int tier = __shfl_sync(0xffffffffu, sm.tier[st], 0);  // warp-uniform for the compiler
      if (kPrev && !(tp & 2)) load_v(pstage, w, lane, va, ve);
      fence_acc(sa);
      fence_o(o);
      mma_fence();
      if (tier & 1) {  // dense K rows as A by descriptor (K-major), 16 channels a step
        const uint32_t k_rows = smem_addr(stage + kKRows), q_rows = smem_addr(sm.q[wg]);
        mma_dense_ss<true, 0>(sa, desc_k16(k_rows, 0), desc_k16(q_rows, 0));
#pragma unroll
        for (int ks = 1; ks < kD / 16; ++ks) mma_dense_ss<false, 0>(sa, desc_k16(k_rows, ks), desc_k16(q_rows, ks));
      } else {
        issue_qk(sa, stage);
      }
      mma_commit();
      if constexpr (kPrev) {
        if (tp & 2)
          issue_pv_dense(o, pstage, sm.p[wg][(j - 1) & 1]);
        else
          issue_pv(o, va, ve, sm.p[wg][(j - 1) & 1]);
        mma_commit();
        mma_wait<1>();  // the scores (the older group); P.V may still run
      } else {
        mma_wait<0>();
      }
      fence_acc(sa);
      const int delta = p0 - 64 * j;  // the slab's first key after the WG's first query; masked below 63
      const bool diag = delta < kN - 1;
      uint32_t pk[16];
      float ls[kSlots];
      const float pmax = exponentiate(sa, m, prm.scale_log2, diag, w, g, qq, pk, ls, delta);
      if (pmax > kLazyP) sm.flag[wg][j & 1] = j + 1;
      unsigned char* p_tile = sm.p[wg][j & 1];
      store_p(p_tile, pk, w, lane);
      async_proxy_fence();
      named_barrier(bar, 128);
      if constexpr (kPrev) {
        mma_wait<0>();
        fence_o(o);
        __syncwarp();
        if (lane == 0) mbar_arrive(&sm.empty[(j - 1) % kStages]);
      }
      if (*reinterpret_cast<volatile int*>(&sm.flag[wg][j & 1]) == j + 1) {
        exact_path(sa, m, l, o, prm.scale_log2, diag, w, g, qq, lane, sm.red[wg], p_tile, bar, delta);
      } else {
#pragma unroll
        for (int c = 0; c < kSlots; ++c) l[c] += ls[c];
      }
      tp = tier;
    };
    step(0, std::false_type{});
    for (int j = 1; j <= last; ++j) step(j, std::true_type{});
    // P.V of the diagonal slab
    const unsigned char* lstage = sm.stage[last % kStages];
    if (!(tp & 2)) load_v(lstage, w, lane, va, ve);
    fence_o(o);
    mma_fence();
    if (tp & 2)
      issue_pv_dense(o, lstage, sm.p[wg][last & 1]);
    else
      issue_pv(o, va, ve, sm.p[wg][last & 1]);
    mma_commit();
    mma_wait<0>();
    fence_o(o);
    __syncwarp();
    if (lane == 0) mbar_arrive(&sm.empty[last % kStages]);
  } else {
    // One slab j, its scores complete in s: issue the scores of slab j + 1 into sn (kNext: j < last) and
    // O^T += V_{j-1}^T P_{j-1}^T (kPrev: j > 0), then the softmax of s into P_j while both run on the tensor
    // cores. s is dead once exponentiated (two live score tiles would not fit in 240 registers with the 2:4 K
    // fragments in flight): the exact path, when any thread of the WG overflowed, computes it again from the
    // stage, which is still held.
    auto step = [&](int j, float (&s)[32], float (&sn)[32], auto prev, auto next) {
      constexpr bool kPrev = decltype(prev)::value, kNext = decltype(next)::value;
      if constexpr (kNext) mbar_wait(&sm.full[(j + 1) % kStages], ((j + 1) / kStages) & 1);
      fence_o(o);
      mma_fence();
      if constexpr (kNext) issue_qk(sn, sm.stage[(j + 1) % kStages]);
      if constexpr (kPrev) issue_pv(o, va, ve, sm.p[wg][(j - 1) & 1]);
      mma_commit();

      uint32_t pk[16];
      float ls[kSlots];
      const float pmax = exponentiate(s, m, prm.scale_log2, !kNext, w, g, qq, pk, ls);  // the diagonal is last
      if (pmax > kLazyP) sm.flag[wg][j & 1] = j + 1;
      unsigned char* p_tile = sm.p[wg][j & 1];
      store_p(p_tile, pk, w, lane);
      async_proxy_fence();
      named_barrier(bar, 128);
      const bool slow = *reinterpret_cast<volatile int*>(&sm.flag[wg][j & 1]) == j + 1;

      mma_wait<0>();
      fence_acc(sn);
      fence_o(o);
      if (kPrev) {
        __syncwarp();
        if (lane == 0) mbar_arrive(&sm.empty[(j - 1) % kStages]);
      }
      load_v(sm.stage[j % kStages], w, lane, va, ve);

      if (!slow) {
#pragma unroll
        for (int c = 0; c < kSlots; ++c) l[c] += ls[c];
        return;
      }
      mma_fence();
      issue_qk(s, sm.stage[j % kStages]);
      mma_commit();
      mma_wait<0>();
      fence_acc(s);
      exact_path(s, m, l, o, prm.scale_log2, !kNext, w, g, qq, lane, sm.red[wg], p_tile, bar);
    };

    // slab 0's scores, then the slabs two at a time so that the two score tiles swap roles without copies
    const std::true_type yes;
    const std::false_type no;
    mbar_wait(&sm.full[0], 0);
    mma_fence();
    issue_qk(sa, sm.stage[0]);
    mma_commit();
    mma_wait<0>();
    fence_acc(sa);
    if (last == 0) {
      step(0, sa, sb, no, no);
    } else {
      step(0, sa, sb, no, yes);
      int j = 1;
      for (; j + 1 < last; j += 2) {
        step(j, sb, sa, yes, yes);
        step(j + 1, sa, sb, yes, yes);
      }
      if (j + 1 == last) {
        step(j, sb, sa, yes, yes);
        step(j + 1, sa, sb, yes, no);
      } else {
        step(j, sb, sa, yes, no);
      }
    }
    fence_o(o);
    mma_fence();
    issue_pv(o, va, ve, sm.p[wg][last & 1]);
    mma_commit();
    mma_wait<0>();
    fence_o(o);
    __syncwarp();
    if (lane == 0) mbar_arrive(&sm.empty[last % kStages]);
  }
  if (wg == 0) {
    mbar_wait(&sm.full[(last + 1) % kStages], ((last + 1) / kStages) & 1);  // slab past the diagonal:
    __syncwarp();                                                          // release it unread
    if (lane == 0) mbar_arrive(&sm.empty[(last + 1) % kStages]);
  }

  const long long row0 = (long long)sm.head_row * prm.num_queries + q0;  // out, lse: contiguous
  const int pad_to = kTable && kTail ? min(kN, prm.num_queries - q0) : 0;  // the tables' chunks: padding rows
  epilogue(o, l, m, w, g, qq, sm.red[wg], sm.p[wg], bar, prm.out + row0 * kD, prm.lse + row0, rows, pad_to);
