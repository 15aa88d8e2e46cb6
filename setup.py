#nsml: pytorch/pytorch:2.4.0-cuda12.4-cudnn9-runtime
"""NSML reads this file at session start (the image above, ``install_requires``);
on any other machine ``pip install -e .`` installs the kit's packages and ``main``."""
from setuptools import find_packages, setup

setup(
    name="retrieval-kit",
    version="0.1.0",
    description="Ensemble and re-ranking competition kit for image retrieval (NSML AI Vision style)",
    python_requires=">=3.10",
    packages=find_packages(include=["competition", "competition.*", "rerank", "rerank.*", "backbones",
                                    "backbones.*", "ensemble", "ensemble.*", "tuning", "tuning.*"]),
    py_modules=["main"],
    install_requires=[
        "torch>=2.1",
        "torchvision",
        "timm>=1.0",
        "faiss-cpu>=1.7.4",
        "numpy>=1.24",
        "scipy",
        "scikit-learn",
        "optuna>=3.4",
        "pillow",
        "safetensors",
        "tqdm",
        "matplotlib",
    ],
    extras_require={
        "gpu": ["faiss-gpu"],
        "test": ["pytest"],
    },
)
