"""Tensor-parallel generation on the CPU: a tiny Llama loaded with transformers' tensor-parallel plan
under torchrun (2 ranks, gloo), sparse-KV enabled with the simulation backend, gives the tokens and
logits of one process with the same settings; each rank's cache holds its slice of the KV heads, with
the block choices the whole model makes for those heads. And the per-rank head check, in one process."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from hf_models import tiny_model, transformers
import tp_worker
from hierasparse_gen import hf
from hierasparse_gen.errors import UnsupportedError
from hierasparse_gen.tensor_parallel import RankHeads, rank_heads

REPO = Path(__file__).resolve().parent.parent


def _tp_missing() -> str | None:
    if not dist.is_available() or not dist.is_gloo_available():
        return "torch.distributed with the gloo backend is not available in this torch build"
    try:
        from transformers.distributed import DistributedConfig  # noqa: F401
    except ImportError:
        return "this transformers has no transformers.distributed.DistributedConfig (tensor-parallel plans)"
    return None


@pytest.fixture(scope="module")
def torchrun(tmp_path_factory):
    """Saves the models and the prompt, runs tp_worker on 2 ranks; returns (folder, rank results)."""
    if reason := _tp_missing():
        pytest.skip(reason)
    folder = tmp_path_factory.mktemp("tp")
    tiny_model(heads=8, kv_heads=4, head_dim=64, seed=1).save_pretrained(folder / "kv4")
    tiny_model(heads=8, kv_heads=1, head_dim=64, seed=2).save_pretrained(folder / "kv1")
    prompt = torch.randint(0, 256, (2, 300), generator=torch.Generator().manual_seed(3))
    torch.save(prompt, folder / "prompt.pt")
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(REPO / "tests" / "tp_worker.py"), str(folder)]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, f"torchrun failed:\n{run.stdout[-3000:]}\n{run.stderr[-6000:]}"
    return folder, [torch.load(folder / f"rank{r}.pt") for r in range(2)]


_SINGLE = {}


def _one_thread(fn, *args, **kwargs):
    """``fn`` on one CPU thread, as each torchrun rank runs (OMP_NUM_THREADS=1): on a shared 2-core
    machine a second thread mostly waits, and made these runs several times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return fn(*args, **kwargs)
    finally:
        torch.set_num_threads(threads)


def _single(folder, case: str) -> dict:
    """One process, the same model and settings (computed once per case)."""
    if case not in _SINGLE:
        model_dir, _, mode, chunk = tp_worker.CASES[case]
        ids, mask = tp_worker.prompt_and_mask(folder)
        _SINGLE[case] = _one_thread(tp_worker.generate, tp_worker.load(folder / model_dir), ids, mask, mode, chunk,
                                    policy=tp_worker.POLICY.get(case))
    return _SINGLE[case]


@pytest.mark.parametrize("case", list(tp_worker.CASES))
def test_two_ranks_generate_what_one_process_does(torchrun, case):
    folder, ranks = torchrun
    model_dir = tp_worker.CASES[case][0]
    one = _single(folder, case)
    kv = 4 if model_dir == "kv4" else 1
    assert one["heads"] == [kv, kv] and one["rank"] == (8, kv, 1)
    assert one["tokens"].shape == (2, tp_worker.NEW_TOKENS)
    assert one["lengths"][0] == [300 + tp_worker.NEW_TOKENS - 1, 300 - tp_worker.PAD + tp_worker.NEW_TOKENS - 1]
    n_sparse = int(one["tiers"]["k"][0][0].sum())
    assert n_sparse == kv * 4  # (9 whole blocks - sink 1 - window 2) * 0.5 = 3 at prefill, +1 as decode flushes
    for r, got in enumerate(ranks):
        res = got[case]
        assert torch.equal(res["tokens"], one["tokens"]), f"rank {r}: greedy tokens differ"
        assert (res["logits"] - one["logits"]).abs().max() < 1e-4, f"rank {r}: logits differ"
        local = kv // 2 if kv > 1 else 1  # 4 KV heads split 2 + 2; 1 head is replicated
        heads = slice(r * local, (r + 1) * local) if kv > 1 else slice(0, 1)
        assert res["rank"] == (4, local, 2)
        assert res["heads"] == [local, local], f"rank {r}: the cache holds {res['heads']} KV heads"
        assert res["lengths"] == one["lengths"]
        for n in "kv":  # per-head block choices: the whole model's, for this rank's heads
            for layer in range(2):
                assert torch.equal(res["tiers"][n][layer], one["tiers"][n][layer][:, heads]), (r, n, layer)
        assert (res["keys"][0] - one["keys"][0][:, heads]).abs().max() < 1e-4


