"""CUDA on the host's driver: the route over fake drivers and fake nvidia-smi / /proc / libcuda answers,
the launcher's environment, the ERROR text, and the image's pins agreeing with the chosen CUDA."""

from __future__ import annotations

import ctypes
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from fusemycells.runtime import cuda_support as cs
from fusemycells.runtime.cuda_support import plan_cuda
from fusemycells.runtime.devices import nvidia_driver_version, parse_driver_version, parse_nvidia_smi_version

REPO = Path(__file__).resolve().parent.parent

PROC_PROPRIETARY = "NVRM version: NVIDIA UNIX x86_64 Kernel Module  470.256.02  Thu May  2 14:37:44 UTC 2024\nGCC version:  gcc version 7.3.1\n"
PROC_OPEN = "NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  570.133.20  Release Build  (dvs-builder@U16-I3-B03-4-3)\n"


def test_driver_versions_are_read_from_proc_nvidia_smi_and_libcuda_names():
    assert parse_driver_version(PROC_PROPRIETARY) == "470.256.02"
    assert parse_driver_version(PROC_OPEN) == "570.133.20"
    assert parse_driver_version("no driver here") is None
    assert parse_nvidia_smi_version("535.104.05\n535.104.05\n") == "535.104.05"
    assert parse_nvidia_smi_version("NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver.") is None
    assert cs.libcuda_version_from_name("/usr/local/cuda/compat/libcuda.so.560.35.05") == "560.35.05"
    assert cs.libcuda_version_from_name("libcuda.so.1") is None
    assert cs.cuda_from_driver_api(12020) == "12.2" and cs.cuda_from_driver_api(11040) == "11.4" and cs.cuda_from_driver_api(0) is None


def test_library_builds_name_their_cuda():
    assert cs.cuda_from_torch_version("2.13.0+cu126") == "12.6"
    assert cs.cuda_from_torch_version("2.13.0+cu130") == "13.0"
    assert cs.cuda_from_torch_version("2.13.0+cpu") is None and cs.cuda_from_torch_version("2.13.0") is None
    assert cs.cuda_from_ort_build_info("package_name = 'onnxruntime-gpu'\n__version__ = '1.26.0'\ncuda_version = '12.8'\n") == "12.8"
    assert cs.cuda_from_ort_build_info("package_name = 'onnxruntime'\n__version__ = '1.26.0'\n") is None
    assert cs.image_cuda({"torch": "12.6", "onnxruntime": "12.8"}) == "12.8"
    assert cs.image_cuda({"torch": None, "onnxruntime": None}) is None


@pytest.mark.parametrize(
    ("driver", "compat", "route"),
    [
        ("580.95.05", "560.35.05", "native"),  # newer than the compat libcuda: the host's own driver
        ("570.133.20", "560.35.05", "native"),
        ("550.54.15", "560.35.05", "native"),  # minor-version compatibility, no compat needed
        ("535.104.05", "560.35.05", "native"),
        ("525.60.13", None, "native"),  # the CUDA 12 floor itself
        ("470.256.02", "560.35.05", "compat"),  # SageMaker's g4dn driver: forward compatibility
        ("470.57.02", "560.35.05", "compat"),
        ("470.256.02", None, "unsupported"),  # R470 without the compat package in the image
        ("470.42.01", "560.35.05", "unsupported"),  # R470 older than 470.57
        ("450.80.02", "560.35.05", "unsupported"),  # a branch forward compatibility does not serve
        ("520.61.05", "560.35.05", "unsupported"),
        (None, "560.35.05", "no-driver"),
    ],
)
def test_the_cuda_12_image_routes_each_driver(driver, compat, route):
    plan = plan_cuda(driver, "12.8", compat)
    assert plan.route == route, plan.reason
    assert plan.driver == driver and plan.needed == "12.8"


@pytest.mark.parametrize(
    ("driver", "route"),
    [("580.65.06", "native"), ("575.57.08", "compat"), ("570.133.20", "compat"), ("535.104.05", "compat"), ("470.256.02", "unsupported"), ("545.29.06", "unsupported")],
)
def test_a_cuda_13_image_would_need_compat_below_580_and_cannot_run_on_r470(driver, route):
    assert plan_cuda(driver, "13.0", "580.82.07").route == route


