"""A wheel built from the repository, installed into a fresh folder outside it, renders and compiles a
small spec from a folder of its own: templates and specs ship as package data (nvcc, no GPU)."""

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.nvcc
REPO = Path(__file__).resolve().parent.parent
# one shape, one arch, one dtype, decode only: three warp-level translation units (runtime, compress, decode)
MINI = ("name: mini\narchs: [sm_80]\ndtypes: [float16]\nphases: [decode]\n"
        "shapes: [{head_dim: 64, num_qo_heads: 2, num_kv_heads: 1}]\n")


def _run(*cmd, cwd, env=None):
    r = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True)
    assert r.returncode == 0, f"{' '.join(map(str, cmd))}\n{r.stdout}\n{r.stderr}"
    return r.stdout


def test_installed_wheel_builds_a_spec_from_any_folder(tmp_path):
    # build from a copy of the project's files: setuptools' scratch build/ in the checkout could hold
    # stale templates, and the copy leaves the checkout untouched
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    for name in ("hierasparse_gen", "templates", "specs"):
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    _run(*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", tmp_path / "dist", src, cwd=tmp_path)
    wheel, = (tmp_path / "dist").glob("hierasparse_gen-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for t in (REPO / "templates").rglob("*"):
        if t.is_file():
            assert f"hierasparse_gen/templates/{t.relative_to(REPO / 'templates').as_posix()}" in names
    assert "hierasparse_gen/specs/llama3.yaml" in names
    for py in (REPO / "hierasparse_gen").rglob("*.py"):  # every module, subpackages (ops/, ...) included
        assert py.relative_to(REPO).as_posix() in names

    site = tmp_path / "site"
    _run(*pip, "install", "--no-deps", "--no-index", "--target", site, wheel, cwd=tmp_path)
    work = tmp_path / "work"
    work.mkdir()
    (work / "mini.yaml").write_text(MINI)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "HIERASPARSE_TEMPLATES")}
    env["PYTHONPATH"] = str(site)  # the installed copy only: the checkout is not on the path
    where = _run(sys.executable, "-c", "import hierasparse_gen.render as r, hierasparse_gen.spec as s; "
                 "print(r.__file__); print(r.templates_dir()); print(s.shipped_specs()['llama3'])", cwd=work, env=env)
    for line in where.split():
        assert Path(line).is_relative_to(site), where

    out = _run(sys.executable, "-m", "hierasparse_gen.cli", "build", "mini.yaml", cwd=work, env=env)
    assert "3 compiled, 0 up to date" in out
    build = work / "generated" / "mini"
    manifest = json.loads((build / "manifest.json").read_text())
    assert (build / manifest["library"]).is_file()
    assert {v["name"] for v in manifest["variants"]} == {"runtime", "compress_d64_f16_sm80",
                                                          "decode_d64_g2_f16_k24_v24_sm80"}
