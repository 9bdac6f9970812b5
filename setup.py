import shutil
from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

SHIPPED = ("models", "configs", "ds_configs")  # found by name at run time (agvm_ds/resources.py)


class BuildWithShippedDefinitions(build_py):
    """Copies models/, configs/ and ds_configs/ into the built package as agvm_ds/shipped/<folder>."""

    def run(self):
        super().run()
        for folder in SHIPPED:
            shutil.copytree(folder, Path(self.build_lib) / "agvm_ds" / "shipped" / folder, dirs_exist_ok=True)


setup(
    name="agvm-ds",
    version="0.1.0",
    description="Large-batch training of dense visual predictors with AGVM on DeepSpeed",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["agvm_ds", "agvm_ds.*", "ltcr", "ltcr.*"]),
    package_data={"ltcr": ["configs/*.yaml"]},
    install_requires=[
        # torch from the package index (its CUDA build also runs on CPU); torchvision wheels link
        # libtorch_cuda, so a CPU-only torch wheel would break `import torchvision` and timm.
        "torch>=2.11",
        "torchvision>=0.26",
        "deepspeed>=0.19.8,<0.20",
        "timm>=1.0",
        "pycocotools>=2.0.7",
        "safetensors",  # agvm-export's file format
        "pyyaml",
        "tqdm",
        "matplotlib",
        "tensorboard",
    ],
    extras_require={
        # LTCR's environments; the box2d extra (Box2D + pygame-ce) is LunarLander-v3's. The detection trainer
        # does not need them: `pip install agvm-ds` leaves them out, `pip install agvm-ds[ltcr]` brings them.
        "ltcr": ["gymnasium[box2d]>=1.0"],
        # torchmetrics: the tests' cross-check of panoptic quality, not a run-time dependency
        "dev": ["pytest>=8", "pytest-timeout", "ruff>=0.8", "mkdocs>=1.6", "torchmetrics>=1.4"],
    },
    cmdclass={"build_py": BuildWithShippedDefinitions},
    entry_points={
        "console_scripts": [
            "agvm-train=agvm_ds.commands.train:main",
            "agvm-model-info=agvm_ds.commands.model_info:main",
            "agvm-plot=agvm_ds.commands.plot:main",
            "agvm-eval=agvm_ds.commands.evaluate:main",
            "agvm-predict=agvm_ds.commands.predict:main",
            "agvm-export=agvm_ds.commands.export:main",
            "ltcr-train=ltcr.cli:main",
        ]
    },
)