def test_libcuda_answers_decide_when_the_driver_version_is_unknown():
    assert plan_cuda(None, "12.8", None, driver_cuda="12.2").route == "native"  # R535 reports CUDA 12.2
    assert plan_cuda(None, "12.8", None, driver_cuda="11.4").route == "unsupported"  # R470 reports 11.4, no compat libs
    assert plan_cuda(None, "12.8", "470.256.02", driver_cuda="11.4").route == "unsupported"  # compat libs not newer
    assert plan_cuda(None, "12.8", "560.35.05", driver_cuda="11.2").route == "unsupported"  # R460: no forward compat
    assert plan_cuda(None, "13.0", "580.82.07", driver_cuda="11.4").route == "unsupported"  # CUDA 13 does not serve R470
    assert plan_cuda("470.256.02", None).route == "cpu-build"
    assert plan_cuda("470.256.02", "12.8", "470.256.02").route == "unsupported"  # a compat libcuda not newer than the driver


def test_compat_route_puts_the_compat_libraries_first_once_and_other_routes_leave_the_loader_path():
    compat = plan_cuda("470.256.02", "12.8", "560.35.05")
    env = cs.launch_environment(compat, {"LD_LIBRARY_PATH": f"/usr/local/nvidia/lib{os.pathsep}/usr/local/cuda/compat"}, "/usr/local/cuda/compat")
    assert env["LD_LIBRARY_PATH"] == f"/usr/local/cuda/compat{os.pathsep}/usr/local/nvidia/lib"
    assert env[cs.ROUTE_ENV] == "compat"
    native = cs.launch_environment(plan_cuda("550.54.15", "12.8", "560.35.05"), {"LD_LIBRARY_PATH": "/x"})
    assert native["LD_LIBRARY_PATH"] == "/x" and native[cs.ROUTE_ENV] == "native"
    assert "LD_LIBRARY_PATH" not in cs.launch_environment(plan_cuda(None, "12.8"), {})


def test_the_compat_override_forces_the_libraries_on_or_off():
    compat = plan_cuda("470.256.02", "12.8", "560.35.05")
    off = cs.launch_environment(compat, {cs.COMPAT_OVERRIDE_ENV: "0"})
    assert "LD_LIBRARY_PATH" not in off and off[cs.ROUTE_ENV] == "native"
    on = cs.launch_environment(plan_cuda("550.54.15", "12.8"), {cs.COMPAT_OVERRIDE_ENV: "1"}, "/c")
    assert on["LD_LIBRARY_PATH"] == "/c" and on[cs.ROUTE_ENV] == "compat"


def test_the_error_names_driver_needed_cuda_the_drivers_that_run_it_and_the_consequence():
    message = cs.cuda_failure_message("470.256.02", "12.8", started=False, route="compat")
    assert message is not None
    for part in ("470.256.02", "CUDA 12.8", ">= 525.60.13", "R470", "cuda-compat", "CPU", "degraded", "time budget"):
        assert part in message, part
    assert "with the image's cuda-compat libraries)" in message  # it says the compat route was tried
    assert "R470" not in (cs.cuda_failure_message("535.104.05", "13.0", started=False) or "")  # CUDA 13 forward compatibility has no R470
    custom = cs.cuda_failure_message("535.104.05", "12.8", started=False, consequence="level 2 for big.tif")
    assert custom is not None and custom.endswith("level 2 for big.tif.")
    assert cs.cuda_failure_message("470.256.02", "12.8", started=True) is None
    assert cs.cuda_failure_message(None, "12.8", started=False) is None  # no driver: a CPU host, nothing went wrong


def test_cuda_failure_is_logged_as_error_only_when_a_driver_is_there_and_cuda_was_wanted(caplog: pytest.LogCaptureFixture):
    logger = logging.getLogger("test.cuda_support")
    with caplog.at_level(logging.INFO, logger="test.cuda_support"):
        assert cs.log_cuda_failure("cpu", "cpu", "470.256.02", logger) is None  # --device cpu: declined, not failed
        assert cs.log_cuda_failure("cuda", "auto", "470.256.02", logger) is None
        assert cs.log_cuda_failure("cpu", "auto", None, logger) is None
        needed = cs.image_cuda(cs.installed_cuda_builds())
        message = cs.log_cuda_failure("cpu", "auto", "470.256.02", logger)
    if needed is None:  # CPU builds of both libraries: nothing in this environment needs CUDA
        assert message is None and not caplog.records
        return
    assert message is not None and "470.256.02" in message
    assert [r.levelname for r in caplog.records] == ["ERROR"] and caplog.records[0].getMessage() == message


