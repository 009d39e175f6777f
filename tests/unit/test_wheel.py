"""``pip install .`` gives the product and only the product.

The wheel is built from a copy of this tree (``pip wheel --no-deps``, with build isolation as
``pip install .`` does: setuptools comes from the package index) and installed without its
dependencies into a fresh virtual environment. The dependencies the wheel declares
(``Requires-Dist``, transitively, extras left out) come from the environment running the
tests, without a package index: a directory of links to exactly those distributions is put
on the fresh environment's path by a ``.pth`` line, so a module importing anything undeclared
(a test dependency, say) fails, and neither an editable install of pych nor anything else of
the test environment is visible. The fresh interpreter runs isolated (``-I``: no PYTHONPATH,
no working directory on ``sys.path``).

Checked: the wheel holds ``pych`` and its metadata only; every module of the source tree is in
it and imports from the installed copy (``pych.__main__`` is run as ``python -m pych --help``
instead, since importing it runs pych); no module is named ``testing`` and no test double
(``Fake*``, ``Recording*``, ``Mock*`` classes) ships; the ``pych`` and ``pych-remote``
commands start.
"""

from __future__ import annotations

import email
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import time
import venv
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

pytestmark = pytest.mark.wheel

REPO = Path(__file__).resolve().parents[2]
BUILD_TIMEOUT = 300           # s; generous for a slow package index, normally ~10 s in all
DOUBLES = ("Fake", "Recording", "Mock")

# Run by the installed interpreter: import every module of the installed pych; report what
# was imported, what failed and which test doubles were found, as JSON.
PROBE = r"""
import importlib, inspect, json, pkgutil, sys
import pych
report = {"file": pych.__file__, "seen": ["pych"], "failed": {}, "doubles": []}

def failed(name):
    report["failed"][name] = repr(sys.exc_info()[1])

for info in pkgutil.walk_packages(pych.__path__, "pych.", onerror=failed):
    report["seen"].append(info.name)
    if info.name == "pych.__main__":
        continue
    try:
        module = importlib.import_module(info.name)
    except BaseException as e:
        report["failed"][info.name] = f"{type(e).__name__}: {e}"
        continue
    for name, obj in vars(module).items():
        if inspect.isclass(obj) and obj.__module__ == info.name and name.startswith(%r):
            report["doubles"].append(f"{info.name}.{name}")
print(json.dumps(report))
""" % (DOUBLES,)


def source_modules() -> set[str]:
    """Every module of the source tree's pych package, by dotted name."""
    names = set()
    for path in (REPO / "pych").rglob("*.py"):
        parts = path.relative_to(REPO).with_suffix("").parts
        names.add(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


def link_dependencies(wheel: Path, target: Path) -> list[str]:
    """Fill ``target`` with links to the top-level modules and metadata of every distribution
    the wheel requires (transitively; extras and other platforms' requirements left out), as
    installed in this environment. Returns the distributions' names."""
    with zipfile.ZipFile(wheel) as z:
        metadata = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA")))
    todo = [Requirement(r) for r in
            email.message_from_bytes(metadata).get_all("Requires-Dist") or []]
    found: dict[str, importlib.metadata.Distribution] = {}
    while todo:
        requirement = todo.pop()
        if requirement.marker and not requirement.marker.evaluate({"extra": ""}):
            continue
        name = canonicalize_name(requirement.name)
        if name not in found:
            found[name] = importlib.metadata.distribution(requirement.name)
            todo += [Requirement(r) for r in found[name].requires or []]
    target.mkdir()
    for dist in found.values():
        tops = {f.parts[0] for f in dist.files or []
                if f.parts[0] not in ("..", "__pycache__") and not f.parts[0].endswith(".pth")}
        for top in tops:
            if not (target / top).exists():
                (target / top).symlink_to(dist.locate_file(top))
    return sorted(found)


def run(args: list, cwd: Path, env: dict) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=BUILD_TIMEOUT)
    assert proc.returncode == 0, f"{' '.join(map(str, args))}:\n{proc.stdout}\n{proc.stderr}"
    return proc


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(wheel path, the fresh venv's python, environment for it, seconds it all took)."""
    started = time.monotonic()
    tmp = tmp_path_factory.mktemp("wheel")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    # Build from a copy: setuptools writes build/ and *.egg-info/ next to the sources.
    source = tmp / "source"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".hypothesis",
        ".pytest_cache"))
    dist = tmp / "dist"
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "--wheel-dir", dist,
         source], tmp, env)
    wheel, = dist.glob("pych-*.whl")

    root = tmp / "venv"
    venv.EnvBuilder(with_pip=False).create(root)
    python = root / "bin" / "python"
    run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index",
         "--quiet", wheel], tmp, env)
    dependencies = tmp / "dependencies"
    assert "pydantic" in link_dependencies(wheel, dependencies)
    purelib = run([python, "-I", "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                  tmp, env).stdout.strip()
    (Path(purelib) / "dependencies.pth").write_text(f"{dependencies}\n")
    return wheel, python, env, time.monotonic() - started


def test_the_wheel_holds_pych_and_its_metadata_only(installed):
    wheel = installed[0]
    with zipfile.ZipFile(wheel) as z:
        tops = {name.split("/", 1)[0] for name in z.namelist()}
    assert tops == {"pych", wheel.name.split("-py3")[0] + ".dist-info"}, sorted(tops)


def test_every_module_imports_from_the_installed_wheel_and_no_test_code_ships(installed,
                                                                              tmp_path):
    wheel, python, env, took = installed
    started = time.monotonic()
    proc = run([python, "-I", "-c", PROBE], tmp_path, env)
    report = json.loads(proc.stdout)
    assert Path(report["file"]).is_relative_to(python.parent.parent), report["file"]
    assert report["failed"] == {}
    assert set(report["seen"]) == source_modules()
    assert [m for m in report["seen"] if "testing" in m.split(".")] == []
    assert report["doubles"] == []
    print(f"wheel built and installed in {took:.1f} s; "
          f"{len(report['seen'])} modules imported in {time.monotonic() - started:.1f} s")


def test_the_installed_commands_start(installed, tmp_path):
    _, python, env, _ = installed
    bin_dir = python.parent
    for command in ([python, "-I", "-m", "pych", "--help"], [bin_dir / "pych", "--help"],
                    [bin_dir / "pych-remote", "--help"]):
        assert "usage:" in run(command, tmp_path, env).stdout
