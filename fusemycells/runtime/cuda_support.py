"""CUDA on the host's NVIDIA driver: which CUDA the image needs, whether the driver runs it, what to say if not.

The image's GPU libraries are built for CUDA 12 (torch 2.13.0+cu126: CUDA 12.6; onnxruntime-gpu 1.26.0:
CUDA 12.8; both with cuDNN 9; see the Dockerfile). NVIDIA's compatibility rules, kept as data in
:data:`CUDA_RULES`:

* minor-version compatibility: a CUDA 12.x runtime runs on any driver >= 525.60.13 (13.x: >= 580.65.06);
* forward compatibility: on data-centre GPUs (Grand Challenge's T4) an older driver *branch* runs a newer
  CUDA through the libcuda of the image's cuda-compat package (``/usr/local/cuda/compat``, installed in
  every nvidia/cuda base image). The branches are those the base image's ``NVIDIA_REQUIRE_CUDA`` accepts:
  R470, R535, R550 for 12.6 (nvidia/cuda:12.6.3-base); R535, R550, R565, R570, R575 for 13.0 (no R470).

:func:`plan_cuda` maps (driver version, CUDA needed, compat libcuda version) to a route: ``native``,
``compat`` (the compat libraries go first on the loader path), ``unsupported``, ``no-driver`` or
``cpu-build``. :func:`main` is the image's entry point (``python -m fusemycells.runtime.cuda_support --exec
inference.py ...``): it applies the route to the environment, then runs the script. :func:`cuda_failure_message`
is the ERROR text for a host whose driver is present but whose CUDA did not start.

Everything here is torch-free: the route must be chosen before any CUDA library is loaded.
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import importlib.util
import logging
import os
import re
import runpy
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from fusemycells.runtime.devices import NVIDIA_VERSION_FILE, nvidia_driver_version

log = logging.getLogger(__name__)

COMPAT_DIR = "/usr/local/cuda/compat"
"""The cuda-compat package's libraries (libcuda.so.1 of a newer driver) in nvidia/cuda base images."""
ROUTE_ENV = "FUSEMYCELLS_CUDA_ROUTE"
"""Set by :func:`main` for the child: the route it chose (``native``, ``compat``, ...)."""
COMPAT_OVERRIDE_ENV = "FUSEMYCELLS_CUDA_COMPAT"
"""``1``: always put the compat libraries first, ``0``: never; unset or anything else: decide."""
ROUTES = ("native", "compat", "unsupported", "no-driver", "cpu-build")
IMAGE_BUILDS = {"torch": "12.6", "onnxruntime": "12.8"}
"""CUDA each GPU library of the image is built for (torch 2.13.0+cu126, onnxruntime-gpu 1.26.0); the tests
check it against the Dockerfile and requirements.txt, the image reads its own via :func:`installed_cuda_builds`."""


@dataclass(frozen=True)
class CudaRule:
    """Drivers that run a CUDA major release.

    ``min_driver``: the minor-version compatibility floor (any runtime of that major runs on it).
    ``compat_branches``: driver branch → lowest version of that branch that the cuda-compat package
    serves (forward compatibility, data-centre GPUs only).
    """

    major: int
    min_driver: str
    compat_branches: Mapping[int, str] = field(default_factory=dict)


CUDA_RULES: dict[int, CudaRule] = {
    # NVIDIA CUDA Compatibility guide (minor-version floor 525.60.13); NGC release notes: "470.57 (or later
    # R470)" for CUDA 12 forward compatibility on data-centre GPUs; NVIDIA_REQUIRE_CUDA of nvidia/cuda:12.6.3-base.
    12: CudaRule(12, "525.60.13", {470: "470.57", 535: "535", 550: "550"}),
    # CUDA 13.0 GA driver 580.65.06; NVIDIA_REQUIRE_CUDA of nvidia/cuda:13.0.x-base (R470 is not listed).
    13: CudaRule(13, "580.65.06", {535: "535", 550: "550", 565: "565", 570: "570", 575: "575"}),
}


BRANCH_CUDA = {418: "10.1", 440: "10.2", 450: "11.0", 460: "11.2", 470: "11.4"}
"""The CUDA version the libcuda of each older driver branch reports (cuDriverGetVersion): the branch of a host
whose driver version cannot be read (no ``/proc`` driver file, no nvidia-smi in the container)."""


def branch_of_cuda(reported: str | None) -> int | None:
    """The driver branch whose libcuda reports CUDA ``reported`` (major.minor), e.g. '11.4' → 470; None if none."""
    have = version_tuple(reported)
    if have is None:
        return None
    return next((branch for branch, cuda in BRANCH_CUDA.items() if version_tuple(cuda) == have[:2]), None)


