"""Packaging: ``pip install -e ".[dev]"`` installs the library, its command and the test tools."""
from setuptools import find_packages, setup

setup(
    name="ccmh",
    version="0.1.0",
    description="Continual cross-modal hashing: CASH, PBEH, CAGMH, SCAHN, DCMHT and DSPH on shared CLIP "
                "features, with one runner, one metric module and servable binary indexes",
    long_description=open("README.md", encoding="utf-8").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # The packages keep the repository's top-level names (the layout a user works in at the
    # root); main.py stays out of the install, so `import main` elsewhere never finds it.
    packages=find_packages(include=["common", "common.*", "dataset", "dataset.*", "models", "models.*",
                                    "runners", "runners.*", "utils", "utils.*"]),
    # torch and torchvision are left unpinned on purpose so pip resolves a matching pair
    # (open_clip imports torchvision; a lone CPU-only torch wheel breaks that import).
    install_requires=[
        "torch>=2.1",
        "torchvision",
        "open_clip_torch>=2.24",
        "numpy>=1.24",
        "scipy>=1.10",
        "pyyaml>=6.0",
        "h5py>=3.8",
        "tqdm>=4.60",
        "tensorboard>=2.12",
        "matplotlib>=3.7",
        "pillow>=9.0",
        "numba>=0.60",  # the sort-free mAP kernel of common/metrics/numba_engine.py (NumPy fallback without it)
    ],
    extras_require={
        # FAISS binary indexes: index, search and serve (training, evaluate and compare do not need it)
        "index": ["faiss-cpu>=1.7.4"],
        # the HTTP search service (serve); httpx is its tests' client
        "serve": ["faiss-cpu>=1.7.4", "fastapi>=0.110", "uvicorn>=0.29", "httpx>=0.27"],
        "dev": ["pytest>=7.0", "faiss-cpu>=1.7.4", "fastapi>=0.110", "uvicorn>=0.29", "httpx>=0.27"],
    },
    entry_points={"console_scripts": ["ccmh=runners.cli:main"]},
    license="MIT",
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
