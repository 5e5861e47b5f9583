"""score_jax: SCoRe (self-correction via multi-turn RL) in JAX/Flax."""
import setuptools

setuptools.setup(
    name="score_jax",
    version="0.1.0",
    description="Train language models to self-correct with SCoRe (two-turn on-policy RL) in JAX/Flax.",
    packages=setuptools.find_packages(include=["score_jax", "score_jax.*"]),
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.5",
        "flax>=0.10",
        "optax",
        "orbax-checkpoint",
        "sentencepiece",
        "ml-collections",
        "absl-py",
        "numpy",
        # Writes TensorBoard event files without TensorFlow.
        "tensorboardX",
        # The self-correction table plot.
        "matplotlib",
    ],
    extras_require={"test": ["pytest"]},
)
