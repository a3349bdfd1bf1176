"""The built wheel works on its own: installed without `-e`, run from outside the checkout.

An editable install hides packaging mistakes (a subpackage left out of the wheel, a module that
reads a file of the repository), so this test builds a wheel of the checkout, installs it into a
fresh virtual environment and runs the console script, the demo's data stage and the config
presets from a folder outside the checkout. The fresh environment borrows the dependencies
already installed for the tests through a `.pth` line naming their site-packages: a folder added
that way is not scanned for `.pth` files of its own, so the editable install of the checkout
(itself a `.pth` file there) stays inactive, and `opdplus_jax` comes from the wheel alone.
"""

import os
import pathlib
import shutil
import subprocess
import sys
import sysconfig
import zipfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = "opdplus_jax"
# What setup.py reads to build the wheel; copied, so that building leaves the checkout untouched.
BUILD_INPUTS = ("setup.py", "README.md", "setup.cfg", "pyproject.toml", "MANIFEST.in")
# pip's messages when setuptools (the build backend) can be neither imported nor downloaded.
NO_BACKEND = ("No matching distribution found for setuptools", "Could not find a version")


def _run(cmd, cwd, timeout=120, env=None):
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout, check=False)  # fmt: skip


def _build_wheel(tmp: pathlib.Path) -> pathlib.Path:
    """Builds a wheel of a copy of the checkout's package sources; returns its path.

    Tries the test interpreter's own setuptools first (no download); without one, pip's isolated
    build, which gets setuptools from its cache or the index. Skips only if neither can run.
    """
    src, out = tmp / "src", tmp / "wheel"
    shutil.copytree(ROOT / PACKAGE, src / PACKAGE,
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))  # fmt: skip
    for name in BUILD_INPUTS:
        if (ROOT / name).is_file():
            shutil.copy2(ROOT / name, src / name)
    pip = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(out)]
    attempts = [[*pip, "--no-build-isolation", str(src)], [*pip, "--retries", "0", str(src)]]
    logs = []
    for cmd in attempts:
        proc = _run(cmd, cwd=tmp, timeout=180)
        wheels = list(out.glob(f"{PACKAGE}-*.whl"))
        if proc.returncode == 0 and len(wheels) == 1:
            return wheels[0]
        logs.append(f"$ {' '.join(cmd)}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    if any(m in logs[-1] for m in NO_BACKEND):
        pytest.skip("cannot build a wheel offline: setuptools is neither installed in the test "
                    "environment nor obtainable by pip\n" + logs[-1])  # fmt: skip
    pytest.fail("building the wheel failed:\n" + "\n".join(logs))


def _fresh_venv(tmp: pathlib.Path, wheel: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
    """A new venv with only the wheel installed, then the test's dependencies made visible."""
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    # Installed before the dependencies are visible, so that pip sees no other opdplus_jax.
    install = [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps",
               "--no-index", "--no-cache-dir", str(wheel)]  # fmt: skip
    proc = _run(install, cwd=tmp)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    query = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    purelib = subprocess.run([str(python), "-c", query], capture_output=True, text=True, check=True)
    site_packages = pathlib.Path(purelib.stdout.strip())
    deps = dict.fromkeys(sysconfig.get_paths()[k] for k in ("purelib", "platlib"))
    (site_packages / "test_dependencies.pth").write_text("\n".join(deps) + "\n")
    return venv, site_packages


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(venv folder, its site-packages, the wheel) of the checkout's wheel in a fresh venv."""
    tmp = tmp_path_factory.mktemp("packaging")
    wheel = _build_wheel(tmp)
    venv, site_packages = _fresh_venv(tmp, wheel)
    return venv, site_packages, wheel


def _env() -> dict:
    """The environment minus anything that could put the checkout on the import path."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    return {**env, "JAX_PLATFORMS": "cpu", "TRANSFORMERS_VERBOSITY": "error"}


def test_wheel_holds_every_module_and_the_presets(installed):
    _, _, wheel = installed
    names = set(zipfile.ZipFile(wheel).namelist())
    sources = {p.relative_to(ROOT).as_posix() for p in (ROOT / PACKAGE).rglob("*.py")
               if "__pycache__" not in p.parts}  # fmt: skip
    assert sources - names == set(), "modules missing from the wheel (a folder without __init__?)"
    assert {f"{PACKAGE}/configs/__init__.py", f"{PACKAGE}/configs/default.py"} <= names
    assert not any(n.startswith(("configs/", "tests/", "experiments/")) for n in names)


def test_installed_package_runs_outside_the_checkout(installed, tmp_path):
    venv, site_packages, _ = installed
    python, env = str(venv / "bin" / "python"), _env()

    where = _run([python, "-c", f"import {PACKAGE}; print({PACKAGE}.__file__)"], tmp_path, env=env)
    assert where.returncode == 0, where.stderr[-3000:]
    assert pathlib.Path(where.stdout.strip()).is_relative_to(site_packages), where.stdout

    presets = "from opdplus_jax.configs import default; print(default.get_config('cpu').seed)"
    proc = _run([python, "-c", presets], tmp_path, env=env)
    assert proc.returncode == 0 and proc.stdout.strip() == "0", proc.stderr[-3000:]

    train = str(venv / "bin" / "opdplus-train")
    for flag, expected in (("--help", "USAGE"), ("--helpfull", "--config:")):
        proc = _run([train, flag], tmp_path, env=env)  # absl's help exits with status 1
        out = proc.stdout + proc.stderr
        assert expected in out and "Traceback" not in out, out[-3000:]
    # The repository's config file forwards to the installed presets; the config loads before
    # the missing --workdir is reported.
    proc = _run([train, f"--config={ROOT / 'configs' / 'default.py'}:cpu"], tmp_path, env=env)
    assert "train needs --workdir" in proc.stdout + proc.stderr, proc.stderr[-3000:]

    demo = [python, "-m", f"{PACKAGE}.demo", "--workdir", "demo", "--until", "data",
            "--num_train", "20", "--num_test", "4"]  # fmt: skip
    proc = _run(demo, tmp_path, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for path in ("data/train.jsonl", "data/test.jsonl", "data/base_sft.jsonl",
                 "data/demo_stage.json", "models/tokenizer/tokenizer.json"):  # fmt: skip
        assert (tmp_path / "demo" / path).is_file(), path
    assert len((tmp_path / "demo" / "data" / "test.jsonl").read_text().splitlines()) == 4
    assert not (tmp_path / "demo" / "models" / "base").exists(), "--until data built models"
