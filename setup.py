"""dfa-fast: fast, faithful DisEnt / LfF / Vanilla training for debiased image classification."""
from setuptools import setup

setup(
    name="dfa-fast",
    version="0.1.0",
    description="DisEnt (disentangled feature augmentation) training with FFCV, DeepSpeed and Triton",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["dfa_fast", "dfa_fast.data", "dfa_fast.kernels"],
    # The Triton kernels live in the top-level kernels/ folder and install as dfa_fast.kernels.
    package_dir={"dfa_fast": "dfa_fast", "dfa_fast.kernels": "kernels"},
    package_data={"dfa_fast": ["presets/*.yaml"]},
    # Ranges that a CUDA install also satisfies; the pinned CPU recipe is requirements-cpu.txt.
    install_requires=[
        "torch>=2.4",
        "triton>=3.0",
        "deepspeed>=0.15",
        "ffcv>=1.0.2",
        "numba>=0.58",
        "numpy>=1.24",
        "pillow>=10",
        "opencv-python>=4.8",
        "scipy>=1.11",
        "imagecorruptions-imaug>=1.1.5",
        "pyyaml>=6",
        "tqdm>=4.60",
        "matplotlib>=3.7",
    ],
    extras_require={"test": ["pytest>=8"]},
    entry_points={"console_scripts": ["dfa-fast=dfa_fast.cli:main"]},
)