@dataclass(frozen=True)
class CudaPlan:
    """What the host's driver can do with the CUDA the image needs (``route`` is one of :data:`ROUTES`)."""

    route: str
    driver: str | None
    needed: str | None
    compat_libcuda: str | None
    reason: str

    def as_report(self) -> dict[str, str | None]:
        return asdict(self)


def version_tuple(text: str | None) -> tuple[int, ...] | None:
    """'535.104.05' → (535, 104, 5); None for anything that is not dot-separated integers."""
    if text is None or not re.fullmatch(r"\d+(\.\d+)*", text.strip()):
        return None
    return tuple(int(part) for part in text.strip().split("."))


def libcuda_version_from_name(name: str) -> str | None:
    """'libcuda.so.560.35.05' → '560.35.05' (the driver a libcuda file belongs to); None for 'libcuda.so.1'."""
    match = re.fullmatch(r"libcuda\.so\.(\d+\.\d+(?:\.\d+)*)", Path(name).name)
    return match.group(1) if match else None


def cuda_from_driver_api(value: int) -> str | None:
    """cuDriverGetVersion's integer (e.g. 12020) → '12.2'; None for 0 or less (no usable driver)."""
    return f"{value // 1000}.{value % 1000 // 10}" if value > 0 else None


def cuda_from_torch_version(version: str) -> str | None:
    """CUDA of a torch build from its version string: '2.13.0+cu126' → '12.6', '2.13.0+cpu' → None."""
    match = re.search(r"\+cu(\d+)(\d)$", version)
    return f"{match.group(1)}.{match.group(2)}" if match else None


def cuda_from_ort_build_info(text: str) -> str | None:
    """CUDA of an onnxruntime build from onnxruntime/capi/build_and_package_info.py ("cuda_version = '12.8'")."""
    match = re.search(r"cuda_version\s*=\s*['\"](\d+(?:\.\d+)*)['\"]", text)
    return match.group(1) if match else None


def image_cuda(builds: Mapping[str, str | None]) -> str | None:
    """The newest CUDA among the installed libraries' builds (what the driver must serve), or None (all CPU)."""
    versions = [v for v in builds.values() if version_tuple(v) is not None]
    return max(versions, key=lambda v: version_tuple(v) or ()) if versions else None


def _plan_from_reported_cuda(
    driver_cuda: str | None, need: tuple[int, ...], rule: CudaRule | None, compat_libcuda: str | None,
    found: dict[str, str | None],
) -> CudaPlan:
    """:func:`plan_cuda`'s route when the driver version is unreadable: from the CUDA version libcuda reports."""
    reported = version_tuple(driver_cuda)
    if reported is None:
        return CudaPlan("no-driver", reason="no NVIDIA driver visible", **found)
    if rule is not None and reported[0] >= need[0]:
        return CudaPlan(
            "native",
            reason=f"libcuda reports CUDA {driver_cuda} (minor-version compatibility within CUDA {need[0]})",
            **found,
        )
    branch, compat = branch_of_cuda(driver_cuda), version_tuple(compat_libcuda)
    if rule is not None and branch in rule.compat_branches and compat is not None and compat[0] > (branch or 0):
        return CudaPlan(  # the branch's minimum release (e.g. 470.57) cannot be checked: try, CPU if it fails
            "compat",
            reason=f"no driver version readable; libcuda reports CUDA {driver_cuda}, driver branch R{branch}: "
            f"forward compatibility through cuda-compat {compat_libcuda} (needs R{branch} >= "
            f"{rule.compat_branches[branch]}, unverified)",
            **found,
        )
    return CudaPlan("unsupported", reason=f"libcuda reports CUDA {driver_cuda}, older than CUDA {need[0]}", **found)


