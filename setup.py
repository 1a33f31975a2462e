"""grpo-rm-mm: GRPO-RM for mmpretrain and mmsegmentation (an OpenMMLab plugin)."""
import re
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent


def requirements(name: str) -> list[str]:
    """Requirement lines of requirements/<name>.txt, without comments."""
    lines = (HERE / 'requirements' / f'{name}.txt').read_text().splitlines()
    return [re.sub(r'\s+#.*', '', ln).strip() for ln in lines
            if ln.strip() and not ln.startswith('#')]


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
    python_requires='>=3.9',
    # torch/torchvision are not pinned here so that a cluster's own CUDA build is kept; the
    # tested pair (2.14.1 / 0.29.1) is pinned in requirements/build.txt and requirements/lock.txt.
    install_requires=['torch>=2.1', 'torchvision>=0.16'] + requirements('runtime'),
    extras_require={'demo': requirements('demo'), 'tests': requirements('tests')},
    license='Apache-2.0',
    zip_safe=False,
)
