"""A plain install of tapio (no test extras) into a fresh virtualenv starts and works.

The test extras pull in the OpenTelemetry SDK exporters, which bring many
packages with them; a runtime import of one of those that pyproject.toml
does not declare passes the rest of the suite and fails for every user.
This test builds tapio from the working tree (not editable: the package
data, such as the BPF sources, must be in the wheel), installs it with only
its declared dependencies, and uses it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tapio.testing import prereq
from tapio.testing.process import ROOT

#: test helpers may import pytest and the SDK: they are not part of the runtime
NOT_RUNTIME = ("tapio.testing",)

IMPORT_EVERY_MODULE = f"""
import importlib, pkgutil, sys, tapio
failed = []
for m in pkgutil.walk_packages(tapio.__path__, "tapio."):
    if m.name.startswith({NOT_RUNTIME!r}):
        continue
    try:
        importlib.import_module(m.name)
    except Exception as e:
        failed.append(f"{{m.name}}: {{e!r}}")
print("\\n".join(failed))
sys.exit(1 if failed else 0)
"""


@pytest.fixture(scope="module")
def plain_install(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with ``pip install <repo>`` and nothing else; returns its bin directory."""
    venv = tmp_path_factory.mktemp("plain") / "venv"
    base = "/usr/bin/python3" if Path("/usr/bin/python3").exists() else sys.executable
    res = subprocess.run([base, "-m", "venv", str(venv)], capture_output=True, text=True, timeout=120)
    if res.returncode != 0:
        prereq.missing(f"a Python that can make a venv ({res.stderr.strip()[-200:]})", "apt-get install python3-venv")
    pip = subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check", str(ROOT)],
        capture_output=True, text=True, timeout=600,
    )
    assert pip.returncode == 0, f"pip install of tapio without extras failed:\n{pip.stdout}\n{pip.stderr}"
    return venv / "bin"


def run(bindir: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(bindir / args[0]), *args[1:]], capture_output=True, text=True, timeout=120, cwd=cwd)


def test_a_plain_install_lists_components_and_validates_the_default_pipelines(plain_install: Path, tmp_path: Path):
    res = run(plain_install, "tapio", "components", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert {"otlp", "ebpf", "batch", "otlphttp", "storage"} <= {line.split()[1] for line in res.stdout.splitlines()[1:]}
    res = run(plain_install, "tapio", "validate", "-c", str(ROOT / "pipelines.yaml"), cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "valid" in res.stdout


def test_a_plain_install_imports_every_runtime_module(plain_install: Path, tmp_path: Path):
    res = run(plain_install, "python", "-c", IMPORT_EVERY_MODULE, cwd=tmp_path)
    assert res.returncode == 0, f"modules that need an undeclared dependency:\n{res.stdout}{res.stderr}"


def test_a_plain_install_ships_the_bpf_sources(plain_install: Path, tmp_path: Path):
    res = run(plain_install, "python", "-c", "import importlib.resources as r, json; print(json.dumps([p.name for p in r.files('tapio.bpf').iterdir()]))", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    shipped = {p.name for p in (ROOT / "tapio" / "bpf").iterdir() if p.suffix in (".c", ".h")}
    assert shipped and shipped <= set(json.loads(res.stdout))


def _compiler_and_headers() -> None:
    import sysconfig

    prereq.command("gcc", "apt-get install gcc (scripts/setup.sh does)")
    if not Path(sysconfig.get_paths()["include"], "Python.h").exists():
        prereq.missing("Python's C headers", "apt-get install python3-dev (scripts/setup.sh does)")


@pytest.mark.parametrize("receiver", ["ebpf", "cni_log"])
def test_a_plain_install_builds_the_receivers_compiled_helpers(plain_install: Path, tmp_path: Path, receiver: str):
    """pip compiles _hotloop.c and cni-log's _fast.c where gcc and Python's headers are (scripts/setup.sh installs
    both; the image's build stage too); the installed receiver then takes it, as the start summary would say."""
    _compiler_and_headers()
    probe = f"from tapio.receivers.{receiver} import _records; m, why = _records._load_compiled(); print(m.__file__ if m else why)"
    res = run(plain_install, "python", "-c", probe, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip().startswith(str(plain_install.parent)), res.stdout  # the installed module, not the tree's


def test_a_plain_install_builds_the_compiled_otlp_json_walk(plain_install: Path, tmp_path: Path):
    """pip compiles _wirejson.c likewise, and otlpjson.encode_serialized (the file exporter's JSON) takes it."""
    _compiler_and_headers()
    probe = ("from tapio import otlpjson; from tapio.pdata import Signal; c = otlpjson.COMPILED;"
             "print(c.__file__ if c else otlpjson.COMPILED_UNUSED_REASON);"
             "print(otlpjson.encode_serialized(Signal.LOGS.request_class, b'').decode(), otlpjson._WALKERS[Signal.LOGS.request_class] is not None)")
    res = run(plain_install, "python", "-c", probe, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    where, used = res.stdout.splitlines()
    assert where.startswith(str(plain_install.parent)), res.stdout  # the installed module, not the tree's
    assert used == "{} True"
