"""Model presets (configs/models) and ``--dry-run`` sizing of score and train.

Every dry run here is abstract: the students are preset names or config-only
directories (no tensors exist), and the loaders that read weights are made to fail.
"""

from __future__ import annotations

import json
import re
import time

import pytest
import yaml

from scas_jax import sizing
from scas_jax.cli import main
from scas_jax.errors import ScasError
from scas_jax.models.presets import PRESET_DIR, available, load_model_preset
from scas_jax.training.config import TrainConfig

PRESETS = available()
EXPECTED = {"qwen3-0.6b", "qwen3-1.7b", "qwen3-4b", "qwen3-8b", "qwen2.5-0.5b-instruct",
            "qwen2.5-1.5b-instruct", "qwen2.5-7b-instruct", "llama-3.2-1b-instruct",
            "llama-3.2-3b-instruct", "llama-3.1-8b-instruct", "mistral-7b-instruct-v0.3"}


@pytest.fixture
def no_weights(monkeypatch):
    """Any attempt to read tensors fails the test."""
    import scas_jax.convert.checkpoint as ckpt
    import scas_jax.loader as loader

    def refuse(*a, **k):
        raise AssertionError("a dry run read weights")

    monkeypatch.setattr(loader, "load_student", refuse)
    monkeypatch.setattr(ckpt, "restore_params", refuse)
    monkeypatch.setattr(loader, "params_from_tensors", refuse)


def _reported_params(out: str) -> float:
    return float(re.search(r"model\s+([\d.]+) B parameters", out).group(1)) * 1e9


def test_presets_cover_the_students_and_their_published_sizes():
    assert set(PRESETS) == EXPECTED
    for name in PRESETS:
        cfg, settings = load_model_preset(name)
        n = sizing._num_params(cfg)
        assert abs(n / settings["published_params"] - 1) < 0.02, (name, n)
        assert settings["hardware"] and settings["dtype"] in ("float32", "bfloat16")
    # family details that config_from_hf must carry over
    assert load_model_preset("qwen3-8b")[0].qk_norm
    assert load_model_preset("qwen2.5-7b-instruct")[0].qkv_bias
    assert load_model_preset("qwen2.5-7b-instruct")[0].sliding_window is None  # unused by HF
    assert dict(load_model_preset("llama-3.1-8b-instruct")[0].rope_scaling)["factor"] == 8.0
    assert dict(load_model_preset("llama-3.2-1b-instruct")[0].rope_scaling)["factor"] == 32.0
    assert load_model_preset("llama-3.2-1b-instruct")[0].tie_word_embeddings
    assert load_model_preset("mistral-7b-instruct-v0.3")[0].sliding_window is None


def test_unknown_preset_lists_the_available_names(tmp_path):
    with pytest.raises(ScasError, match="qwen3-8b.*not a model preset|not a model preset.*qwen3-8b"):
        load_model_preset("qwen9-1b")
    with pytest.raises(ScasError, match="no such file or directory, and not a model preset.*qwen3-8b"):
        sizing.describe_student(tmp_path / "missing")


def test_preset_errors_name_file_and_field(tmp_path):
    good = yaml.safe_load((PRESET_DIR / "qwen3-0.6b.yaml").read_text())
    bad = dict(good, run=dict(good["run"], train={"batch_sise": 8}))
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(bad))
    with pytest.raises(ScasError, match=r"bad.yaml: run.train: unknown field 'batch_sise'"):
        load_model_preset(path)
    arch = dict(good["architecture"])
    del arch["hidden_size"]
    path.write_text(yaml.safe_dump(dict(good, architecture=arch)))
    with pytest.raises(ScasError, match=r"bad.yaml: architecture: missing field 'hidden_size'"):
        load_model_preset(path)


@pytest.mark.parametrize("name", PRESETS)
def test_score_dry_run_on_every_preset(name, no_weights, capsys, tmp_path):
    t0 = time.perf_counter()
    rc = main(["score", "--dry-run", "--student", name, "--candidate-dir", str(tmp_path / "none"),
               "--output-dir", str(tmp_path / "out"), "--mesh", "data=1,fsdp=8"])
    out = capsys.readouterr().out
    assert rc == 0 and "no weights read" in out
    assert "compiled for 8 cpu devices in this process" in out
    for row in ("parameters (bfloat16)", "activations and temporaries", "peak estimate"):
        assert row in out
    published = load_model_preset(name)[1]["published_params"]
    assert abs(_reported_params(out) / published - 1) < 0.02
    assert not (tmp_path / "out").exists()
    assert time.perf_counter() - t0 < 60