def test_host_driver_comes_from_proc_else_nvidia_smi(tmp_path: Path):
    proc = tmp_path / "version"
    proc.write_text(PROC_OPEN)
    calls: list[list[str]] = []

    def smi(cmd, **_kw):
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 0, stdout="535.104.05\n", stderr="")

    assert nvidia_driver_version(str(proc), smi) == "570.133.20" and calls == []
    assert nvidia_driver_version(str(tmp_path / "missing"), smi) == "535.104.05" and calls[0][0] == "nvidia-smi"

    def no_smi(cmd, **_kw):
        raise FileNotFoundError(cmd[0])

    def broken(cmd, **_kw):
        return subprocess.CompletedProcess(cmd, 9, stdout="", stderr="Failed to initialize NVML")

    assert nvidia_driver_version(str(tmp_path / "missing"), no_smi) is None
    assert nvidia_driver_version(str(tmp_path / "missing"), broken) is None


def test_compat_libcuda_version_follows_the_libcuda_link(tmp_path: Path):
    (tmp_path / "libcuda.so.560.35.05").write_bytes(b"")
    (tmp_path / "libcuda.so.1").symlink_to("libcuda.so.560.35.05")
    assert cs.compat_libcuda_version(str(tmp_path)) == "560.35.05"
    (tmp_path / "libcuda.so.1").unlink()
    (tmp_path / "libcuda.so.9.100.1").write_bytes(b"")
    assert cs.compat_libcuda_version(str(tmp_path)) == "560.35.05"  # newest file by version, not by name
    assert cs.compat_libcuda_version(str(tmp_path / "absent")) is None


def test_libcuda_answer_comes_from_cu_driver_get_version():
    class FakeLibcuda:
        def __init__(self, value: int, status: int = 0) -> None:
            self.value, self.status = value, status

        def cuDriverGetVersion(self, ref) -> int:  # noqa: N802 (the C name)
            ref._obj.value = self.value
            return self.status

    assert cs.libcuda_cuda_version(lambda _name: FakeLibcuda(12020)) == "12.2"
    assert cs.libcuda_cuda_version(lambda _name: FakeLibcuda(12020, status=100)) is None

    def missing(name: str) -> ctypes.CDLL:
        raise OSError(f"{name}: cannot open shared object file")

    assert cs.libcuda_cuda_version(missing) is None


