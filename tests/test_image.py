"""images/Dockerfile, read with BuildKit's own parser (the ``dockerfile`` package): we cannot build images
here, so check that it stays consistent with the lock, the project, the config and .dockerignore."""

import os
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import dockerfile
import pytest

from docev.config import KubernetesSection, TrainSection

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "images" / "Dockerfile"


@pytest.fixture(scope="module")
def instructions():
    return dockerfile.parse_file(str(DOCKERFILE))


def lock() -> dict[str, str]:
    pins = {}
    for line in (REPO / "requirements.lock").read_text().splitlines():
        name, _, version = line.partition("==")
        pins[name.lower().replace("_", "-")] = version
    return pins


def args(instructions) -> dict[str, str]:
    return dict(i.value[0].split("=", 1) for i in instructions if i.cmd == "ARG" and "=" in i.value[0])


def stages(instructions):
    out = []
    for i in instructions:
        if i.cmd == "FROM":
            out.append([])
        if out:
            out[-1].append(i)
    return out


def test_versions_match_the_lock_and_the_project(instructions):
    a = args(instructions)
    assert a["TORCH_VERSION"] == lock()["torch"]
    requires = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["requires-python"]
    assert requires == f">={a['PYTHON_VERSION']},<3.{int(a['PYTHON_VERSION'].split('.')[1]) + 1}"
    text = DOCKERFILE.read_text()
    for name, version in re.findall(r"([A-Za-z0-9_.-]+)==([0-9][^\s'\"]*)", text):
        assert lock()[name.lower().replace("_", "-")] == version, name
    (install,) = [i for i in instructions if i.cmd == "RUN" and "pip install" in i.value[0]]
    words = shlex.split(install.value[0].split("&&")[0])
    assert words[words.index("--constraint") + 1] == "requirements.lock"
    assert "--only-binary=:all:" in words  # no dependency compiled at install time


def test_multi_stage_non_root_and_no_build_tools(instructions):
    build, final = stages(instructions)
    assert build[0].value[-2:] == ("AS", "build")
    assert final[0].value[0] == build[0].value[0]  # same python base, so the venv's interpreter links hold
    copies = [i for i in final if i.cmd == "COPY" and "--from=build" in i.flags]
    assert [c.value for c in copies] == [("/opt/venv", "/opt/venv")]
    (user,) = [i for i in final if i.cmd == "USER"]
    uid, gid = user.value[0].split(":")
    k8s = KubernetesSection()
    assert (int(uid), int(gid)) == (k8s.run_as_user, k8s.run_as_group) and int(uid) != 0
    build_text = " ".join(" ".join(i.value) for i in build)
    for tool in ("apt-get", "apk ", "gcc", "build-essential", "--no-binary"):
        assert tool not in build_text, tool
    final_runs = " ".join(i.value[0] for i in final if i.cmd == "RUN")
    assert "uninstall --yes" in final_runs and "setuptools" in final_runs
    assert "build-essential" not in final_runs and "apk " not in final_runs


def test_final_stage_has_the_c_compiler_triton_needs(instructions):
    """``compile: true`` on CUDA: Triton builds a C launcher at the first kernel launch, with the host compiler;
    NCCL needs the RDMA userspace for InfiniBand/RoCE. The final stage installs exactly gcc + libc6-dev and the
    verbs / provider / rdmacm libraries, as root before ``USER``, and clears apt's lists."""
    _, final = stages(instructions)
    names = [i.cmd for i in final]
    installs = []
    for pos, i in enumerate(final):
        if i.cmd != "RUN" or "apt-get install" not in i.value[0]:
            continue
        assert pos < names.index("USER")  # installed as root; the image still ends non-root
        for part in i.value[0].split("&&"):
            words = shlex.split(part)
            if words[:2] == ["apt-get", "install"]:
                installs += [w for w in words[2:] if not w.startswith("-")]
                assert "--no-install-recommends" in words
        assert "rm -rf /var/lib/apt/lists/*" in i.value[0]
    assert sorted(installs) == ["gcc", "ibverbs-providers", "libc6-dev", "libibverbs1", "librdmacm1"]
    (user,) = [i for i in final if i.cmd == "USER"]
    assert user.value[0].split(":")[0] != "0"


