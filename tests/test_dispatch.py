"""One dispatch for every kernel family, on the CPU: a registry Library over a written manifest and a
stand-in for the ctypes library; select's reasons for the sm_90a (wgmma) kernels, prefill's explicit
kernel choice and its errors, and the refusal of manifests from before the family/ABI fields."""

import ctypes
import json
from types import SimpleNamespace

import pytest
import torch

from hierasparse_gen import ops, registry
from hierasparse_gen.abi import SIGNATURES
from hierasparse_gen.errors import BuildNotFoundError, DispatchError, InputError
from hierasparse_gen.ops import base, checks
from hierasparse_gen.variants import COMPRESS_ABI

B, HQ, HKV, D, CAP = 2, 8, 2, 128, 128


class FakeFunction:
    def __init__(self, name):
        self.name, self.argtypes, self.restype = name, None, None

    def __call__(self, *args):  # the size queries of decode variants
        return 4096 if self.name.endswith("_smem_bytes") else 128


class FakeCDLL:
    def __getattr__(self, name):
        fn = FakeFunction(name)
        setattr(self, name, fn)
        return fn


def _variant(name, kind, arch, family, abi, tier=None, block_size=None, group=4, dtype="float16", head_dim=D):
    return {"name": name, "kind": kind, "arch": arch, "dtype": dtype, "head_dim": head_dim, "group": group,
            "tier": {"k": tier[0], "v": tier[1]} if tier else None, "tiles": {}, "block_size": block_size,
            "family": family, "abi": abi, "template": "whatever.cu.j2"}


VARIANTS = [
    _variant("runtime", "runtime", "sm_90", "host", "runtime", group=None, head_dim=0),
    _variant("compress_d128_f16_sm90", "compress", "sm_90", "mma_sp", COMPRESS_ABI, group=None),
    _variant("decode_d128_g4_f16_km_vm_b64_sm90", "decode", "sm_90", "mma_sp", "decode_table", ("mixed", "mixed"), 64),
    _variant("prefill_d128_g4_f16_k24_v24_sm80", "prefill", "sm_80", "mma_sp", "prefill", ("sparse24", "sparse24")),
    _variant("prefill_d128_g4_f16_k24_v24_sm90", "prefill", "sm_90", "mma_sp", "prefill", ("sparse24", "sparse24")),
    _variant("prefill_d128_g4_f16_kd_v24_sm90", "prefill", "sm_90", "mma_sp", "prefill", ("dense", "sparse24")),
    _variant("prefill_d128_g4_f16_km_vm_b64_sm90", "prefill", "sm_90", "mma_sp", "prefill", ("mixed", "mixed"), 64),
    _variant("prefill_d128_g4_f16_k24_v24_wg_sm90a", "prefill", "sm_90a", "wgmma", "prefill_wgmma",
             ("sparse24", "sparse24")),
    _variant("prefill_d128_g4_f16_kd_v24_wg_sm90a", "prefill", "sm_90a", "wgmma", "prefill_wgmma_balanced",
             ("dense", "sparse24")),
    _variant("prefill_d128_g4_f16_km_vm_b64_wg_sm90a", "prefill", "sm_90a", "wgmma", "prefill_wgmma_table",
             ("mixed", "mixed"), 64),
]


def _library(tmp_path, variants=VARIANTS, cc=(9, 0)):
    manifest = {"library": "libhierasparse_fake.so", "spec": {"name": "fake"}, "spec_source": "specs/fake.yaml",
                "variants": variants}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    return registry.Library(tmp_path / "manifest.json", cdll=FakeCDLL())


@pytest.fixture
def lib(tmp_path, monkeypatch):
    lib = _library(tmp_path)
    lib.calls = []
    lib.cc = (9, 0)
    monkeypatch.setattr(base, "device_cc", lambda device: lib.cc)
    monkeypatch.setattr(checks, "check_cuda", lambda t, what: None)  # CPU tensors stand in for GPU ones
    monkeypatch.setattr(base, "launch", lambda lib, symbol, device, *args: lib.calls.append(symbol))
    return lib


