"""Build script for moelora.

`kernels/` (Triton) is installed as the subpackage `moelora.kernels`: a top-level module
named `kernels` would shadow Hugging Face's `kernels` package, which transformers imports.
"""
from setuptools import setup

setup(
    name="moelora",
    version="0.1.0",
    description="Fused kernels for mixture-of-LoRA-experts layers",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["moelora", "moelora.ops", "moelora.kernels"],
    package_dir={"moelora": "moelora", "moelora.kernels": "kernels"},
    install_requires=[
        # custom_op / register_fake / register_autograd / opcheck are stable from 2.5.
        "torch>=2.5",
        # Triton ships Linux wheels only; elsewhere the torch backend serves.
        "triton>=3.1; platform_system == 'Linux'",
    ],
    extras_require={
        "test": ["pytest>=7", "pytest-benchmark>=4", "numpy"],
    },
)
