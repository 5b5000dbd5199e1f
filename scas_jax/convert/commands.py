"""``scas-jax convert`` and ``scas-jax export``: Hugging Face / GGUF <-> converted checkpoints.

The top of the convert layering: this module uses :mod:`scas_jax.loader` and the
``scas_jax.convert`` modules, none of which import it back. Those imports sit inside the
functions only so that ``scas-jax --help`` does not import jax or transformers.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from scas_jax.io_utils import atomic_dir

_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "mistral": "MistralForCausalLM",
    "gemma3": "Gemma3ForCausalLM",
}
_HF_DTYPE = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


def convert(hf: str | Path, out: str | Path, dtype: str = "float32", overwrite: bool = False) -> Path:
    """Convert a Hugging Face directory or GGUF file into a converted directory at ``out``.

    Tensors are read one at a time into host buffers (never two copies of the model)
    and each is placed on a mesh over all devices by the rule table as soon as it is
    filled (no device holds the whole model); the directory is built beside ``out`` and
    renamed into place only when complete. With several processes every process runs
    this (the Orbax save is collective); only process 0 writes the other files.
    """
    from tqdm import tqdm

    from scas_jax.convert import checkpoint
    from scas_jax.convert.keymap import params_from_tensors
    from scas_jax.convert.sources import open_source
    from scas_jax.convert.student_io import load_tokenizer, placer, resolve_path
    from scas_jax.models.config import config_from_hf
    from scas_jax.parallel import is_main_process, make_mesh

    src_path = resolve_path(hf)
    np_dt = checkpoint.np_dtype(dtype)
    source = open_source(src_path)
    cfg = config_from_hf(source.hf_config, where=source.config_where)
    out = Path(out)
    main = is_main_process()
    with checkpoint.shared_output_dir(out, overwrite=overwrite) as tmp:
        with tqdm(total=len(source.names), desc="converting", unit="tensor",
                  disable=not main) as bar:
            params = params_from_tensors(
                cfg, source.get, source.names, np_dt, source.describe(),
                place=placer(make_mesh("fsdp=-1")), progress=bar.update,
            )
        checkpoint.save_params(tmp / "params", params)
        del params
        if main:
            hf_config = dict(source.hf_config)
            hf_config["dtype"] = _HF_DTYPE[dtype]
            hf_config.setdefault("architectures", [_ARCHITECTURES[cfg.model_type]])
            checkpoint.write_meta(tmp, cfg, hf_config, dtype, str(src_path))
            tok = load_tokenizer(src_path if src_path.is_dir() else src_path.parent, source)
            if tok is not None:
                tok.save_pretrained(str(tmp))
    return out


class _Gathered:
    """A global parameter seen as a host array one slice at a time: ``x[i]`` and
    ``np.asarray(x)`` gather (collectively) to numpy in global index order."""

    def __init__(self, x):
        self.x, self.shape, self.dtype = x, x.shape, x.dtype

    def __getitem__(self, index):
        from scas_jax.parallel import to_host

        return to_host(self.x[index])

    def __array__(self, dtype=None, copy=None):
        from scas_jax.parallel import to_host

        out = to_host(self.x)
        return out if dtype is None else out.astype(dtype)


def export(ckpt: str | Path, out: str | Path, dtype: str | None = None, overwrite: bool = False,
           max_shard_bytes: int = 2 * 1024**3) -> Path:
    """Write ``model.safetensors`` (sharded past ``max_shard_bytes``), ``config.json`` and
    the tokenizer, loadable by ``transformers.AutoModelForCausalLM.from_pretrained``.

    The checkpoint is read sharded over all devices (rule table); tensors are gathered
    to the host one at a time while the files stream out. With several processes every
    process runs this (reading and gathering are collective); only process 0 writes.
    """
    import jax
    import numpy as np

    from scas_jax.convert.keymap import hf_tensor_specs
    from scas_jax.convert.safetensors_io import write_safetensors
    from scas_jax.loader import load_student
    from scas_jax.parallel import is_main_process, make_mesh

    student = load_student(ckpt, dtype=dtype, mesh=make_mesh("fsdp=-1"))
    gathered = jax.tree.map(_Gathered, student.params)
    specs = hf_tensor_specs(student.cfg, gathered)
    if student.cfg.tie_word_embeddings:
        specs = [s for s in specs if s[0] != "lm_head.weight"]
    if not is_main_process():
        for *_, load in specs:  # take part in every gather, in the order the writer loads
            load()
        return Path(out)
    shards, cur, size = [], [], 0
    for s in specs:
        nbytes = int(np.prod(s[1])) * np.dtype(s[2]).itemsize
        if cur and size + nbytes > max_shard_bytes:
            shards.append(cur)
            cur, size = [], 0
        cur.append(s)
        size += nbytes
    shards.append(cur)
    out = Path(out)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        if len(shards) == 1:
            write_safetensors(tmp / "model.safetensors", shards[0])
        else:
            weight_map = {}
            for i, shard in enumerate(shards):
                name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                write_safetensors(tmp / name, shard)
                weight_map.update({s[0]: name for s in shard})
            total = sum(int(np.prod(s[1])) * np.dtype(s[2]).itemsize for s in specs)
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        hf_config = dict(student.hf_config)
        hf_config["dtype"] = student.param_dtype
        hf_config["architectures"] = [_ARCHITECTURES[student.cfg.model_type]]
        hf_config["tie_word_embeddings"] = student.cfg.tie_word_embeddings
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2, default=str) + "\n")
        if student.tokenizer is not None:
            student.tokenizer.save_pretrained(str(tmp))
    return out


def _convert_cmd(args: argparse.Namespace) -> int:
    out = convert(args.hf, args.out, dtype=args.dtype, overwrite=args.overwrite)
    print(f"converted {args.hf} -> {out}")
    return 0


def _export_cmd(args: argparse.Namespace) -> int:
    out = export(args.ckpt, args.out, dtype=args.dtype, overwrite=args.overwrite)
    print(f"exported {args.ckpt} -> {out}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("convert", help="Hugging Face directory or GGUF -> converted checkpoint")
    p.add_argument("--hf", required=True, help="HF model directory, GGUF file, or 'smollm2'")
    p.add_argument("--out", required=True, help="output directory (must not exist or be empty)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="dtype the parameters are stored in")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.set_defaults(func=_convert_cmd)

    p = sub.add_parser("export", help="checkpoint -> Hugging Face safetensors directory")
    p.add_argument("--ckpt", required=True, help="converted directory (or HF dir / GGUF)")
    p.add_argument("--out", required=True, help="output HF directory")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                   help="dtype of the written tensors (default: the checkpoint's own)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.set_defaults(func=_export_cmd)
