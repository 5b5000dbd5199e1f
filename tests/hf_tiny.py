"""Random tiny Hugging Face models of each supported family, built offline (torch)."""

from __future__ import annotations

from pathlib import Path

VOCAB = 96

FAMILIES = {
    # name: (model_type, extra config)
    "llama_rope_scaling_untied": ("llama", dict(
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
        rope_theta=500000.0, tie_word_embeddings=False)),
    "llama_tied_bias": ("llama", dict(tie_word_embeddings=True, attention_bias=True, mlp_bias=True)),
    "qwen2_bias": ("qwen2", dict(tie_word_embeddings=False)),
    "qwen3_qknorm_tied": ("qwen3", dict(tie_word_embeddings=True, head_dim=16)),
    "mistral_window": ("mistral", dict(tie_word_embeddings=False, sliding_window=5)),
    # local (window 5, base 10k) then global (base 1M, linear scaling) layers, one KV
    # head, query_pre_attn_scalar != head_dim, final soft-capping
    "gemma3_local_global": ("gemma3_text", dict(
        num_hidden_layers=3, num_key_value_heads=1, head_dim=16, sliding_window=5,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                         "full_attention": {"rope_type": "linear", "factor": 2.0,
                                            "rope_theta": 1000000.0}},
        query_pre_attn_scalar=24, final_logit_softcapping=5.0, tie_word_embeddings=True,
        pad_token_id=0, bos_token_id=2, eos_token_id=1)),
}


def build(name: str, out: Path, seed: int = 0) -> Path:
    """Save a seeded random tiny model of family ``name`` to ``out`` (safetensors, fp32)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    model_type, extra = FAMILIES[name]
    base = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                rms_norm_eps=1e-6)
    cfg = AutoConfig.for_model(model_type, **{**base, **extra})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():  # non-trivial norms and biases, so a wrong mapping shows
        for n, p in model.named_parameters():
            if n.endswith("norm.weight") or "layernorm" in n:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif n.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
            else:
                p.copy_(0.08 * torch.randn_like(p))
    model.eval()
    model.save_pretrained(out, safe_serialization=True)
    return out