def test_launcher_runs_the_script_in_process_unless_the_loader_path_must_change(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    script = tmp_path / "script.py"
    out = tmp_path / "out.txt"
    script.write_text("import os, sys\nopen(sys.argv[2], 'w').write(sys.argv[1] + ' ' + os.environ['FUSEMYCELLS_CUDA_ROUTE'])\n")
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setenv(cs.ROUTE_ENV, "")
    monkeypatch.delenv(cs.COMPAT_OVERRIDE_ENV, raising=False)

    def no_exec(*args):
        raise AssertionError(f"unexpected exec {args}")

    assert cs.main(["--exec", str(script), "hello", str(out)], plan=plan_cuda("550.54.15", "12.8"), execve=no_exec) == 0
    assert out.read_text() == "hello native"
    seen = []
    assert cs.main(["--exec", str(script), "a"], plan=plan_cuda("470.256.02", "12.8", "560.35.05"), execve=lambda *a: seen.append(a)) == 0
    (exe, argv, env), = seen
    assert exe == sys.executable and argv == [sys.executable, str(script), "a"]
    assert env["LD_LIBRARY_PATH"].split(os.pathsep)[0] == cs.COMPAT_DIR and env[cs.ROUTE_ENV] == "compat"


def test_the_image_pins_agree_with_the_cuda_12_choice():
    dockerfile = (REPO / "Dockerfile").read_text()
    base = re.search(r"^FROM .*nvidia/cuda:(\d+)\.(\d+)\.\d+-base-ubuntu[\d.]+\s*$", dockerfile, re.M)
    torch_index = re.search(r"download\.pytorch\.org/whl/cu(\d+)(\d)\b", dockerfile)
    assert base and torch_index, "Dockerfile: nvidia/cuda base tag and PyTorch index not found"
    torch_cuda = f"{torch_index.group(1)}.{torch_index.group(2)}"
    assert torch_cuda == cs.IMAGE_BUILDS["torch"] == f"{base.group(1)}.{base.group(2)}"  # the compat package matches torch
    requirements = (REPO / "requirements.txt").read_text()
    assert re.search(r"^onnxruntime-gpu==1\.26\.0$", requirements, re.M)  # the last PyPI release built for CUDA 12 (12.8)
    assert re.search(r"^torch==2\.13\.0$", requirements, re.M)
    needed = cs.image_cuda(cs.IMAGE_BUILDS)
    assert plan_cuda("470.256.02", needed, "560.35.05").route == "compat"  # a T4 on SageMaker's R470
    assert plan_cuda("535.104.05", needed).route == "native"
    assert 'ENTRYPOINT ["python", "-m", "fusemycells.runtime.cuda_support", "--exec", "inference.py"]' in dockerfile
    readme = (REPO / "README.md").read_text()
    for fact in ("onnxruntime-gpu 1.26.0", "cu126", "nvidia/cuda:12.6.3-base-ubuntu24.04", "525.60.13"):
        assert fact in readme, fact


@pytest.mark.cuda
@pytest.mark.skipif(cs.host_plan().route not in ("native", "compat") or cs.image_cuda(cs.installed_cuda_builds()) is None, reason="needs an NVIDIA driver and CUDA builds of the libraries")
def test_cuda_starts_on_this_hosts_driver_as_planned():
    import torch

    plan = cs.host_plan()
    assert torch.cuda.is_available(), plan.reason
    assert cs.cuda_failure_message(plan.driver, plan.needed, torch.cuda.is_available()) is None
    torch_cuda = cs.installed_cuda_builds()["torch"]
    assert torch_cuda is not None and torch.version.cuda is not None and torch.version.cuda.startswith(torch_cuda.split(".")[0] + ".")


class FakeLibcuda:
    """libcuda.so.1 whose cuDriverGetVersion reports ``value`` (e.g. 11040: CUDA 11.4, an R470 driver)."""

    def __init__(self, value: int) -> None:
        self.value = value

    def __call__(self, name: str) -> FakeLibcuda:
        assert name == "libcuda.so.1"
        return self

    def cuDriverGetVersion(self, pointer) -> int:  # the driver API's name
        pointer._obj.value = self.value
        return 0


def no_nvidia_smi(*args, **kwargs):
    raise FileNotFoundError("nvidia-smi")


def test_r470_without_the_proc_driver_file_or_nvidia_smi_tries_the_compat_route(tmp_path: Path):
    compat = tmp_path / "compat"
    compat.mkdir()
    (compat / "libcuda.so.560.35.05").write_bytes(b"")
    os.symlink("libcuda.so.560.35.05", compat / "libcuda.so.1")
    plan = cs.host_plan(
        str(tmp_path / "no-proc-file"), str(compat), run=no_nvidia_smi, loader=FakeLibcuda(11040), builds=lambda: {"torch": "12.6", "onnxruntime": "12.8"}
    )
    assert plan.route == "compat" and plan.driver is None and plan.compat_libcuda == "560.35.05"
    assert "R470" in plan.reason and "11.4" in plan.reason
    env = cs.launch_environment(plan, {}, str(compat))
    assert env["LD_LIBRARY_PATH"] == str(compat) and env[cs.ROUTE_ENV] == "compat"
    without_compat = cs.host_plan(
        str(tmp_path / "no-proc-file"), str(tmp_path / "none"), run=no_nvidia_smi, loader=FakeLibcuda(11040), builds=lambda: {"torch": "12.6"}
    )
    assert without_compat.route == "unsupported"
    newer = cs.host_plan(str(tmp_path / "no-proc-file"), str(compat), run=no_nvidia_smi, loader=FakeLibcuda(12020), builds=lambda: {"torch": "12.6"})
    assert newer.route == "native"  # R535 reports CUDA 12.2: minor-version compatibility, no compat libraries