def plan_cuda(
    driver: str | None, needed: str | None, compat_libcuda: str | None = None, driver_cuda: str | None = None
) -> CudaPlan:
    """Route for CUDA ``needed`` (e.g. '12.8') on kernel driver ``driver`` (e.g. '470.256.02').

    ``compat_libcuda``: driver version of the cuda-compat package's libcuda (None: not in the image).
    ``driver_cuda``: the CUDA version the host's libcuda reports (cuDriverGetVersion), used only when the
    driver version itself is unknown. Native wins whenever the driver can run the runtime by itself: the
    compat libcuda on a non-data-centre GPU fails (CUDA error 804), and on a newer driver too (803).
    """
    found = dict(driver=driver, needed=needed, compat_libcuda=compat_libcuda)
    need = version_tuple(needed)
    if need is None:
        return CudaPlan(
            "cpu-build", reason="the installed torch/onnxruntime are CPU builds: nothing needs CUDA", **found
        )
    rule = CUDA_RULES.get(need[0])
    have = version_tuple(driver)
    if have is None:
        return _plan_from_reported_cuda(driver_cuda, need, rule, compat_libcuda, found)
    if rule is None:
        return CudaPlan("unsupported", reason=f"no compatibility rule for CUDA {needed}", **found)
    floor = version_tuple(rule.min_driver) or ()
    if have >= floor:
        return CudaPlan("native", reason=f"driver {driver} >= {rule.min_driver} runs any CUDA {rule.major}.x", **found)
    branch_min = rule.compat_branches.get(have[0])
    compat = version_tuple(compat_libcuda)
    if branch_min is None or have < (version_tuple(branch_min) or ()):
        branches = ", ".join(f"R{b}" for b in rule.compat_branches)
        return CudaPlan(
            "unsupported",
            reason=f"driver {driver} < {rule.min_driver}, and forward compatibility serves only {branches}",
            **found,
        )
    if compat is None or compat <= have:
        return CudaPlan(
            "unsupported",
            reason=f"driver {driver} needs the cuda-compat libraries of a newer driver, none found",
            **found,
        )
    return CudaPlan(
        "compat",
        reason=f"driver {driver} < {rule.min_driver}: forward compatibility through cuda-compat {compat_libcuda}",
        **found,
    )


def launch_environment(plan: CudaPlan, environ: Mapping[str, str], compat_dir: str = COMPAT_DIR) -> dict[str, str]:
    """The child's environment: :data:`ROUTE_ENV` set, ``compat_dir`` first on LD_LIBRARY_PATH for the compat route.

    :data:`COMPAT_OVERRIDE_ENV` = '1' / '0' forces the compat libraries on / off whatever the plan says.
    """
    env = dict(environ)
    override = environ.get(COMPAT_OVERRIDE_ENV, "").strip()
    use_compat = override == "1" or (plan.route == "compat" and override != "0")
    env[ROUTE_ENV] = "compat" if use_compat else ("native" if plan.route == "compat" else plan.route)
    if use_compat:
        rest = [p for p in environ.get("LD_LIBRARY_PATH", "").split(os.pathsep) if p and p != compat_dir]
        env["LD_LIBRARY_PATH"] = os.pathsep.join([compat_dir, *rest])
    return env


DEFAULT_CONSEQUENCE = (
    "every stack runs on the CPU, and large stacks are degraded to meet the time budget "
    "(level 1: no patch overlap, 2: stage 1 only, 3: the normalised input)"
)


def cuda_failure_message(
    driver: str | None,
    needed: str | None,
    started: bool,
    route: str | None = None,
    consequence: str = DEFAULT_CONSEQUENCE,
) -> str | None:
    """ERROR text when an NVIDIA driver is present but CUDA did not start; None otherwise.

    Names the driver, the CUDA the image needs with the drivers that run it, whether the cuda-compat
    libraries were tried (``route`` 'compat'), and ``consequence`` (CPU, degradation).
    """
    if started or driver is None or version_tuple(needed) is None:
        return None
    need = version_tuple(needed) or (0,)
    rule = CUDA_RULES.get(need[0])
    if rule is None:
        requirement = f"CUDA {needed}"
    else:
        branches = ", ".join(
            f"R{b}"
            for b, low in rule.compat_branches.items()
            if (version_tuple(low) or ()) < (version_tuple(rule.min_driver) or ())
        )
        requirement = f"CUDA {needed}: NVIDIA driver >= {rule.min_driver}" + (
            f", or a data-centre GPU on {branches} with the image's cuda-compat libraries" if branches else ""
        )
    tried = " (with the image's cuda-compat libraries)" if route == "compat" else ""
    return (
        f"NVIDIA driver {driver} found but CUDA did not start{tried}; this image needs {requirement}. "
        f"Consequence: {consequence}."
    )


# ---- readers (I/O at the edges; each takes its source as a parameter for tests) ----


def read_text(path: str) -> str | None:
    """A file's text, or None when it cannot be read."""
    try:
        return Path(path).read_text()
    except OSError:
        return None


def compat_libcuda_version(compat_dir: str = COMPAT_DIR) -> str | None:
    """Driver version of the cuda-compat libcuda in ``compat_dir`` (the target of libcuda.so.1), or None."""
    folder = Path(compat_dir)
    try:
        target = os.readlink(folder / "libcuda.so.1")
    except OSError:
        target = None
    if target:
        names = [target]
    else:
        names = sorted(p.name for p in folder.glob("libcuda.so.*.*")) if folder.is_dir() else []
    versions = [v for v in (libcuda_version_from_name(n) for n in names) if v]
    return max(versions, key=lambda v: version_tuple(v) or ()) if versions else None


