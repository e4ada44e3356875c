"""megabranch package: console scripts and (when a compiler is present) the fused kernels."""

import importlib.util
import os

from setuptools import find_packages, setup

_HERE = os.path.dirname(os.path.abspath(__file__))


def _extensions():
    """The fused kernels (kernels/build.py is the one build recipe, shared with the JIT path). A missing
    compiler or a failing compile never fails the install: megabranch then JIT-builds or runs eager."""
    try:
        spec = importlib.util.spec_from_file_location(
            "megabranch_kernels_build", os.path.join(_HERE, "kernels", "build.py")
        )
        build = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(build)
        return build.setup_extensions(_HERE)
    except Exception as e:  # the extensions are optional
        print(f"megabranch: skipping the fused kernels ({type(e).__name__}: {e})")
        return [], {}


_EXT_MODULES, _CMDCLASS = _extensions()

setup(
    name="megabranch",
    version="0.1.0",
    description="Megatron-style trainer for extremely deep encoder-decoder Transformers (BranchNorm, DeepNorm)",
    packages=find_packages(include=["megabranch", "megabranch.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        "numpy",
        "sentencepiece",
        "sacrebleu>=2.0",
        "tensorboard",
        "PyYAML",
        "safetensors>=0.4",
    ],
    extras_require={"deepspeed": ["deepspeed==0.19.8"], "plot": ["matplotlib"], "test": ["pytest"]},
    ext_modules=_EXT_MODULES,
    cmdclass=_CMDCLASS,
    entry_points={
        "console_scripts": [
            "megabranch-preprocess=megabranch.data.preprocess:main",
            "megabranch-train=megabranch.train:main",
            "megabranch-generate=megabranch.generate:main",
            "megabranch-convert=megabranch.convert.cli:main",
        ]
    },
)
