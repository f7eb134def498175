"""Geom-Erasing: implicit concept removal for text-to-image diffusion models.

The repository keeps the architecture's folders at the top level (``core/``,
``kernels/``, ``distributed/``, ``data/``, ``benchmarks/``) but installs them all
under the single import name ``geomerase`` so nothing named ``core`` or ``data``
ever lands in site-packages.
"""
from setuptools import setup

PACKAGES = {
    "geomerase": "geomerase",
    "geomerase.core": "core",
    "geomerase.kernels": "kernels",
    "geomerase.distributed": "distributed",
    "geomerase.data": "data",
    "geomerase.benchmarks": "benchmarks",
    "geomerase.configs": "configs",
}

# torch is pinned to the release these machines carry as a local CPU wheel; a
# looser range lets pip resolve a multi-GB CUDA build on a GPU-less machine.
INSTALL_REQUIRES = [
    "torch==2.13.0",
    "diffusers==0.42.1",
    "transformers==5.24.0",
    "accelerate==1.15.0",
    "safetensors==0.8.0",
    "triton==3.9.0",
    "webdataset==1.0.2",
    "qrcode>=7.4",
    "opencv-python-headless>=4.8",
    "pillow>=10",
    "numpy>=1.24",
    "pyyaml>=6",
    "tqdm>=4.66",
    "peft==0.21.2",
    "matplotlib>=3.7",
]

EXTRAS = {
    "distributed": ["deepspeed==0.19.8", "ray[data]==2.60.0"],
    "dali": ["nvidia-dali-cuda120==2.4.0"],
    # text-ppocr also reads the PP-OCRv4 detection model from the rapidocr-onnxruntime==1.4.4 wheel,
    # installed with --no-deps by scripts/setup.sh: its opencv-python requirement would replace the
    # headless OpenCV above with a build that needs libGL.
    "detectors": ["pytesseract>=0.3.10", "pyzbar>=0.1.9", "onnxruntime==1.31.1"],
    # scikit-image: the sample photos of the detector tests and benchmarks (skimage.data, bundled)
    "test": ["pytest>=8", "scikit-image==0.26.0"],
    # xformers only ships CUDA operators; never install it on a CPU machine.
    "gpu": ["xformers==0.0.35"],
}

setup(
    name="geomerase",
    version="0.1.0",
    description="Geom-Erasing: remove implicit concepts (QR codes, watermarks, text) while fine-tuning diffusion models",
    python_requires=">=3.10",
    packages=list(PACKAGES),
    package_dir=PACKAGES,
    # The shipped base models (core/builtin.py): fp16 safetensors, configs and sha256 manifests.
    package_data={"geomerase.configs": ["*.yaml"], "geomerase": ["weights/*/*.json", "weights/*/*/*"]},
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["geomerase=geomerase.cli:main"]},
)
