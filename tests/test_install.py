"""Packaging: one faiss per machine (faiss-gpu and faiss-cpu share the ``faiss/`` package), version
floors that match the APIs used, and an NSML image whose torch and CUDA fit the faiss-gpu wheels.

setup.py's arguments are read by running it with ``setuptools.setup`` replaced (no pip).
"""
from __future__ import annotations

import importlib.metadata as md
import json
import re
import runpy
from pathlib import Path

import pytest
import setuptools
from packaging.requirements import Requirement
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]
FAISS_NAMES = {"faiss", "faiss-cpu", "faiss-gpu", "faiss-gpu-cu11", "faiss-gpu-cu12"}


def _setup(monkeypatch, **environ: str) -> tuple[dict, dict]:
    """(setup()'s keyword arguments, setup.py's globals) with ``environ`` as the only faiss-related settings."""
    captured: dict = {}
    monkeypatch.setattr(setuptools, "setup", lambda **kw: captured.update(kw))
    for name in ("RETRIEVAL_KIT_FAISS", "NVIDIA_VISIBLE_DEVICES"):
        monkeypatch.delenv(name, raising=False)
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    return captured, runpy.run_path(str(REPO / "setup.py"))


def _every_requirement(kw: dict) -> list[Requirement]:
    """install_requires plus every extra: what any install line of the package could pull in."""
    lines = list(kw["install_requires"]) + [r for extra in kw.get("extras_require", {}).values() for r in extra]
    return [Requirement(line) for line in lines]


def _spec(reqs: list[Requirement], name: str):
    found = [r.specifier for r in reqs if r.name == name]
    assert len(found) == 1, (name, found)
    return found[0]


def test_a_gpu_install_gets_faiss_gpu_and_never_faiss_cpu(monkeypatch):
    kw, _ = _setup(monkeypatch, RETRIEVAL_KIT_FAISS="gpu")
    reqs = _every_requirement(kw)
    assert {r.name for r in reqs} & FAISS_NAMES == {"faiss-gpu"}
    torch_spec = _spec(reqs, "torch")
    assert "2.7.0" in torch_spec and "2.6.0" not in torch_spec  # the CUDA 12.6 runtime faiss-gpu links


def test_a_cpu_install_gets_faiss_cpu_only(monkeypatch):
    kw, _ = _setup(monkeypatch, RETRIEVAL_KIT_FAISS="cpu")
    reqs = _every_requirement(kw)
    assert {r.name for r in reqs} & FAISS_NAMES == {"faiss-cpu"}
    torch_spec, optuna_spec = _spec(reqs, "torch"), _spec(reqs, "optuna")
    assert "2.3.0" in torch_spec and "2.2.2" not in torch_spec        # torch.amp.GradScaler(device)
    assert "4.0.0" in optuna_spec and "3.6.1" not in optuna_spec      # JournalFileBackend


def test_requirements_txt_leaves_faiss_to_setup_py():
    names = {Requirement(line).name for line in (REPO / "requirements.txt").read_text().splitlines()
             if line.strip() and not line.startswith("#")}
    assert not names & FAISS_NAMES   # else `pip install -r requirements.txt -e .` could install two


def test_faiss_follows_the_machine_unless_told(monkeypatch, tmp_path):
    _, setup_py = _setup(monkeypatch)
    choice = setup_py["faiss_choice"]
    no_driver, driver = tmp_path / "absent", tmp_path / "version"
    driver.write_text("NVRM version: 550.54.15")
    assert choice({}, no_driver) == "cpu"
    assert choice({}, driver) == "gpu"
    assert choice({"NVIDIA_VISIBLE_DEVICES": "all"}, no_driver) == "gpu"   # a CUDA image built without a GPU
    assert choice({"NVIDIA_VISIBLE_DEVICES": "void"}, no_driver) == "cpu"
    assert choice({"RETRIEVAL_KIT_FAISS": "cpu"}, driver) == "cpu"
    assert choice({"RETRIEVAL_KIT_FAISS": "GPU"}, no_driver) == "gpu"
    with pytest.raises(SystemExit, match="RETRIEVAL_KIT_FAISS='cuda'"):
        choice({"RETRIEVAL_KIT_FAISS": "cuda"}, no_driver)


def test_the_nsml_image_carries_the_torch_and_cuda_faiss_gpu_needs(monkeypatch):
    kw, setup_py = _setup(monkeypatch, RETRIEVAL_KIT_FAISS="gpu")
    first = (REPO / "setup.py").read_text().splitlines()[0]
    image = re.fullmatch(r"#nsml: pytorch/pytorch:(\d+\.\d+\.\d+)-cuda(\d+)\.(\d+)-cudnn\d+-runtime", first)
    assert image, first
    assert Version(image[1]) in _spec(_every_requirement(kw), "torch")
    assert (int(image[2]), int(image[3])) >= setup_py["FAISS_GPU_CUDA"]