def libcuda_cuda_version(loader: Callable[[str], object] = ctypes.CDLL) -> str | None:
    """The CUDA version the loadable libcuda.so.1 supports (cuDriverGetVersion, no cuInit), or None."""
    try:
        lib = loader("libcuda.so.1")
        value = ctypes.c_int(0)
        if lib.cuDriverGetVersion(ctypes.byref(value)) != 0:  # type: ignore[attr-defined]
            return None
    except (OSError, AttributeError):
        return None
    return cuda_from_driver_api(value.value)


def installed_cuda_builds() -> dict[str, str | None]:
    """CUDA version each installed GPU library was built for ({'torch': '12.6', 'onnxruntime': '12.8'}), without
    importing them.
    """
    builds: dict[str, str | None] = {}
    try:
        builds["torch"] = cuda_from_torch_version(importlib.metadata.version("torch"))
    except importlib.metadata.PackageNotFoundError:
        builds["torch"] = None
    spec = importlib.util.find_spec("onnxruntime")
    folders = list(spec.submodule_search_locations or []) if spec else []
    texts = [read_text(str(Path(f) / "capi" / "build_and_package_info.py")) for f in folders]
    builds["onnxruntime"] = next((cuda_from_ort_build_info(t) for t in texts if t), None)
    return builds


def host_plan(
    proc_path: str = NVIDIA_VERSION_FILE,
    compat_dir: str = COMPAT_DIR,
    *,
    run: Callable[..., subprocess.CompletedProcess] = subprocess.run,
    loader: Callable[[str], object] = ctypes.CDLL,
    builds: Callable[[], Mapping[str, str | None]] = installed_cuda_builds,
) -> CudaPlan:
    """:func:`plan_cuda` for this machine and the installed libraries (``run``: how nvidia-smi is run,
    ``loader``: how libcuda is loaded, ``builds``: the libraries' CUDA builds; tests pass fakes)."""
    driver = nvidia_driver_version(proc_path, run)  # /proc, else nvidia-smi (the one reader, in devices)
    driver_cuda = libcuda_cuda_version(loader) if driver is None else None
    return plan_cuda(driver, image_cuda(builds()), compat_libcuda_version(compat_dir), driver_cuda)


def log_cuda_failure(device: str, requested: str, driver: str | None, logger: logging.Logger = log) -> str | None:
    """Log (ERROR) and return :func:`cuda_failure_message` when a driver is present, CUDA was not
    explicitly declined (``requested`` != 'cpu') and the run's ``device`` is not 'cuda'."""
    if requested == "cpu":
        return None
    message = cuda_failure_message(
        driver, image_cuda(installed_cuda_builds()), device == "cuda", os.environ.get(ROUTE_ENV)
    )
    if message:
        logger.error("%s", message)
    return message


def main(
    argv: Sequence[str] | None = None, plan: CudaPlan | None = None, execve: Callable[..., object] = os.execve
) -> int:
    """Entry point: ``python -m fusemycells.runtime.cuda_support --exec SCRIPT [ARGS...]`` runs SCRIPT with the CUDA
    route applied (a new process when the loader path must change, else in this one);
    ``python -m fusemycells.runtime.cuda_support`` prints the plan as JSON. ``plan``/``execve``: for tests."""
    args = list(sys.argv[1:] if argv is None else argv)
    plan = host_plan() if plan is None else plan
    if not args or args[0] != "--exec" or len(args) < 2:
        import json

        print(json.dumps({**plan.as_report(), "builds": installed_cuda_builds()}, indent=2))
        return 0
    script, rest = args[1], args[2:]
    env = launch_environment(plan, os.environ)
    if plan.route in ("compat", "unsupported"):
        print(f"cuda: route {env[ROUTE_ENV]} ({plan.reason})", file=sys.stderr, flush=True)
    if env.get("LD_LIBRARY_PATH") != os.environ.get("LD_LIBRARY_PATH"):
        execve(sys.executable, [sys.executable, script, *rest], env)  # the loader reads LD_LIBRARY_PATH at start only
        return 0
    os.environ[ROUTE_ENV] = env[ROUTE_ENV]
    sys.argv = [script, *rest]
    sys.path.insert(0, str(Path(script).resolve().parent))
    runpy.run_path(script, run_name="__main__")
    return 0


if __name__ == "__main__":
    sys.exit(main())
