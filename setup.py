#nsml: pytorch/pytorch:2.7.0-cuda12.6-cudnn9-runtime
"""NSML reads this file at session start (the image above, ``install_requires``);
on any other machine ``pip install -e .`` installs the kit's packages and ``main``.

Exactly one faiss is installed, never both (they share the ``faiss/`` package): faiss-gpu
where the machine or image is made for NVIDIA GPUs (a loaded NVIDIA driver, or
``NVIDIA_VISIBLE_DEVICES`` as the CUDA images set it), faiss-cpu elsewhere;
``RETRIEVAL_KIT_FAISS=gpu`` or ``=cpu`` decides instead. faiss-gpu's wheels link the CUDA 12
runtime wheels at >= 12.6 (nvidia-cuda-runtime-cu12, nvidia-cublas-cu12), and torch pins those
wheels (its PyPI wheels pin 12.6 from 2.7 on), so a GPU install asks for torch >= 2.7 and the
image above carries torch 2.7.0 built for CUDA 12.6.
"""
import os

from setuptools import find_packages, setup

FAISS_CPU = "faiss-cpu>=1.7.4"
FAISS_GPU = "faiss-gpu>=1.14.3,<2"    # Meta's CUDA 12 wheels: nvidia-cuda-runtime-cu12 / -cublas-cu12 >= 12.6
FAISS_GPU_CUDA = (12, 6)
TORCH = "torch>=2.3"                  # torch.amp.GradScaler(device, ...)
TORCH_GPU = "torch>=2.7"              # torch 2.7's wheels pin CUDA runtime 12.6.77 (2.4's: 12.4.99 or 12.1.105)
FAISS_CHOICE_ENV = "RETRIEVAL_KIT_FAISS"
TENSORBOARD = "tensorboard>=1.15"     # what torch.utils.tensorboard.SummaryWriter asks for
PYTHON_REQUIRES = ">=3.11"            # tomllib (recipes); the NSML image above carries Python 3.11
EXTRAS = {
    "test": ["pytest", "scikit-learn", "packaging"],   # sklearn: the reference the metrics are tested against
    "tensorboard": [TENSORBOARD],         # --tensorboard DIR of training and tuning
}


def faiss_choice(environ=os.environ, driver: str = "/proc/driver/nvidia/version") -> str:
    """``"gpu"`` or ``"cpu"``: the faiss build this machine gets (see the module docstring)."""
    asked = environ.get(FAISS_CHOICE_ENV, "").strip().lower()
    if asked in ("gpu", "cpu"):
        return asked
    if asked:
        raise SystemExit(f"{FAISS_CHOICE_ENV}={asked!r}: use gpu or cpu")
    visible = environ.get("NVIDIA_VISIBLE_DEVICES", "").strip().lower()
    return "gpu" if os.path.exists(driver) or visible not in ("", "void", "none") else "cpu"


def requirements(choice: str) -> list[str]:
    """``install_requires`` for a ``faiss_choice``."""
    gpu = choice == "gpu"
    return [
        TORCH_GPU if gpu else TORCH,
        FAISS_GPU if gpu else FAISS_CPU,
        "torchvision",
        "timm>=1.0",
        "huggingface_hub>=1.0",   # --pretrained timm / hf-hub:; huggingface_hub.errors.RemoteEntryNotFoundError
        "numpy>=1.24",
        "scipy",
        "threadpoolctl>=3",    # rerank: one BLAS thread per worker thread
        "optuna>=4.0",         # optuna.storages.journal.JournalFileBackend
        "sqlalchemy>=1.4",     # (optuna's) the recipe checks an RDB storage's driver before any work
        "tomli_w",             # writes recipes (reading them is the standard library's tomllib)
        "pillow",
        "safetensors",
        "tqdm",
        "matplotlib",
    ]


setup(
    name="retrieval-kit",
    version="0.1.0",
    description="Ensemble and re-ranking competition kit for image retrieval (NSML AI Vision style)",
    python_requires=PYTHON_REQUIRES,
    packages=find_packages(include=["competition", "competition.*", "rerank", "rerank.*", "backbones",
                                    "backbones.*", "ensemble", "ensemble.*", "tuning", "tuning.*"]),
    py_modules=["main"],
    install_requires=requirements(faiss_choice()),
    extras_require=EXTRAS,
)
