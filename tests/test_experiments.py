"""Tests of experiments/ (not the product): they run only with ``--experiments``
(``python -m pytest -q --experiments tests/test_experiments.py``). The compile tests keep the probes, the
N = 128 kernel and the CTA timeline building against the current templates; the layout tests check the N = 128
experiment's core-matrix conversion."""

import importlib.util
from pathlib import Path

import pytest
import torch

from hierasparse_gen import format as fmt
from test_build import _compile_sm90a, _kernels, _sass

pytestmark = pytest.mark.experiments
REPO = Path(__file__).resolve().parent.parent
EXPERIMENTS = REPO / "experiments"


def _experiment(relpath: str):
    """An experiment's script loaded as a module from its file (experiments/ is not a package)."""
    path = EXPERIMENTS / relpath
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --- the N = 128 experiment's core-matrix layout (experiments/n128_prefill/core_layout.py) ---------------

@pytest.mark.parametrize("D", [64, 128])
def test_k_core_matrices_places_every_value(D):
    """Kept value (token r, kept column c) at element ((r//8)*(D/16) + c//8)*64 + (r%8)*8 + c%8."""
    torch.manual_seed(3)
    k = torch.randn(2, 3, 70, D, dtype=torch.float16)
    vals, meta = fmt.pack_k(k)
    cap = vals.shape[2]
    logical, _ = fmt.compress_rows(fmt.prune_k(torch.cat((k, k.new_zeros(2, 3, cap - 70, D)), 2)))
    core = _experiment("n128_prefill/core_layout.py").k_core_matrices(vals, meta)
    assert core.shape == vals.shape and core.dtype == vals.dtype
    r = torch.arange(cap).view(-1, 1)
    c = torch.arange(D // 2).view(1, -1)
    pos = ((r // 8) * (D // 16) + c // 8) * 64 + (r % 8) * 8 + c % 8
    flat = core.reshape(2, 3, -1)
    assert torch.equal(flat[:, :, pos.flatten()].reshape(2, 3, cap, D // 2), logical)


@pytest.mark.parametrize("D", [64, 128])
def test_v_core_matrices_places_every_value(D):
    """Per 32-token chunk: kept value (channel ch, kept column c) at element chunk*16*D +
    ((ch//8)*2 + (c%16)//8)*64 + (ch%8)*8 + c%8."""
    torch.manual_seed(4)
    v = torch.randn(2, 2, 96, D, dtype=torch.bfloat16)
    vals, meta = fmt.pack_v(v)
    logical, _ = fmt.compress_rows(fmt.prune_v(v).transpose(-1, -2))  # [B, H, D, 48]
    core = _experiment("n128_prefill/core_layout.py").v_core_matrices(vals, meta)
    assert core.shape == vals.shape
    ch = torch.arange(D).view(-1, 1)
    c = torch.arange(48).view(1, -1)
    pos = (c // 16) * 16 * D + ((ch // 8) * 2 + (c % 16) // 8) * 64 + (ch % 8) * 8 + c % 8
    flat = core.reshape(2, 2, -1)
    assert torch.equal(flat[:, :, pos.flatten()].reshape(2, 2, D, 48), logical)


# --- builds (nvcc) --------------------------------------------------------------------------------------

@pytest.mark.nvcc
def test_n128_experiment_renders_and_compiles_to_descriptor_wgmma(tmp_path):
    """experiments/n128_prefill/wgmma_n128_prefill.cu.j2 (2:4 operands by descriptor, 128 queries a wgmma)
    keeps building against the templates it includes: m64n128 sparse HGMMA, no serialization message, no
    spills."""
    render = _experiment("n128_prefill/render.py")
    from hierasparse_gen.compiler import find_toolchain
    src = tmp_path / "n128.cu"
    src.write_text(render.render_experiment(spec_path=REPO / "specs" / "llama3.yaml"))
    log, sass = _compile_sm90a(src, tmp_path, "--expt-relaxed-constexpr", *find_toolchain().includes)
    assert "C7519" not in log, log  # no warpgroup.arrive injected either
    assert sass.count("HGMMA.SP.64x128x32.F32") == 48


@pytest.mark.nvcc
@pytest.mark.parametrize("balanced", [False, True])
def test_cta_timeline_instruments_the_current_kernel(tmp_path, llama3_build, balanced):
    """experiments/cta_timeline/cta_timeline.py finds its anchors in the rendered kernel (a template change
    that moves one fails here, not on the GPU) and the instrumented kernel builds as the library's does: same
    HGMMA count, no serialization message, no spills; one stamp-store site per point."""
    cta_timeline = _experiment("cta_timeline/cta_timeline.py")
    from hierasparse_gen.compiler import find_toolchain
    src, symbol = cta_timeline.render(balanced, REPO / "specs" / "llama3.yaml")
    assert ("_kd_" in symbol) == balanced
    assert src.count("hsg_times[hsg_cta()]") == 11 and "HSG_EXPORT int hsg_read_times" in src
    path = tmp_path / "timeline.cu"
    path.write_text(src)
    log, sass = _compile_sm90a(path, tmp_path, "--expt-relaxed-constexpr", *find_toolchain().includes)
    assert "SR_GLOBALTIMERLO" in sass and "SR_CLOCKLO" in sass  # the timer and clock reads are there
    library = _kernels(_sass(llama3_build / "libhierasparse_llama3.so"))
    base = "".join(t for k, t in library.items() if "prefill_kernel" in k and symbol[4:] in k)
    assert base and base.count("HGMMA") == sass.count("HGMMA")  # both instantiations, same MMA work


@pytest.mark.nvcc
@pytest.mark.parametrize("probe,instruction", [("wgmma_sp_probe.cu", "HGMMA.SP.64x64x32.F32"),
                                               ("wgmma_ceiling.cu", "HGMMA.SP.64x256x32.F32"),
                                               ("wgmma_datapath_probe.cu", "HGMMA.SP.64x64x32.F32"),
                                               ("wgmma_tiers_probe.cu", "HGMMA.SP.64x64x32.F32")])
def test_hopper_probes_compile_to_sparse_wgmma_without_serialization(tmp_path, probe, instruction):
    """The sm_90a groundwork (docs/hopper.md) keeps building: HGMMA.SP in the SASS, no trap, no
    ptxas "serialized" message (C751x: every wgmma of the function would wait to completion) and
    no register spills."""
    _, sass = _compile_sm90a(EXPERIMENTS / "mma_probes" / probe, tmp_path)
    assert instruction in sass
    if probe == "wgmma_tiers_probe.cu":  # the dense forms beside the sparse one, V^T read MN-major
        assert "HGMMA.64x64x16.F32" in sass and ".tnspA" in sass


@pytest.mark.nvcc
def test_stmatrix_probe_compiles_with_the_kernels_store_p(tmp_path):
    """experiments/mma_probes/stmatrix_wavefront_probe.cu times the kernel's own store_p (templates/sm90/softmax.cuh,
    included): it keeps building against that header, transposed and straight stmatrix both in the SASS."""
    _, sass = _compile_sm90a(EXPERIMENTS / "mma_probes" / "stmatrix_wavefront_probe.cu", tmp_path)
    assert "STSM.16.MT88.4" in sass and "STSM.16.M88.4" in sass