def test_the_registry_declares_signatures_by_the_manifests_abi(lib):
    fn = lib.function("hsg_prefill_d128_g4_f16_kd_v24_wg_sm90a")
    assert fn.argtypes == SIGNATURES[("prefill_wgmma_balanced", "")] and fn.restype is ctypes.c_int
    assert lib.function("hsg_compress_d128_f16_sm90_append").argtypes == SIGNATURES[(COMPRESS_ABI, "_append")]
    table = lib.function("hsg_decode_d128_g4_f16_km_vm_b64_sm90")
    assert table.argtypes == SIGNATURES[("decode_table", "")]
    decode = next(v for v in lib.variants if v.kind == "decode")
    assert (decode.smem_bytes, decode.threads, decode.family, decode.abi) == (4096, 128, "mma_sp", "decode_table")
    assert registry.lookup(lib.key) is lib


def test_select_chooses_every_family_with_its_reasons(lib):
    want = dict(head_dim=D, dtype="float16", group=4, tier=("sparse24", "sparse24"))
    assert lib.select("prefill", cc=(9, 0), family="wgmma", **want).name == "prefill_d128_g4_f16_k24_v24_wg_sm90a"
    assert lib.select("prefill", cc=(9, 0), family="mma_sp", **want).name == "prefill_d128_g4_f16_k24_v24_sm90"
    # both families fit: the warp-level one, which takes every call shape
    assert lib.select("prefill", cc=(9, 0), **want).name == "prefill_d128_g4_f16_k24_v24_sm90"
    assert lib.select("prefill", cc=(8, 9), **want).name == "prefill_d128_g4_f16_k24_v24_sm80"
    with pytest.raises(DispatchError) as e:
        lib.select("prefill", cc=(9, 1), family="wgmma", **want)
    msg = str(e.value)
    assert msg.startswith("no prefill kernel of the wgmma family in libhierasparse_fake.so fits this call")
    assert "prefill_d128_g4_f16_k24_v24_wg_sm90a: built for sm_90a, device is sm_91" in msg  # arch-specific: 9.0 only
    assert "prefill_d128_g4_f16_k24_v24_sm90: family mma_sp, not wgmma" in msg
    assert "prefill_d128_g4_f16_kd_v24_wg_sm90a: tiers k=dense, v=sparse24 != k=sparse24, v=sparse24" in msg
    assert "Fix: put" in msg and "sm_90a under `archs`" in msg and "specs/fake.yaml" in msg
    with pytest.raises(DispatchError, match="km_vm_b64_wg_sm90a: cache block size 64 != 128"):
        lib.select("prefill", cc=(9, 0), family="wgmma", head_dim=D, dtype="float16", group=4,
                   tier=("mixed", "mixed"), block_size=128)
    with pytest.raises(DispatchError, match="k24_v24_wg_sm90a: GQA group 4 != 8"):  # a refusal is remembered, too
        for _ in range(2):
            lib.select("prefill", cc=(9, 0), family="wgmma", **dict(want, group=8))
    assert lib.find("prefill", cc=(8, 9), family="wgmma", **want) is None


def test_manifests_without_family_and_abi_are_refused_with_the_fix(tmp_path):
    old = [{k: v for k, v in variant.items() if k not in ("family", "abi")} for variant in VARIANTS]
    with pytest.raises(BuildNotFoundError, match=r"variant 'runtime' has no kernel family or C ABI this version "
                                                 r"knows .*older hierasparse-gen. Fix: rebuild with "
                                                 r"`hierasparse-gen build specs/fake.yaml`"):
        _library(tmp_path, old)