def test_the_installed_kit_has_one_faiss():
    """When the installed retrieval-kit is this checkout (CI's fresh install), its metadata names one faiss."""
    # the checkout's own retrieval_kit.egg-info (left by the build, first on sys.path) has no direct_url.json
    installed = [d for d in md.distributions(name="retrieval-kit") if d.read_text("direct_url.json")]
    if not installed:
        pytest.skip("retrieval-kit is not installed by pip")
    dist = installed[0]
    url = json.loads(dist.read_text("direct_url.json")).get("url", "")
    if not url.startswith("file://") or Path(url.removeprefix("file://")).resolve() != REPO:
        pytest.skip(f"the installed retrieval-kit is not this checkout ({url or 'no direct_url.json'})")
    names = {Requirement(r).name for r in dist.requires or []}
    assert len(names & FAISS_NAMES) == 1, dist.requires


KIT = ("competition", "rerank", "backbones", "ensemble", "tuning", "main", "bench")


def _floor(kw: dict) -> tuple[int, int]:
    spec = re.fullmatch(r">=(\d+)\.(\d+)", kw["python_requires"])
    assert spec, kw["python_requires"]
    return int(spec[1]), int(spec[2])


def _imports(paths) -> set[str]:
    """Top-level names of every absolute import in ``paths`` (imports inside functions included; an optional
    one, in a ``try`` that catches ImportError, and the modules beside each file left out)."""
    import ast
    names = set()
    for path in paths:
        tree = ast.parse(path.read_text(), filename=str(path))
        optional = {id(n) for t in ast.walk(tree) if isinstance(t, ast.Try)
                    and any("ImportError" in ast.unparse(h.type or ast.Name("")) for h in t.handlers)
                    for n in ast.walk(ast.Module(body=t.body, type_ignores=[]))}
        beside = {p.stem for p in path.parent.glob("*.py")}
        for node in ast.walk(tree):
            if id(node) in optional:
                continue
            if isinstance(node, ast.Import):
                names |= {a.name.split(".")[0] for a in node.names} - beside
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names |= {node.module.split(".")[0]} - beside
    return names


def test_the_python_floor_is_one_claim_the_code_keeps(monkeypatch):
    """setup.py's python_requires, ruff's target and the syntax and standard modules the code uses agree."""
    import ast
    import sys
    kw, _ = _setup(monkeypatch)
    floor = _floor(kw)
    assert sys.version_info[:2] >= floor
    ruff = (REPO / "pyproject.toml").read_text()
    assert f'target-version = "py{floor[0]}{floor[1]}"' in ruff
    sources = [p for pkg in KIT for p in sorted(REPO.glob(f"{pkg}/**/*.py"))] + [REPO / "main.py"]
    for path in sources + sorted((REPO / "tests").glob("*.py")):
        ast.parse(path.read_text(), filename=str(path), feature_version=floor)
    since = {"tomllib": (3, 11)}   # standard modules newer than some Pythons
    assert all(version <= floor for name, version in since.items() if name in _imports(sources))


def test_every_third_party_import_is_declared(monkeypatch):
    """What the kit imports is in install_requires (either faiss); what only the tests import, in the test
    extra; requirements.txt (what CI installs) carries every extra."""
    import sys
    kw, _ = _setup(monkeypatch, RETRIEVAL_KIT_FAISS="cpu")
    dists = md.packages_distributions()
    declared = {Requirement(r).name.lower().replace("_", "-") for r in kw["install_requires"]} | {"faiss-gpu"}

    def needed(paths) -> set[str]:
        local = {p.stem for p in REPO.glob("**/*.py")}   # the kit's own modules (bench's, the tests' helpers)
        names = _imports(paths) - set(sys.stdlib_module_names) - set(KIT) - local - {"nsml", "setuptools"}
        return {d.lower().replace("_", "-") for n in names for d in dists.get(n, [n])}

    kit = needed([p for pkg in KIT for p in REPO.glob(f"{pkg}/**/*.py")] + [REPO / "main.py"])
    assert kit - declared - {"faiss"} == set(), "imported by the kit, not in install_requires"
    assert "faiss-cpu" in declared or "faiss" in kit
    test_extra = {Requirement(r).name.lower() for r in kw["extras_require"]["test"]}
    tests = needed(REPO.glob("tests/*.py"))
    assert tests - declared - test_extra - {"faiss"} == set(), "imported by the tests, not in the test extra"
    txt = {Requirement(line).name.lower() for line in (REPO / "requirements.txt").read_text().splitlines()
           if line.strip() and not line.startswith("#")}
    assert {Requirement(r).name.lower() for extra in kw["extras_require"].values() for r in extra} <= txt


def test_pip_check_is_clean():
    import subprocess
    import sys
    res = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True)
    if "No module named pip" in res.stderr:
        pytest.skip("no pip in this environment")
    assert res.returncode == 0, res.stdout + res.stderr
