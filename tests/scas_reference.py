"""Test oracle: the method page in plain transformers + PyTorch, one row per forward.

Structured like the authors' reference: build messages, render prompt/full texts with
the chat template, tokenize each with the tokenizer's default call, take the
common-prefix boundary, run ONE unpadded forward with a forward hook on the target
module, take the full log-softmax over the vocabulary and the full ``T x T`` cosine
matrices. It deliberately shares no code with ``scas_jax`` (not ``data/chat.py``, not
``scoring/fields.py``), so the two can be compared.

Entry points: :func:`reference_tokenize` (ids, n_prompt, masks), :func:`reference_forward`
(hooked activation and per-token NLL), :func:`reference_metrics` (every metric field of
a row, or the zero fields plus ``scas_scoring_error``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

DEFAULT_TARGET = "model.layers.{last}.mlp.up_proj"


def reference_messages(row: dict[str, Any]) -> list[dict[str, str]]:
    return [
        {"role": "system", "content": str(row.get("system") or "You are a helpful assistant.")},
        {"role": "user", "content": str(row.get("instruction") or "")},
        {"role": "assistant", "content": str(row.get("teacher_output") or row.get("output") or "")},
    ]


def reference_special_ids(tokenizer) -> set[int]:
    ids = {int(i) for i in (tokenizer.all_special_ids or [])}
    extra = getattr(tokenizer, "additional_special_tokens", None) or []
    ids |= {int(i) for i in tokenizer.convert_tokens_to_ids(list(extra))}
    for tok in ("<|im_start|>", "<|im_end|>"):
        tid = tokenizer.convert_tokens_to_ids(tok)
        if tid is not None and tid != tokenizer.unk_token_id:
            ids.add(int(tid))
    return ids


def reference_tokenize(tokenizer, row: dict[str, Any]) -> dict[str, Any]:
    """ids (LongTensor[T]), n_prompt, and the question/answer/special bool[T] masks."""
    messages = reference_messages(row)
    prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    prompt_ids = torch.tensor(tokenizer(prompt)["input_ids"], dtype=torch.long)
    full_ids = torch.tensor(tokenizer(full)["input_ids"], dtype=torch.long)
    n_prompt, n_full = prompt_ids.numel(), full_ids.numel()
    if n_prompt > 0 and n_full >= n_prompt and not torch.equal(full_ids[:n_prompt], prompt_ids):
        same = (full_ids[:n_prompt] == prompt_ids).tolist()
        n_prompt = same.index(False)
    special = torch.zeros(n_full, dtype=torch.bool)
    for sid in reference_special_ids(tokenizer):
        special |= full_ids == sid
    pos = torch.arange(n_full)
    return {
        "ids": full_ids,
        "n_prompt": n_prompt,
        "n_answer": n_full - n_prompt,
        "special": special,
        "question": (pos < n_prompt) & ~special,
        "answer": (pos >= n_prompt) & ~special,
    }


def _module(model, name: str):
    modules = dict(model.named_modules())
    if name not in modules:
        raise KeyError(f"no module {name!r}")
    return modules[name]


def default_target(model) -> str:
    return DEFAULT_TARGET.format(last=model.config.num_hidden_layers - 1)


@torch.no_grad()
def reference_forward(model, ids: torch.Tensor, target: str | None = None) -> dict[str, torch.Tensor]:
    """One unpadded forward: ``ids`` as given, ``act`` float32[T, d] at the hooked module, ``nll`` float32[T]
    with ``nll[0] = nan`` (position 0 has no prediction) and ``nll[p]`` the loss of
    predicting token p from the logits at p - 1 (full log-softmax)."""
    store: dict[str, torch.Tensor] = {}
    handle = _module(model, target or default_target(model)).register_forward_hook(
        lambda _m, _i, out: store.__setitem__("act", out[0] if isinstance(out, tuple) else out)
    )
    try:
        logits = model(input_ids=ids[None]).logits[0].float()
    finally:
        handle.remove()
    logp = F.log_softmax(logits[:-1], dim=-1)
    nll = torch.full((ids.numel(),), float("nan"))
    nll[1:] = -logp.gather(-1, ids[1:, None])[:, 0]
    return {"ids": ids, "act": store["act"][0].float(), "nll": nll}


def _pair_means(mat: torch.Tensor) -> tuple[float, float]:
    n = mat.shape[0]
    full = float(mat.mean())
    no_diag = float((mat.sum() - mat.diagonal().sum()) / (n * n - n)) if n > 1 else 0.0
    return full, no_diag


def _nll_mean(nll: torch.Tensor, mask: torch.Tensor) -> float:
    mask = mask.clone()
    mask[0] = False
    return float(nll[mask].mean()) if bool(mask.any()) else 0.0


def _zero(lam: float) -> dict[str, Any]:
    return _assemble(0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, lam)


def _assemble(aa, aa_nd, aq, qq, qq_nd, nq, na, lam) -> dict[str, Any]:
    return {
        "answer_answer_similarity": aa,
        "answer_answer_similarity_no_diag": aa_nd,
        "answer_question_similarity": aq,
        "question_question_similarity": qq,
        "question_question_similarity_no_diag": qq_nd,
        "lambda_scas": lam,
        "answer_answer_weight": 1.0 - lam,
        "answer_mean_nll": na,
        "question_mean_nll": nq,
        "answer_nll_weight": na * na,
        "answer_question_nll_weight": na * nq,
        "answer_answer_block": na * na * aa,
        "answer_answer_block_no_diag": na * na * aa_nd,
        "answer_question_block": na * nq * aq,
        "question_question_block": nq * nq * qq,
        "scas_score": (1.0 - lam) * na * na * aa + lam * na * nq * aq,
        "scas_score_no_diag": (1.0 - lam) * na * na * aa_nd + lam * na * nq * aq,
        "nll_weight_score": (1.0 - lam) * na * na + lam * na * nq,
        "similarity_score": (1.0 - lam) * aa + lam * aq,
        "similarity_score_no_diag": (1.0 - lam) * aa_nd + lam * aq,
        "answer_mean_nll_score": na,
    }


def reference_metrics(
    model,
    tokenizer,
    row: dict[str, Any],
    lambda_scas: float = 0.5,
    target: str | None = None,
    forward: dict[str, torch.Tensor] | None = None,
) -> dict[str, Any]:
    """Every metric field of one row, as the reference computes it.

    ``forward``: an earlier :func:`reference_forward` of this row's ids, to reuse one
    forward pass for several lambdas or for a second computation from the same pass.
    """
    if not row.get("instruction") or not (row.get("teacher_output") or row.get("output")):
        return {**_zero(lambda_scas), "scas_scoring_error": "Missing instruction or teacher_output/output."}
    tok = reference_tokenize(tokenizer, row)
    if tok["n_answer"] <= 0:
        return {**_zero(lambda_scas), "scas_scoring_error": f"n_answer={tok['n_answer']}"}
    if forward is not None and not torch.equal(forward["ids"], tok["ids"]):
        raise ValueError("the given forward pass is not over this row's reference ids")
    out = forward if forward is not None else reference_forward(model, tok["ids"], target)
    unit = F.normalize(out["act"], p=2, dim=1)  # x / max(||x||, 1e-12)
    a = unit[tok["answer"]]
    q = unit[tok["question"]]
    if a.shape[0] == 0:
        return _zero(lambda_scas)
    aa, aa_nd = _pair_means(a @ a.T)
    if q.shape[0] > 0:
        aq = float((a @ q.T).mean())
        qq, qq_nd = _pair_means(q @ q.T)
    else:
        aq = qq = qq_nd = 0.0
    nq = _nll_mean(out["nll"], tok["question"])
    na = _nll_mean(out["nll"], tok["answer"])
    return _assemble(aa, aa_nd, aq, qq, qq_nd, nq, na, float(lambda_scas))