def test_train_dry_run_reports_optimiser_state(no_weights, capsys, tmp_path, monkeypatch):
    reports = []
    original = sizing.format_report
    monkeypatch.setattr(sizing, "format_report", lambda r: reports.append(r) or original(r))
    rc = main(["train", "--dry-run", "--student", "qwen3-8b", "--output-dir", str(tmp_path / "o"),
               "mesh=data=1,fsdp=8", "batch_size=8", "seq_len=1024", "remat=true"])
    out = capsys.readouterr().out
    assert rc == 0 and not (tmp_path / "o").exists()
    assert "8 rows x 1024 tokens" in out and "1 row(s) per device" in out
    assert "optimiser state (AdamW mu and nu, float32)" in out
    (r,) = reports
    n = r["params"]
    p = r["per_device"]
    assert p["params"] == pytest.approx(4 * n / 8, rel=0.01)  # float32 master weights / 8
    assert p["opt_state"] == pytest.approx(8 * n / 8, rel=0.01)  # Adam mu and nu
    c = r["compiled"]
    assert c["argument"] == pytest.approx(p["params"] + p["opt_state"] + p["batch"], rel=0.01)
    assert c["alias"] > 0.9 * c["argument"]  # the state is donated


def test_per_device_bytes_halve_when_fsdp_doubles(no_weights):
    """Compiled (scoring) and computed (training state) per-device bytes, fsdp 2 -> 4."""
    s2 = sizing.dry_run_score("qwen3-1.7b", mesh="data=1,fsdp=2", batch_tokens=256, max_length=256)
    s4 = sizing.dry_run_score("qwen3-1.7b", mesh="data=1,fsdp=4", batch_tokens=256, max_length=256)
    assert s4["per_device"]["params"] == pytest.approx(s2["per_device"]["params"] / 2, rel=0.01)
    batch2, batch4 = s2["per_device"]["batch"], s4["per_device"]["batch"]
    assert s4["compiled"]["argument"] - batch4 == pytest.approx(
        (s2["compiled"]["argument"] - batch2) / 2, rel=0.01)
    cfg, _ = load_model_preset("qwen3-1.7b")
    parts = {}
    for fsdp in (2, 4):  # the train state's shardings on an abstract mesh: nothing compiled
        plan = {"kind": "train", "model": cfg.to_dict(), "mesh": {"data": 1, "fsdp": fsdp, "tp": 1},
                "dtype": "bfloat16", "train": TrainConfig(batch_size=fsdp, seq_len=128).to_dict()}
        parts[fsdp] = sizing.PROGRAMS["train"](plan, sizing._abstract_mesh(plan))[2]
    for part in ("params", "opt_state"):
        assert parts[4][part] == pytest.approx(parts[2][part] / 2, rel=0.01)


def _tiny_preset(tmp_path):
    good = yaml.safe_load((PRESET_DIR / "qwen3-0.6b.yaml").read_text())
    arch = dict(good["architecture"], hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=512)
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(dict(good, name="tiny", architecture=arch,
                                        published_params=None)))
    return path


def test_mesh_larger_than_this_machine_compiles_simulated_devices(no_weights, tmp_path):
    r = sizing.dry_run_score(str(_tiny_preset(tmp_path)), mesh="data=2,fsdp=8",
                             batch_tokens=256, max_length=256)
    assert r["devices"] == 16 and "16 simulated CPU devices in a subprocess" in r["how"]
    assert r["compiled"]["devices"] == 16
    assert r["batch"]["rows"] % 16 == 0 and r["batch"]["rows_per_device"] == r["batch"]["rows"] // 16
    assert r["compiled"]["argument"] >= r["per_device"]["params"]


def test_fallback_compiles_the_per_device_program(no_weights, tmp_path, monkeypatch):
    def fail(plan, timeout=0):
        raise RuntimeError("simulated-device compile failed: test")

    monkeypatch.setattr(sizing, "_compile_in_subprocess", fail)
    r = sizing.dry_run_score(str(_tiny_preset(tmp_path)), mesh="data=2,fsdp=8",
                             batch_tokens=256, max_length=256)
    assert "compiled on 1 device with the per-device batch" in r["how"]
    assert r["compiled"]["devices"] == 1
    out = sizing.format_report(r)
    assert "computed from the sharding rules" in out and "compiled (XLA temp)" in out
    # per-device parameter bytes are still those of the 16-device mesh, computed
    one = sizing.dry_run_score(str(_tiny_preset(tmp_path)), mesh="data=1",
                               batch_tokens=256, max_length=256)
    assert r["per_device"]["params"] <= one["per_device"]["params"]


def test_config_only_student_directory(no_weights, tmp_path, capsys):
    cfg = yaml.safe_load((PRESET_DIR / "llama-3.2-1b-instruct.yaml").read_text())["architecture"]
    d = tmp_path / "student"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(cfg))  # no safetensors at all
    rc = main(["score", "--dry-run", "--student", str(d), "--candidate-dir", str(tmp_path),
               "--output-dir", str(tmp_path / "o"), "--mesh", "data=2,fsdp=2",
               "--dtype", "bfloat16", "--max-length", "512", "--batch-tokens", "512"])
    out = capsys.readouterr().out
    assert rc == 0 and "config.json (config only)" in out and "dtype     bfloat16 (given)" in out
    assert abs(_reported_params(out) / 1.235e9 - 1) < 0.02
