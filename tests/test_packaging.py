"""The wheel holds the whole library under the right names, and works outside the repository.

blocks/ and kernels/ install as hybridlab.blocks and hybridlab.kernels (pyproject.toml's
package-dir, found by setup.py); a package missing from the wheel only shows outside an
editable install, so the wheel is built and imported here. The build runs on a copy of the
sources, so it never writes build/ or *.egg-info into a tree others are working in.
"""
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# source folder -> the package it installs as
MAPPING = {"hybridlab": "hybridlab", "blocks": "hybridlab.blocks", "kernels": "hybridlab.kernels"}
_SKIP = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")


def _source_files(folder: str) -> list[Path]:
    return sorted(p.relative_to(ROOT / folder) for p in (ROOT / folder).rglob("*")
                  if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for folder in MAPPING:
        shutil.copytree(ROOT / folder, src / folder, ignore=_SKIP)
    out = tmp_path_factory.mktemp("wheel")
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation",
                        "-q", "-w", str(out)], capture_output=True, text=True, cwd=src, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    (whl,) = out.glob("hybridlab-*.whl")
    return whl


def test_wheel_holds_every_module_and_data_file_under_its_package_name(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = [f"{folder}/{rel} -> {pkg.replace('.', '/')}/{rel}"
               for folder, pkg in MAPPING.items() for rel in map(str, _source_files(folder))
               if f"{pkg.replace('.', '/')}/{rel}" not in names]
    assert not missing, "not in the wheel:\n" + "\n".join(missing)
    assert "hybridlab/benchmarks/attention.py" in names and "hybridlab/blocks/base.py" in names
    # nothing installs as a top-level `blocks` or `kernels` package
    assert {n.split("/")[0] for n in names} == {"hybridlab", wheel.name.split("-py")[0] + ".dist-info"}


def test_wheel_metadata_has_floors_extras_and_console_script(wheel):
    z = zipfile.ZipFile(wheel)
    dist_info = next(n.split("/")[0] for n in z.namelist() if n.endswith(".dist-info/METADATA"))
    meta = z.read(f"{dist_info}/METADATA").decode()
    for req in ("torch>=2.5", "optuna>=5.0", "Provides-Extra: text", "Provides-Extra: postgres",
                "tokenizers>=0.15; extra == \"text\"", "psycopg2-binary>=2.9; extra == \"postgres\""):
        assert req in meta, req
    assert "hybridlab = hybridlab.cli:main" in z.read(f"{dist_info}/entry_points.txt").decode()


def test_installed_wheel_imports_outside_the_repository(wheel, tmp_path):
    target = tmp_path / "site"
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-compile", "-q",
                        "--target", str(target), str(wheel)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    # -P: the cwd is not on sys.path; PYTHONPATH puts the target before the venv's editable
    # install, and the check on __file__ proves the wheel's copy is the one imported.
    code = ("import hybridlab, hybridlab.benchmarks.attention, hybridlab.benchmarks.model, hybridlab.blocks, "
            "hybridlab.kernels\n"
            "from hybridlab.data.corpus import default_corpus_text\n"
            "print(hybridlab.__file__, hybridlab.blocks.__file__, hybridlab.kernels.__file__)\n"
            "print(sorted(hybridlab.blocks.REGISTRY), len(default_corpus_text()))\n")
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(target), "HOME": str(tmp_path)}
    r = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True, cwd=tmp_path,
                       env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    files, registry = r.stdout.splitlines()[-2:]
    assert all(f.startswith(str(target)) for f in files.split()), files
    assert "'mamba2'" in registry and "'sal'" in registry
    assert int(registry.rsplit(" ", 1)[1]) > 100_000  # the embedded corpus (CPython's pydoc_data)
