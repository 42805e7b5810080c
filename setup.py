"""Installs fastpixel. Imports nothing heavy: an isolated build must not pull in torch.

The C++ engine in csrc/ is compiled on first use (fastpixel/extension.py), not here; the
Triton kernels in kernels/ install as the subpackage fastpixel.kernels.
"""
from setuptools import find_packages, setup

# 3.7 at least: the interpreter the tests run the kernels in (TRITON_INTERPRET=1) reads a runtime
# loop bound with int() of a one-element array in 3.6, an error since NumPy 2.4
# (tests/test_triton_interpreter.py). A GPU machine's own Triton 3.6 still compiles the kernels.
_TRITON = "triton>=3.7; platform_system == 'Linux' and platform_machine == 'x86_64'"

setup(
    name="fastpixel",
    version="0.1.0",
    description="PixelCNN++ in PyTorch with fast, exact cached sampling",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # csrc/ travels as data (fastpixel/csrc/step.cpp), for the engine's build on first use
    packages=["fastpixel", *(f"fastpixel.{name}" for name in find_packages("fastpixel")), "fastpixel.kernels",
              "fastpixel.csrc"],
    package_dir={"fastpixel": "fastpixel", "fastpixel.kernels": "kernels", "fastpixel.csrc": "csrc"},
    package_data={"fastpixel": ["weights/*.safetensors", "weights/README.md"], "fastpixel.csrc": ["*.cpp"]},
    install_requires=[
        "torch",  # never pinned: GPU machines bring their own build
        "numpy",
        "pillow",
        "tqdm",
        "safetensors",
        "matplotlib",  # training curves and benchmark plots
        "constriction",  # the codec's range coder (fastpixel.encode / decode)
    ],
    # Triton runs the GPU path; CUDA builds of torch bring it, and the CPU path never imports it.
    # The tests run its kernels in its CPU interpreter.
    extras_require={"test": ["pytest", "pytest-benchmark", "import-linter", _TRITON], "triton": [_TRITON]},
)
