"""Generation throughput: the KV-cache sampler against transformers' ``generate`` (torch).

Same model (SmolLM2-135M-Instruct from the bundled GGUF, float32), same prompts (the
chat-template prompts of the first ``--batch`` GSM8K questions), one batch of
``--batch`` rows, ``--new-tokens`` greedy tokens per row with stopping disabled on both
sides (every row generates exactly ``--new-tokens`` tokens), in one process:

    python benchmarks/bench_generate.py --json docs/figures/bench_generate.json

Reports tokens/s (generated tokens / wall time of the best of ``--repeats`` timed
calls, prefill included) for both, their ratio, the sampler's first call (compile +
run), the KV-cache bytes of both, whether the greedy tokens agree, and the machine
(``lscpu``) and its load (``/proc/loadavg``) before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import machine  # benchmarks/machine.py


def load() -> list[float]:
    with open("/proc/loadavg") as f:
        return [float(x) for x in f.read().split()[:3]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=2, help="timed calls of each side (the best is reported)")
    ap.add_argument("--torch-threads", type=int, default=2)
    ap.add_argument("--layouts", default="per_layer,stacked",
                    help="sampler cache layouts to time, comma-separated; the first is the headline")
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args()

    import jax
    import numpy as np
    import torch

    from scas_jax.generation.prompts import prompt_ids, read_questions
    from scas_jax.generation.sampler import Sampler
    from scas_jax.loader import load_student
    from scas_jax.models.kv_cache import cache_bytes

    result: dict = {"machine": machine.describe(), "load_before": load(), "batch": args.batch,
                    "new_tokens": args.new_tokens, "dtype": "float32", "jax": jax.__version__,
                    "torch": torch.__version__}
    st = load_student("smollm2")
    qs = read_questions("scas_jax/assets/gsm8k/human_reference.jsonl", limit=args.batch)
    prompts = prompt_ids(st.tokenizer, qs)
    result["prompt_tokens"] = {"min": min(map(len, prompts)), "max": max(map(len, prompts))}
    n_tokens = args.batch * args.new_tokens

    outputs = {}
    for layout in args.layouts.split(","):
        sampler = Sampler(st.params, st.cfg, batch_size=args.batch, layout=layout)
        t = time.perf_counter()
        ours = sampler.generate(prompts, max_new_tokens=args.new_tokens, stop_ids=())
        first = time.perf_counter() - t
        times = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            ours = sampler.generate(prompts, max_new_tokens=args.new_tokens, stop_ids=())
            times.append(time.perf_counter() - t)
        shape = sampler.cache_shapes[-1]
        key = "scas_jax" if not outputs else f"scas_jax_{layout}"
        result[key] = {
            "layout": layout, "first_call_s": round(first, 2), "timed_s": [round(x, 2) for x in times],
            "tokens_per_s": round(n_tokens / min(times), 1), "compilations": sampler.compilations,
            "kv_cache_shape": list(shape),
            "kv_cache_mib": round(cache_bytes(st.cfg, shape[1], shape[3]) / 2**20, 1),
        }
        outputs[layout] = ours
        print(key, result[key], flush=True)
        del sampler
    ours = next(iter(outputs.values()))
    result["layouts_identical"] = all(o == ours for o in outputs.values())

    from transformers import AutoModelForCausalLM

    from scas_jax.loader import bundled_smollm2

    torch.set_num_threads(args.torch_threads)
    gguf = bundled_smollm2()
    hf = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None  # no stopping: every row makes new_tokens tokens
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    kw = dict(attention_mask=mask, do_sample=False, pad_token_id=0)
    hf_times = []
    with torch.no_grad():
        hf.generate(ids, max_new_tokens=2, **kw)  # warm-up
        for _ in range(args.repeats):
            t = time.perf_counter()
            out = hf.generate(ids, max_new_tokens=args.new_tokens, **kw)
            hf_times.append(time.perf_counter() - t)
    hf_s = min(hf_times)
    new = out[:, width:].numpy()
    cfg = st.cfg
    hf_cache = 2 * cfg.num_layers * args.batch * cfg.num_kv_heads * (width + args.new_tokens) * cfg.head_dim * 4
    result["transformers"] = {"timed_s": [round(x, 2) for x in hf_times], "tokens_per_s": round(n_tokens / hf_s, 1),
                              "kv_cache_mib_at_end": round(hf_cache / 2**20, 1)}
    same = [list(g.tokens) == list(map(int, row)) for g, row in zip(ours, new)]
    first_diff = [next((i for i, (a, b) in enumerate(zip(g.tokens, row)) if a != int(b)), None)
                  for g, row in zip(ours, new)]
    result["rows_identical"] = int(sum(same))
    result["first_difference_per_row"] = first_diff
    result["ratio"] = round(result["scas_jax"]["tokens_per_s"] / result["transformers"]["tokens_per_s"], 2)
    result["load_after"] = load()
    print(json.dumps(result, indent=2))
    if args.json:
        os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
            f.write("\n")
    assert np.all(np.isfinite([result["ratio"]]))


if __name__ == "__main__":
    main()
