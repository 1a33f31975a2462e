"""grpo-rm-mm: GRPO-RM for mmpretrain and mmsegmentation (an OpenMMLab plugin)."""
import platform
import re
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

HERE = Path(__file__).parent


def requirements(name: str) -> list[str]:
    """Requirement lines of requirements/<name>.txt, without comments."""
    lines = (HERE / 'requirements' / f'{name}.txt').read_text().splitlines()
    return [re.sub(r'\s+#.*', '', ln).strip() for ln in lines
            if ln.strip() and not ln.startswith('#')]


class OptionalBuildExt(build_ext):
    """Build the fused objective's CPU kernel; where it cannot be built (no C++ compiler) the
    package still installs, and the objective runs its torch implementation
    (``grpo_rm_mm.core.backends.cpu_native.AVAILABLE`` is then False)."""

    def build_extension(self, ext: Extension) -> None:
        try:
            super().build_extension(ext)
        except Exception as err:  # a missing compiler raises several distutils error types
            self.warn(f'grpo_rm_mm: the CPU kernel {ext.name} was not built ({err}); the fused '
                      f'GRPO-RM objective will use its torch implementation on the CPU')


# No torch headers: the kernel takes data pointers, so it builds in seconds with any C++17
# compiler and does not depend on the torch version it runs with. One build per vector width:
# the portable one (16-byte vectors: SSE2, NEON) and, on x86-64, AVX2 + FMA and AVX-512; the
# package imports the widest one the CPU runs (grpo_rm_mm/core/backends/cpu_native.py). Loops
# aligned to 32 bytes: otherwise the kernel's speed moves with where an unrelated edit leaves
# its loops.
def kernel(name: str, vector_bytes: int, flags: list[str]) -> Extension:
    return Extension(
        f'grpo_rm_mm.core.{name}', sources=['grpo_rm_mm/core/csrc/objective_cpu.cpp'],
        language='c++',
        extra_compile_args=['-O3', '-std=c++17', '-fno-math-errno', '-Wno-psabi',
                            '-falign-loops=32',
                            f'-DGRPO_VECTOR_BYTES={vector_bytes}', f'-DGRPO_MODULE={name}',
                            *flags])


kernels = [kernel('_objective_cpu', 16, [])]
if platform.machine().lower() in ('x86_64', 'amd64'):
    kernels.append(kernel('_objective_cpu_avx2', 32, ['-mavx2', '-mfma']))
    kernels.append(kernel('_objective_cpu_avx512', 64, ['-mavx512f', '-mavx512dq', '-mavx512bw',
                                                        '-mavx512vl', '-mfma']))

version = re.search(r"__version__ = '([^']+)'",
                    (HERE / 'grpo_rm_mm' / 'version.py').read_text()).group(1)

setup(
    name='grpo_rm_mm',
    version=version,
    description='GRPO-RM (Group Relative Policy Optimization for Representation Models) '
                'for mmpretrain and mmsegmentation',
    long_description=(HERE / 'README.md').read_text() if (HERE / 'README.md').exists() else '',
    long_description_content_type='text/markdown',
    packages=find_packages(include=['grpo_rm_mm', 'grpo_rm_mm.*']),
    ext_modules=kernels,
    cmdclass={'build_ext': OptionalBuildExt},
    python_requires='>=3.9',
    # torch/torchvision are not pinned here so that a cluster's own CUDA build is kept; the
    # tested pair (2.14.1 / 0.29.1) is pinned in requirements/build.txt and requirements/lock.txt.
    install_requires=['torch>=2.1', 'torchvision>=0.16'] + requirements('runtime'),
    extras_require={'demo': requirements('demo'), 'tests': requirements('tests')},
    license='Apache-2.0',
    zip_safe=False,
)
