"""One pinned requirement set: pyproject, the worker image and Cog install the same versions."""

from __future__ import annotations

import os
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _requirements() -> dict[str, str]:
    pins = {}
    for line in (REPO / "docker" / "requirements.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, version = line.split("==")
            pins[name.lower()] = version
    return pins


def test_pyproject_pins_match_the_image_requirements():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    pins = _requirements()
    declared = {}
    for dependency in project["dependencies"]:
        if "==" in dependency:
            name, version = dependency.split("==")
            declared[name.lower()] = version
    torch_pin = pins.pop("torch")
    assert declared == pins
    assert torch_pin == "2.13.0"


def test_torch_is_a_range_in_pyproject_that_admits_the_pin():
    from packaging.specifiers import SpecifierSet

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    torch_spec = next(d for d in project["dependencies"] if d.startswith("torch"))
    assert "==" not in torch_spec
    assert "2.13.0" in SpecifierSet(torch_spec.removeprefix("torch"))


def test_setup_installs_torch_first_with_the_exact_cpu_pin():
    script = (REPO / "scripts" / "setup_venv.sh").read_text()
    installs = [line for line in script.splitlines() if "pip install" in line]
    assert "torch==2.13.0" in installs[1] and installs.index(installs[1]) < installs.index(
        installs[2]
    )


def test_configs_ship_as_package_data():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert "configs/**/*.json" in project["tool"]["setuptools"]["package-data"]["handler"]


def test_dockerfile_installs_exactly_what_ci_installs():
    dockerfile = (REPO / "docker" / "Dockerfile").read_text()
    setup = (REPO / "scripts" / "setup_venv.sh").read_text()
    # the same order: pip upgraded, torch pinned, then the requirement set
    order = ["pip install --upgrade pip", "pip install torch==2.13.0", "pip install -r"]
    assert [dockerfile.index(step) for step in order] == sorted(
        dockerfile.index(step) for step in order
    )
    assert "pip install -q --upgrade pip" in setup
    assert "COPY docker/requirements.txt /tmp/requirements.txt" in dockerfile
    assert "pip install torch==2.13.0" in dockerfile and "pip install -q torch==2.13.0" in setup
    assert "pip install -r /tmp/requirements.txt" in dockerfile
    assert "pip install -q -r docker/requirements.txt" in setup
    assert dockerfile.index("pip install torch==2.13.0") < dockerfile.index(
        "pip install -r /tmp/requirements.txt"
    )


def test_runpod_hub_files_are_valid_json_with_tests():
    import json

    hub = json.loads((REPO / ".runpod" / "hub.json").read_text())
    tests = json.loads((REPO / ".runpod" / "tests.json").read_text())
    assert hub["type"] == "serverless" and hub["config"]["runsOn"] == "GPU"
    assert tests["tests"] and all("input" in t for t in tests["tests"])
    assert json.loads((REPO / "test_input.json").read_text())["input"]["prompt"]


def test_the_hubs_handler_py_starts_the_worker_from_anywhere(demo_volume, tmp_path):
    """.runpod/handler.py (the Hub's publishing guide asks for one) runs `python -m handler`'s
    worker, with its flags, though its own name would shadow the package."""
    import json
    import subprocess

    job = json.dumps({"input": {"action": "list_models"}})
    done = subprocess.run(
        [sys.executable, str(REPO / ".runpod" / "handler.py"), "--test_input", job],
        cwd=tmp_path,
        env={**os.environ, "MODELS_DIR": str(demo_volume)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Job local_test completed successfully" in done.stdout + done.stderr
    assert "demo-sdxl" in done.stdout + done.stderr


def test_hub_dockerfile_is_the_worker_image_and_cuda_versions_match_torch():
    import json
    import re

    dockerfile = (REPO / "docker" / "Dockerfile").read_text()
    assert (REPO / ".runpod" / "Dockerfile").read_text() == dockerfile
    base = re.search(r"ARG CUDA_BASE=nvidia/cuda:(\d+\.\d+)", dockerfile).group(1)
    assert base == "13.0"  # torch 2.13.0's PyPI wheels are CUDA 13.0 builds
    import yaml

    assert yaml.safe_load((REPO / "cog.yaml").read_text())["build"]["cuda"] == base
    for name in ("hub.json", "tests.json"):
        data = json.loads((REPO / ".runpod" / name).read_text())
        versions = data["config"]["allowedCudaVersions"]
        assert versions and all(float(v) >= 13.0 for v in versions), name
    hub = json.loads((REPO / ".runpod" / "hub.json").read_text())
    keys = {entry["key"] for entry in hub["config"]["env"]}
    assert {"BUCKET_ENDPOINT_URL", "BUCKET_NAME", "DEFAULT_CHECKPOINT"} <= keys


def test_both_images_have_the_c_compiler_that_compile_needs():
    """With COMPILE=1, triton compiles its CUDA launcher modules with a C compiler at run time."""
    import re

    import yaml

    dockerfile = (REPO / "docker" / "Dockerfile").read_text()
    final_stage = dockerfile.rsplit("\nFROM ", 1)[1]
    installed = re.search(r"apt-get install -y --no-install-recommends ([^\n\\&]*)", final_stage)
    assert {"gcc", "libc6-dev", "python3-dev"} <= set(installed.group(1).split())
    build = yaml.safe_load((REPO / "cog.yaml").read_text())["build"]
    assert {"gcc", "libc6-dev"} <= set(build["system_packages"])


def test_cog_and_the_worker_image_use_the_same_python():
    cog = (REPO / "cog.yaml").read_text()
    dockerfile = (REPO / "docker" / "Dockerfile").read_text()
    assert 'python_version: "3.12"' in cog and "ubuntu24.04" in dockerfile  # 24.04's python3


def bytecode_steps() -> dict[str, tuple[str, str]]:
    """Each image's bytecode step, and the folder it compiles as written there."""
    import re

    import yaml

    dockerfile = (REPO / "docker" / "Dockerfile").read_text()
    step = re.search(r"RUN (python3 -m compileall [^\n]*\\\n[^\n]*)", dockerfile).group(1)
    (cog_step,) = yaml.safe_load((REPO / "cog.yaml").read_text())["build"]["run"]
    purelib = re.search(r'\$\(python -c "[^"]*"\)', cog_step).group(0)
    return {
        "docker": (step.replace("\\\n", " ").replace("python3", "python"), "/opt/venv/lib"),
        "cog": (cog_step, purelib),
    }


@pytest.mark.parametrize("image", ["docker", "cog"])
def test_the_images_compile_bytecode_that_is_used_whatever_the_mtimes(image, tmp_path):
    import subprocess

    step, folder = bytecode_steps()[image]
    package = tmp_path / "lib" / "site-packages" / "demo"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("VALUE = 1\n")
    (package / "broken.py").write_text("def f(:\n")  # like the test files that do not compile
    command = step.replace(folder, str(tmp_path / "lib")).replace("python ", f"{sys.executable} ")
    beside_sources = {k: v for k, v in os.environ.items() if k != "PYTHONPYCACHEPREFIX"}
    # pip (the Docker image) compiles at install, mtime-checked: the step must replace that
    subprocess.run(
        [sys.executable, "-m", "compileall", "-q", str(package / "__init__.py")],
        check=True,
        env=beside_sources,
    )
    subprocess.run(command, shell=True, check=True, env=beside_sources)
    (compiled,) = (package / "__pycache__").glob("__init__.*.pyc")
    flags = int.from_bytes(compiled.read_bytes()[4:8], "little")
    assert flags == 0b01  # PEP 552: hash-based, source not checked


def test_the_cog_bytecode_step_compiles_the_interpreters_site_packages():
    import subprocess
    import sysconfig

    _, folder = bytecode_steps()["cog"]
    shell = subprocess.run(
        f"echo {folder}",
        shell=True,
        check=True,
        capture_output=True,
        text=True,
        env={"PATH": str(Path(sys.executable).parent)},
    )
    assert shell.stdout.strip() == sysconfig.get_paths()["purelib"]


def test_every_environment_variable_the_worker_reads_is_in_the_readme():
    import re

    settings = (REPO / "handler" / "settings.py").read_text()
    names = set(re.findall(r'_(?:flag|int|str)\(\s*"([A-Z0-9_]+)"', settings))
    readme = (REPO / "README.md").read_text()
    assert len(names) > 30
    assert sorted(n for n in names if f"`{n}`" not in readme) == []


def test_the_build_context_keeps_what_the_images_use_and_leaves_the_dev_tree_out():
    import fnmatch
    import re

    patterns = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    dockerfile = (REPO / "docker" / "Dockerfile").read_text()
    copied = [
        source
        for line in re.findall(r"^COPY (?!--from)(.+)$", dockerfile, re.MULTILINE)
        for source in line.split()[:-1]
    ]
    needed = {*copied, "handler", "models", "cog.yaml", ".cog/openapi_schema.json"}
    for path in needed:
        parts = Path(path).parts
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        assert not any(fnmatch.fnmatch(p, pattern) for p in prefixes for pattern in patterns), path
    assert {".venv", ".whl", "demo-volume", "tests", ".git"} <= set(patterns)


def test_cog_installs_the_sdk_version_the_requirements_pin():
    import yaml

    build = yaml.safe_load((REPO / "cog.yaml").read_text())["build"]
    pins = dict(
        line.split("==")
        for line in (REPO / "docker" / "requirements.txt").read_text().splitlines()
        if "==" in line and not line.startswith("#")
    )
    assert build["sdk_version"] == pins["cog"] == pins["coglet"]