def test_cuda_check_refuses_a_cpu_torch(instructions, tmp_path):
    """The build-time check in the Dockerfile, run here: this venv's CPU torch fails it, a CUDA torch passes."""
    (install,) = [i for i in instructions if i.cmd == "RUN" and "pip install" in i.value[0]]
    (check,) = [part.strip() for part in install.value[0].split("&&") if part.strip().startswith("python -c")]
    a = args(instructions)
    env = {
        **os.environ,
        "TORCH_VERSION": a["TORCH_VERSION"],
        "TORCH_CUDA": a["TORCH_CUDA"],
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
    }
    cpu = subprocess.run(["/bin/sh", "-c", check], env=env, capture_output=True, text=True, check=False)
    assert cpu.returncode == 1 and f"is not CUDA build {a['TORCH_VERSION']}+{a['TORCH_CUDA']}" in cpu.stderr
    fake = tmp_path / "torch"
    fake.mkdir()

    def run_with(local: str, cuda: str) -> int:
        (fake / "__init__.py").write_text(
            f"__version__ = '{a['TORCH_VERSION']}+{local}'\nclass version:\n    cuda = '{cuda}'\n"
        )
        env_fake = {**env, "PYTHONPATH": str(tmp_path)}
        return subprocess.run(["/bin/sh", "-c", check], env=env_fake, capture_output=True, check=False).returncode

    assert run_with("cu130", "13.0") == 0
    assert run_with("cu128", "12.8") == 1  # another CUDA build of the same torch is refused too


# Minimum NVIDIA driver per CUDA major version (minor-version compatibility; NVIDIA's CUDA Compatibility guide,
# "Minor Version Compatibility", table 1: CUDA 13.x >= 580, CUDA 12.x >= 525).
MIN_DRIVER = {"13": "580", "12": "525"}


def test_torch_is_the_locks_version_as_the_pinned_cuda_build_and_the_readme_names_its_driver(instructions):
    a = args(instructions)
    assert a["TORCH_VERSION"] == lock()["torch"]
    assert re.fullmatch(r"cu1[0-9]{2}", a["TORCH_CUDA"])
    (install,) = [i for i in instructions if i.cmd == "RUN" and "pip install" in i.value[0]]
    words = shlex.split(install.value[0].split("&&")[0])
    assert "torch==${TORCH_VERSION}+${TORCH_CUDA}" in words
    assert words[words.index("--extra-index-url") + 1] == "https://download.pytorch.org/whl/${TORCH_CUDA}"
    major, minor = a["TORCH_CUDA"][2:4], a["TORCH_CUDA"][4:]
    readme = " ".join((REPO / "README.md").read_text().split())
    assert f"`torch=={a['TORCH_VERSION']}+{a['TORCH_CUDA']}`" in readme
    assert f"CUDA {major}.{minor} build needs an NVIDIA driver ≥ {MIN_DRIVER[major]}" in readme


def test_dockerignore_lets_in_exactly_what_is_copied(instructions):
    lines = [ln for ln in (REPO / ".dockerignore").read_text().splitlines() if ln and not ln.startswith("#")]
    assert lines[0] == "*"  # an allow-list: .venv, outputs, .git and manifests/secrets/wandb.env stay out
    allowed = {ln[1:] for ln in lines if ln.startswith("!")}
    copied = set()
    for i in instructions:
        if i.cmd == "COPY" and not i.flags:
            copied |= {Path(src).as_posix() for src in i.value[:-1]}
    assert copied == allowed
    for path in copied:
        assert (REPO / path).exists(), path


def test_make_image_builds_the_configured_tag():
    makefile = (REPO / "Makefile").read_text()
    image = re.search(r"^IMAGE \?= (\S+)$", makefile, re.M).group(1)
    assert image == TrainSection().image
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert image.rsplit(":", 1)[1] == version
    assert re.search(r"^image:\n\tdocker build -f images/Dockerfile -t \$\(IMAGE\) \.$", makefile, re.M)
