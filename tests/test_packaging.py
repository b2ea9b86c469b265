"""Packaging on the CPU, nothing compiled: the templates and specs the package finds, the specs shipped
with it, and where `load(spec, rebuild=False)` looks for the build that `build` made."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

import hierasparse_gen
from hierasparse_gen.compiler import build_dir
from hierasparse_gen.errors import ToolchainError
from hierasparse_gen.render import templates_dir
from hierasparse_gen.spec import SpecError, find_spec_file, load_spec, shipped_specs

REPO = Path(__file__).resolve().parent.parent
MINI = "name: mini\narchs: [sm_80]\nshapes: [{head_dim: 64, num_qo_heads: 2, num_kv_heads: 1}]\n"


def test_templates_and_specs_come_from_the_source_tree_when_not_installed(monkeypatch):
    monkeypatch.delenv("HIERASPARSE_TEMPLATES", raising=False)
    assert (templates_dir() / "decode.cu.j2").is_file()
    assert shipped_specs()["llama3"].read_text() == (REPO / "specs" / "llama3.yaml").read_text()


def test_templates_override_must_hold_templates(tmp_path, monkeypatch):
    monkeypatch.setenv("HIERASPARSE_TEMPLATES", str(tmp_path))
    with pytest.raises(ToolchainError, match=r"kernel templates not found .*Fix: "):
        templates_dir()


@pytest.mark.parametrize("given", ["specs/llama3.yaml", "llama3.yaml", "llama3"])
def test_a_missing_spec_path_names_a_shipped_spec(tmp_path, monkeypatch, given):
    monkeypatch.chdir(tmp_path)
    said = []
    assert find_spec_file(given, log=said.append) == shipped_specs()["llama3"]
    assert len(said) == 1 and "shipped with hierasparse-gen" in said[0]


def test_an_existing_spec_file_wins_over_the_shipped_one(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "specs").mkdir()
    (tmp_path / "specs" / "llama3.yaml").write_text(MINI)
    said = []
    assert find_spec_file("specs/llama3.yaml", log=said.append) == Path("specs/llama3.yaml")
    assert said == []


@pytest.mark.parametrize("given", ["specs/nope.yaml", "elsewhere/llama3.yaml"])
def test_an_unknown_spec_lists_the_shipped_ones(tmp_path, monkeypatch, given):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SpecError) as info:
        find_spec_file(given)
    msg = str(info.value)
    assert msg.startswith(f"{given}: spec file not found") and "Fix: " in msg and "shipped: llama3" in msg


def test_build_and_load_agree_on_the_build_folder(tmp_path, monkeypatch):
    """load(spec, rebuild=False) looks in generated/<name>/, where `build` puts it (it used to look in
    generated/). A fake manifest without its library: the error names the library it looked for."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mini.yaml").write_text(MINI)
    assert build_dir(load_spec("mini.yaml")) == build_dir("mini") == Path("generated") / "mini"
    out = tmp_path / "generated" / "mini"
    out.mkdir(parents=True)
    (out / "manifest.json").write_text(json.dumps({"library": "libhierasparse_mini.so", "variants": []}))
    with pytest.raises(FileNotFoundError) as info:
        hierasparse_gen.load("mini.yaml", rebuild=False)
    assert str(out / "libhierasparse_mini.so") in str(info.value)
    # a shipped spec from a folder without specs/: its build folder is generated/llama3
    with pytest.raises(FileNotFoundError, match=r"no manifest\.json at generated/llama3/manifest\.json"):
        hierasparse_gen.load("specs/llama3.yaml", rebuild=False)


def test_cli_list_without_a_folder_shows_the_shipped_specs(tmp_path):
    r = subprocess.run([sys.executable, "-m", "hierasparse_gen.cli", "list"], capture_output=True, text=True,
                       cwd=tmp_path, env={"PYTHONPATH": str(REPO), "PATH": ""})
    assert r.returncode == 0, r.stderr
    assert "llama3" in r.stdout and "hierasparse-gen build specs/<name>.yaml" in r.stdout


def test_cli_unknown_spec_fails_without_traceback(tmp_path):
    r = subprocess.run([sys.executable, "-m", "hierasparse_gen.cli", "build", "specs/nope.yaml"],
                       capture_output=True, text=True, cwd=tmp_path, env={"PYTHONPATH": str(REPO), "PATH": ""})
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "spec file not found" in r.stderr and "shipped: llama3" in r.stderr
    assert not (tmp_path / "generated").exists()


@pytest.mark.parametrize("manifest", [{}, {"library": "libx.so"}, {"library": "libx.so", "variants": [{"name": "x"}]},
                                      []])
def test_a_foreign_manifest_is_refused_with_a_fix(tmp_path, manifest):
    from hierasparse_gen.errors import BuildNotFoundError
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BuildNotFoundError, match="not a build manifest.*Fix: rebuild"):
        hierasparse_gen.load(tmp_path)
    r = subprocess.run([sys.executable, "-m", "hierasparse_gen.cli", "list", str(tmp_path)], capture_output=True,
                       text=True, cwd=tmp_path, env={"PYTHONPATH": str(REPO), "PATH": ""})
    assert r.returncode == 2 and "Traceback" not in r.stderr and "Fix:" in r.stderr, r.stderr


def test_cli_clean_of_a_folder_that_is_no_build_explains(tmp_path):
    r = subprocess.run([sys.executable, "-m", "hierasparse_gen.cli", "clean", str(tmp_path)], capture_output=True,
                       text=True, cwd=tmp_path, env={"PYTHONPATH": str(REPO), "PATH": ""})
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "not a hierasparse-gen build folder" in r.stderr and "Fix:" in r.stderr
