import os
import shutil
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent


def pytest_addoption(parser):
    parser.addoption("--experiments", action="store_true", default=False,
                     help="also run the tests of experiments/ (marker `experiments`; skipped by default)")


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped without one)")
    config.addinivalue_line("markers", "nvcc: compiles CUDA with nvcc (skipped without nvcc)")
    config.addinivalue_line("markers", "experiments: builds or checks experiments/ (skipped unless --experiments)")


def pytest_collection_modifyitems(config, items):
    has_gpu = torch.cuda.is_available()
    has_nvcc = shutil.which("nvcc") is not None or bool(os.environ.get("CUDA_HOME"))
    run_experiments = config.getoption("--experiments")
    for item in items:
        # experiments are not the product: the default suite (README's command, CI) does not build them
        if item.get_closest_marker("experiments") and not run_experiments:
            item.add_marker(pytest.mark.skip(reason="experiment (run with --experiments)"))
        if "gpu" in item.keywords and not has_gpu:
            item.add_marker(pytest.mark.skip(reason="no CUDA device"))
        if "nvcc" in item.keywords and not has_nvcc:
            item.add_marker(pytest.mark.skip(reason="nvcc not found"))


def _build_or_reuse(spec: str, env_var: str, tmp_path_factory) -> Path:
    """A build of `spec`: $env_var when set (a prebuilt folder), else a fresh build."""
    prebuilt = os.environ.get(env_var)
    if prebuilt:
        return Path(prebuilt)
    from hierasparse_gen.compiler import build
    out = tmp_path_factory.mktemp(Path(spec).stem)
    build(REPO / spec, out_dir=out, log=None)
    return out


@pytest.fixture(scope="session")
def llama3_build(tmp_path_factory) -> Path:
    """specs/llama3.yaml built once per session (or $HIERASPARSE_LLAMA3_BUILD)."""
    return _build_or_reuse("specs/llama3.yaml", "HIERASPARSE_LLAMA3_BUILD", tmp_path_factory)


@pytest.fixture(scope="session")
def matrix_build(tmp_path_factory) -> Path:
    """tests/specs/gpu_matrix.yaml (many head_dims and groups), or $HIERASPARSE_MATRIX_BUILD."""
    return _build_or_reuse("tests/specs/gpu_matrix.yaml", "HIERASPARSE_MATRIX_BUILD", tmp_path_factory)


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory):
    """The loaded specs/smollm2.yaml library (or $HIERASPARSE_SMOLLM2_BUILD): the real-activation tests."""
    import hierasparse_gen
    return hierasparse_gen.load(_build_or_reuse("specs/smollm2.yaml", "HIERASPARSE_SMOLLM2_BUILD", tmp_path_factory))


@pytest.fixture(scope="session")
def llama3(llama3_build):
    """The loaded llama3 library (GPU tests)."""
    import hierasparse_gen
    return hierasparse_gen.load(llama3_build)


@pytest.fixture(scope="session")
def matrix(matrix_build):
    """The loaded gpu-matrix library (GPU tests)."""
    import hierasparse_gen
    return hierasparse_gen.load(matrix_build)


@pytest.fixture
def poison():
    """Outputs of the ops start as NaN / 0x7FFF, so unwritten elements fail the checks."""
    from hierasparse_gen.ops import base
    base.POISON = True
    yield
    base.POISON = False


@pytest.fixture(scope="session")
def fp8(tmp_path_factory):
    """The loaded tests/specs/gpu_fp8.yaml library (the e4m3 decode tiers), or $HIERASPARSE_FP8_BUILD."""
    import hierasparse_gen
    return hierasparse_gen.load(_build_or_reuse("tests/specs/gpu_fp8.yaml", "HIERASPARSE_FP8_BUILD", tmp_path_factory))


@pytest.fixture(scope="session")
def llama3_fp8(tmp_path_factory):
    """The loaded specs/llama3_fp8.yaml library (the e4m3 tiers with prefill), or $HIERASPARSE_LLAMA3_FP8_BUILD."""
    import hierasparse_gen
    return hierasparse_gen.load(_build_or_reuse("specs/llama3_fp8.yaml", "HIERASPARSE_LLAMA3_FP8_BUILD",
                                                tmp_path_factory))
