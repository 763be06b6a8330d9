"""dsv3-jax: DeepSeek-V3 in JAX/Flax."""

import setuptools

setuptools.setup(
    name="dsv3-jax",
    version="0.1.0",
    description="A JAX/Flax reimplementation of DeepSeek-V3 (MLA, DeepSeekMoE, MTP).",
    python_requires=">=3.11",
    packages=["dsv3_jax", "pallas_kernels"],
    # The native CPU kernels' source, compiled on first use (dsv3_jax/native.py).
    package_data={"dsv3_jax": ["csrc/*.cc", "csrc/*.h", "csrc_preload/*.c"]},
    install_requires=[
        "jax==0.10.2",
        "jaxlib==0.10.2",
        "flax==0.12.8",
        "optax==0.2.8",
        "orbax-checkpoint==0.12.8",
        "chex==0.1.92",
        "absl-py==2.5.1",
        "ml_collections==1.1.0",
        "grain==0.2.18",
        "numpy==2.4.6",
        "safetensors==0.8.0",
        "tokenizers==0.23.3",
        "tensorboardX==2.6.5",
        "matplotlib==3.11.2",
    ],
    extras_require={
        "test": [
            "pytest==9.2.0",
            # The CPU build on local disk; any other spec pulls a multi-GB CUDA build.
            "torch==2.13.0",
            "transformers==5.24.0",
            "ruff==0.17.6",
        ],
    },
)