def test_a_plan_that_splits_the_kv_head_is_refused_on_every_rank(torchrun):
    _, ranks = torchrun
    for got in ranks:
        assert got["refused"] is not None and got["refused"].startswith(
            "tensor parallelism over 2 ranks leaves this rank 256 query and 32 key features: part of a head of 64")
        assert "Fix: run with a tp_size that divides both head counts (KV heads 1: [1])" in got["refused"]


def test_the_sparse_path_acts_in_those_settings(torchrun):
    folder, _ = torchrun
    ids, mask = tp_worker.prompt_and_mask(folder)
    sparse = _single(folder, "whole")
    dense = _one_thread(tp_worker.generate, tp_worker.load(folder / "kv4"), ids, mask, "attend_then_compress",
                        None, sparse=False)
    assert (sparse["logits"][:, 0] - dense["logits"][:, 0]).abs().max() < 1e-4  # the prompt attends dense
    assert (sparse["logits"][:, 1:] - dense["logits"][:, 1:]).abs().max() > 1e-3  # decode reads 2:4 blocks


@pytest.mark.gpu
def test_two_gpus_generate_what_one_does_with_the_kernels(llama3_build, tmp_path):
    """NCCL on 2 GPUs, the kernels backend and CUDA-graph decode, against one GPU with the same kernels."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 CUDA devices")
    tiny_model(heads=8, kv_heads=2, head_dim=128, seed=4).save_pretrained(tmp_path / "kv2_d128")
    prompt = torch.randint(0, 256, (2, tp_worker.GPU_PROMPT), generator=torch.Generator().manual_seed(3))
    torch.save(prompt, tmp_path / "prompt.pt")
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(REPO / "tests" / "tp_worker.py"), str(tmp_path), str(llama3_build)]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, f"torchrun failed:\n{run.stdout[-3000:]}\n{run.stderr[-6000:]}"
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    import hierasparse_gen
    lib = hierasparse_gen.load(llama3_build)
    ids, mask = tp_worker.prompt_and_mask(tmp_path)
    for case, (model_dir, _, mode, chunk) in tp_worker.GPU_CASES.items():
        one = tp_worker.generate(tp_worker.load(tmp_path / model_dir, gpu=True), ids, mask, mode, chunk, lib=lib)
        assert one["heads"] == [2, 2] and int(one["tiers"]["k"][0][0].sum()) == 2 * 3
        for r, got in enumerate(ranks):
            res = got[case]
            assert res["rank"] == (4, 1, 2) and res["heads"] == [1, 1], (case, r)
            # fp16 with the sums of two ranks in another order: equal tokens, logits within fp16 rounding
            assert torch.equal(res["tokens"], one["tokens"]), (case, r)
            assert (res["logits"] - one["logits"]).abs().max() < 2e-2, (case, r)
            for n in "kv":
                assert torch.equal(res["tiers"][n][0], one["tiers"][n][0][:, r:r + 1]), (case, r, n)


# --- the per-rank head check, in one process: a rank's shard mimicked by narrower projections ---------

def _shard(model, q_rows: int, kv_rows: int, tp: int):
    """``model`` with every attention layer's projections cut to their first ``q_rows``/``kv_rows`` output
    features, as a rank of a tensor-parallel run holds them (plain tensors here; the check reads a
    sharded DTensor through to_local())."""
    for layer in model.model.layers:
        attn = layer.self_attn
        for name, rows in (("q_proj", q_rows), ("k_proj", kv_rows), ("v_proj", kv_rows)):
            old = getattr(attn, name)
            new = torch.nn.Linear(old.in_features, rows, bias=False)
            new.weight.data = old.weight.data[:rows].clone()
            setattr(attn, name, new)
    model._tp_size = tp
    return model


def test_rank_heads_reads_the_local_projections():
    model = tiny_model(heads=8, kv_heads=4, head_dim=64)
    assert rank_heads(model, 8, 4, 64) == RankHeads(8, 4, 64, 1)  # no tensor parallelism: the config's
    assert rank_heads(_shard(model, 4 * 64, 2 * 64, 2), 8, 4, 64) == RankHeads(4, 2, 64, 2)
    one = _shard(tiny_model(heads=8, kv_heads=1, head_dim=64), 4 * 64, 64, 2)  # a replicated KV head
    assert rank_heads(one, 8, 1, 64).group == 4


def test_rank_heads_refuses_a_split_head_and_a_wrong_pairing():
    half = _shard(tiny_model(heads=8, kv_heads=4, head_dim=64), 64, 32, 8)  # 4 KV heads over 8 ranks
    with pytest.raises(UnsupportedError, match=r"leaves this rank 64 query and 32 key features: part of a head "
                                               r"of 64 .*Fix: run with a tp_size that divides both head counts "
                                               r"\(KV heads 4: \[1, 2, 4\]\), or replicate"):
        hf.enable(half, backend="simulate", key_ratio=0.5, value_ratio=0.5, sink=64, window=64, block_size=64)
    odd = _shard(tiny_model(heads=8, kv_heads=4, head_dim=64), 4 * 64, 64, 2)  # group 4 where the model has 2
    with pytest.raises(UnsupportedError, match="computes 4 query and 1 KV heads, which do not pair"):
        rank_heads(odd, 8, 4, 64)


def test_the_library_is_checked_at_the_rank_group():
    class Variant:
        def __init__(self, kind, group):
            self.kind, self.head_dim, self.group, self.dtype = kind, 64, group, "float16"
            self.tier, self.block_size = ("mixed", "mixed"), 64

    class Lib:
        path = Path("libhierasparse_tp.so")
        manifest = {"spec": {"cache": {"block_size": 64, "sink": 64, "local_window": 256}}}
        variants = [Variant("decode", 8), Variant("prefill", 8)]

    # 8 query heads and 1 KV head: group 8 in one process, 4 a rank with the KV head replicated on 2 ranks
    hf.enable(tiny_model(heads=8, kv_heads=1, head_dim=64).half(), Lib(), key_ratio=0.5, value_ratio=0.5)
    rank = _shard(tiny_model(heads=8, kv_heads=1, head_dim=64), 4 * 64, 64, 2).half()
    with pytest.raises(ValueError, match=r"no decode kernel for this model \(head_dim 64, GQA group 4 of this "
                                         r"rank's 4 query and 1 KV heads, tensor-parallel over 2, float16"):
        hf.enable(rank, Lib(), key_ratio=0.5, value_ratio=0.5)


# --- specs for the per-rank shapes --------------------------------------------------------------

@pytest.mark.parametrize("spec, model, tps", [
    ("specs/llama3.yaml", (32, 8), (1, 2, 4, 8)),          # Llama-3.1-8B: 16/4, 8/2, 4/1 a rank: group 4
    ("specs/llama3_tp8.yaml", (64, 8), (2, 4, 8)),         # Llama-3.1-70B: group 8
    ("specs/llama3_tp8.yaml", (128, 8), (8, 16)),          # Llama-3.1-405B: 16/1 (group 16); over 16 ranks
])                                                         # 8 query heads on a replicated KV head (group 8)
def test_the_specs_cover_each_ranks_group(spec, model, tps):
    from hierasparse_gen.spec import load_spec
    from hierasparse_gen.variants import expand
    variants = expand(load_spec(REPO / spec))
    q, kv = model
    for tp in tps:
        d = 16  # rank_heads reads only the projections' rows: a narrow head keeps the model small
        local_kv = max(1, kv // tp)  # one KV head replicated when there are fewer than ranks
        shard = _shard(tiny_model(heads=q, kv_heads=kv, head_dim=d, layers=1), q // tp * d, local_kv * d, tp)
        group = rank_heads(shard, q, kv, d).group
        for kind in ("decode", "prefill"):
            assert any(v.kind == kind and v.head_dim == 128 and v.group == group and v.tier is not None and
                       (v.tier.k, v.tier.v) == ("mixed", "mixed") and v.block_size == 64 for v in variants), \
                (spec, tp, kind)


def test_the_group_8_and_16_spec_renders_every_variant():
    from hierasparse_gen.render import render
    from hierasparse_gen.spec import load_spec
    from hierasparse_gen.variants import expand
    spec = load_spec(REPO / "specs/llama3_tp8.yaml")
    variants = expand(spec)
    groups = {v.group for v in variants if v.kind in ("decode", "prefill")}
    assert groups == {8, 16}
    assert sum(v.kind == "prefill" and v.name.endswith("_wg_sm90a") for v in variants) == 12  # 2 groups x 3 x 2
    for v in variants:
        src = render(v, spec)
        if v.kind == "decode":
            assert f"constexpr int kGroup = {v.group};" in src


@pytest.mark.nvcc
def test_the_group_16_mixed_decode_compiles_without_spills(tmp_path):
    import re
    from hierasparse_gen.compiler import find_toolchain, nvcc_flags
    from hierasparse_gen.render import render
    from hierasparse_gen.spec import load_spec
    from hierasparse_gen.variants import expand
    spec = load_spec(REPO / "specs/llama3_tp8.yaml")
    v = next(v for v in expand(spec) if v.name == "decode_d128_g16_f16_km_vm_b64_sm90")
    src = tmp_path / f"{v.name}.cu"
    src.write_text(render(v, spec))
    tools = find_toolchain()
    proc = subprocess.run([tools.nvcc, *nvcc_flags(v.arch), *tools.includes, "-c", str(src), "-o",
                           str(tmp_path / "x.o")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", proc.stdout + proc.stderr)
    assert spills and all(s == ("0", "0") for s in spills)