def _packed():
    k = ops.PackedKV(torch.zeros(B, HKV, CAP, D // 2, dtype=torch.float16),
                     torch.zeros(B, HKV, CAP, D // 16, dtype=torch.int16), "k", CAP)
    v = ops.PackedKV(torch.zeros(B, HKV, CAP // 2, D, dtype=torch.float16),
                     torch.zeros(B, HKV, CAP // 16, D, dtype=torch.int16), "v", CAP)
    return k, v


def test_prefill_kernel_auto_forced_and_refused(lib):
    k, v = _packed()
    q = torch.randn(B, HQ, CAP, D, dtype=torch.float16)
    ops.prefill(lib, q, k, v)                                      # auto, a whole prompt on sm_90: wgmma
    ops.prefill(lib, q, k, v, kernel="wgmma")
    ops.prefill(lib, q, k, v, kernel="mma_sp")                     # forced warp-level
    ops.prefill(lib, q[:, :, 1:], k, v)                            # auto, a chunk: warp-level
    assert lib.calls == ["hsg_prefill_d128_g4_f16_k24_v24_wg_sm90a"] * 2 + ["hsg_prefill_d128_g4_f16_k24_v24_sm90"] * 2
    lib.calls.clear()
    # forced wgmma where it cannot run: every reason, nothing launched
    with pytest.raises(DispatchError) as e:
        ops.prefill(lib, q[:, :, 1:], k, v, torch.full((B,), CAP, dtype=torch.int32), kernel="wgmma")
    msg = str(e.value)
    assert msg.startswith("prefill with kernel='wgmma' cannot run:")
    assert "this call: seqlens given (the sm_90a kernels take whole prompts)" in msg
    assert f"this call: {CAP - 1} queries over {CAP} keys: a chunk, not a whole prompt" in msg
    assert msg.endswith("Fix: pass kernel='auto' (the sm_90a kernel where it can run, else the warp-level one) or "
                        "kernel='mma_sp'")
    lib.cc = (8, 9)  # no sm_90a kernel runs here: auto takes the warp-level one, forced wgmma says why
    ops.prefill(lib, q, k, v)
    with pytest.raises(DispatchError, match=r"(?s)cannot run:\nno prefill kernel of the wgmma family .*"
                                            r"k24_v24_wg_sm90a: built for sm_90a, device is sm_89"):
        ops.prefill(lib, q, k, v, kernel="wgmma")
    assert lib.calls == ["hsg_prefill_d128_g4_f16_k24_v24_sm80"]
    with pytest.raises(InputError, match=r"kernel: 'fast' is not a prefill kernel. Fix: pass one of 'auto', "
                                         r"'wgmma', 'mma_sp'"):
        ops.prefill(lib, q, k, v, kernel="fast")


def test_prefill_cache_kernel_choice(lib):
    """The block-table prefill: the sm_90a table kernel takes no V tail, a K tail only for a whole prompt, and
    64-token blocks; auto falls back to the warp-level kernel, a forced wgmma says why."""
    def tensor(n_dense, n_sparse, block):
        return SimpleNamespace(table=torch.zeros(B, HKV, 8, dtype=torch.int32),
                               dense=torch.zeros(B, HKV, n_dense, block, D, dtype=torch.float16),
                               sparse_vals=torch.zeros(B, HKV, n_sparse, block * D // 2, dtype=torch.float16),
                               sparse_meta=torch.zeros(B, HKV, n_sparse, block * D // 16, dtype=torch.int16))
    cache = SimpleNamespace(k=tensor(3, 2, 64), v=tensor(4, 1, 64), block=64, max_seq_len=500, head_dim=D)
    q = torch.randn(B, HQ, 10, D, dtype=torch.float16)
    lens = torch.tensor([50, 10], dtype=torch.int32), torch.tensor([10, 10], dtype=torch.int32)
    tail = dict(k_tail=torch.randn(B, HKV, 10, D, dtype=torch.float16), v_tail=None,
                tail_start=torch.zeros(B, dtype=torch.int32))
    ops.prefill_cache(lib, q, cache, *lens)
    ops.prefill_cache(lib, q, cache, *lens, **tail, whole=True)
    ops.prefill_cache(lib, q, cache, *lens, **tail)
    assert lib.calls == ["hsg_prefill_d128_g4_f16_km_vm_b64_wg_sm90a"] * 2 + ["hsg_prefill_d128_g4_f16_km_vm_b64_sm90"]
    with pytest.raises(DispatchError, match=r"this call: dense K rows of a chunk \(balanced, not a whole prompt"):
        ops.prefill_cache(lib, q, cache, *lens, **tail, kernel="wgmma")
    with pytest.raises(DispatchError, match=r"this call: dense V rows \(attend_then_compress\)"):
        ops.prefill_cache(lib, q, cache, *lens, **dict(tail, v_tail=tail["k_tail"]), kernel="wgmma")
    cache128 = SimpleNamespace(k=tensor(3, 2, 128), v=tensor(4, 1, 128), block=128, max_seq_len=500, head_dim=D)
    with pytest.raises(DispatchError, match="km_vm_b64_wg_sm90a: cache block size 64 != 128"):
        ops.prefill_cache(lib, q, cache128, *lens, kernel="wgmma")
    # auto with 128-token blocks: no wgmma kernel for them, and no warp-level one either in this build
    with pytest.raises(DispatchError, match="km_vm_b64_sm90: cache block size 64 != 128"):
        ops.prefill_cache(lib, q, cache128, *lens)


def test_a_forced_kernel_that_cannot_run_is_refused_before_the_cache_changes(lib, monkeypatch):
    from hierasparse_gen.cache import HieraCache
    monkeypatch.setattr(HieraCache, "_check_dense", lambda self, x, what, dims: None)  # CPU stands in for GPU
    cache = HieraCache(lib, batch=B, num_kv_heads=HKV, head_dim=D, max_seq_len=512, key_ratio=0.5, value_ratio=0.5,
                       dtype=torch.float16, device="cpu")
    k = v = torch.randn(B, HKV, 100, D, dtype=torch.float16)
    q = torch.randn(B, HQ, 100, D, dtype=torch.float16)
    with pytest.raises(DispatchError, match=r"this call: dense V rows \(attend_then_compress\)"):
        cache.prefill(k, v, q=q, mode="attend_then_compress", kernel="wgmma")
    with pytest.raises(DispatchError, match=r"this call: dense K rows of a chunk"):  # balanced, not a whole prompt
        cache.prefill(k, v, [100, 50], q=q, mode="balanced", kernel="wgmma")
    with pytest.raises(InputError, match="kernel: 'flash' is not a prefill kernel"):
        cache.prefill(k, v, q=q, kernel="flash")
    assert cache.lengths == [0, 0] and lib.calls == []  # nothing written, nothing launched


def test_load_returns_the_library_with_its_ops(tmp_path, monkeypatch):
    """hierasparse_gen.load's class: the registry Library plus compress_k/compress_v/prefill/decode."""
    from hierasparse_gen.library import KernelLibrary
    (tmp_path / "manifest.json").write_text(json.dumps({"library": "libhierasparse_fake.so", "spec": {"name": "f"},
                                                         "variants": VARIANTS}))
    lib = KernelLibrary(tmp_path / "manifest.json", cdll=FakeCDLL())
    assert isinstance(lib, registry.Library) and registry.lookup(lib.key) is lib
    assert all(callable(getattr(lib, m)) for m in ("compress_k", "compress_v", "prefill", "decode", "select"))
    assert repr(lib).startswith("KernelLibrary('f', 10 variants")
    calls = []
    monkeypatch.setattr(base, "device_cc", lambda device: (9, 0))
    monkeypatch.setattr(checks, "check_cuda", lambda t, what: None)
    monkeypatch.setattr(base, "launch", lambda lib, symbol, device, *args: calls.append(symbol))
    k, v = _packed()
    lib.prefill(torch.randn(B, HQ, CAP, D, dtype=torch.float16), k, v, kernel="mma_sp")
    assert calls == ["hsg_prefill_d128_g4_f16_k24_v24_sm90"]
    with pytest.raises(DispatchError, match=r"no library loaded under 'elsewhere'. Fix: load it"):
        registry.lookup("elsewhere")
