"""The text-generation gate compares with the user's own model, never with Kiln's cache wrapper
(compiler/generation/gate.py). Each test here plants a bug in the wrapper (a window one slot too wide, a mask that
sees the next slot, the new key and value written one slot off, a dropped soft-cap), exports through the real
converters, runtimes and gate, and expects the export rejected (exit 1): compared with the wrapper, as the gate did
before, each of these artifacts matched its reference and was published."""

from __future__ import annotations

import functools
import json

import numpy as np
import pytest
import torch

pytest.importorskip("transformers", reason="these tests build models with transformers")

from kiln.compiler.errors import UsageError
from kiln.compiler.generation.attention_masks import SLIDING, AttentionPattern
from kiln.compiler.generation.decoding import DecoderSpec, StaticCacheLayout
from kiln.compiler.generation.export import CausalLMWithCache
from kiln.compiler.generation.gate import check_record, decoding_samples, gate_prompts
from kiln.compiler.generation.reference import CausalLMReference
from kiln.compiler.generation.static_kv_cache import CausalLMWithStaticCache
from kiln.compiler.types import MANIFEST_NAME

from tests.conftest import ROOT, run_cli
from tests.models import decoders

MODELS = ROOT / "tests" / "models" / "decoders.py"
ORIGINAL_MASKS = AttentionPattern.masks


def _export(family: str, target: str, out, capsys, *extra: str) -> tuple[int, dict]:
    """`kiln export --json` in-process (so that a planted bug applies): the exit code and the JSON."""
    argv = ("export", f"{MODELS}:{family}", "-t", target, "-o", out, "--json", *extra)
    code, stdout, stderr = run_cli(*argv, capsys=capsys)
    assert stdout.strip(), f"exit {code}: {stderr}"
    return code, json.loads(stdout)


def _wider_window(self, query, keys, valid, dtype):
    """The planted bug: every sliding layer sees one position more than its window."""
    wide = AttentionPattern(self.layer_types, None if self.window is None else self.window + 1)
    return ORIGINAL_MASKS(wide, query, keys, valid, dtype)


def _sees_next_slot(self, query, keys, valid, dtype):
    """The planted bug: a query also sees the cache slot after its own (`<= pos + 1`)."""
    return ORIGINAL_MASKS(self, query + 1, keys, valid, dtype)


def _shifted_writes(wrapper_class):
    """The planted bug: the cache comes back rolled one slot along its length (each key and value one slot off)."""
    forward = wrapper_class.forward

    @functools.wraps(forward)  # the same signature: torch.export maps the dynamic shapes onto it
    def planted(self, *args):
        out = forward(self, *args)
        return {k: v if k == "logits" else torch.roll(v, 1, dims=2) for k, v in out.items()}

    return planted


def _without(field: str, wrapper_class):
    """The planted bug: the wrapper traces the model with one of its soft-caps switched off (in the config and in
    every module that copied it), restored after."""
    forward = wrapper_class.forward

    @functools.wraps(forward)
    def planted(self, *args):
        holders = [self.model.config, *[m for m in self.model.modules() if hasattr(m, field)]]
        saved = [getattr(h, field) for h in holders]
        for holder in holders:
            setattr(holder, field, None)
        try:
            return forward(self, *args)
        finally:
            for holder, value in zip(holders, saved):
                setattr(holder, field, value)

    return planted


PLANTED = {
    "window one slot too wide (growing)": ("mistral", "onnx", "masks", _wider_window),
    "window one slot too wide (static)": ("mistral", "tflite", "masks", _wider_window),
    "mask sees the next slot (static)": ("llama", "tflite", "masks", _sees_next_slot),
    "cache written one slot off (growing)": ("llama", "onnx", CausalLMWithCache, _shifted_writes),
    "cache written one slot off (static)": ("qwen2_sliding", "tpu", CausalLMWithStaticCache, _shifted_writes),
    "final-logit soft-cap dropped": ("gemma2", "openvino", CausalLMWithCache, "final_logit_softcapping"),
    "attention soft-cap dropped": ("gemma2", "onnx", CausalLMWithCache, "attn_logit_softcapping"),
}


@pytest.mark.slow
@pytest.mark.parametrize("bug", list(PLANTED))
def test_a_planted_wrapper_bug_is_rejected(bug, monkeypatch, tmp_path, capsys):
    family, target, where, plant = PLANTED[bug]
    if where == "masks":
        monkeypatch.setattr(AttentionPattern, "masks", plant)
    elif isinstance(plant, str):
        monkeypatch.setattr(where, "forward", _without(plant, where))
    else:
        monkeypatch.setattr(where, "forward", plant(where))
    # A wrong mask in the wrapper is a bug of Kiln's step graph: the onnxruntime-genai format replaces the wrapper's
    # attention by GroupQueryAttention, its window read from the model (docs/llm-formats.md), so the step graph is
    # asked for. Every other planted bug goes through the default route, the runtime's own format.
    extra = ("--llm-format", "stateless") if where == "masks" and target in ("onnx", "openvino") else ()
    code, results = _export(family, target, tmp_path / "out", capsys, *extra)
    assert code == 1, bug
    (result,) = results["results"]
    assert not result["published"], bug


def test_the_rejection_comes_from_the_reference_not_from_the_conversion(monkeypatch):
    """With the planted next-slot mask, the wrapper itself (what the gate used to compare with) agrees with the
    buggy step; the user's model does not. Checked on the decoding states, in PyTorch alone."""
    model, _ = decoders.llama()
    spec = DecoderSpec(decoders.VOCAB, decoders.POSITIONS, ("full_attention",) * 2)
    layout = StaticCacheLayout(2, 2, 40, 16)
    samples = decoding_samples(CausalLMReference(model), layout, spec)
    monkeypatch.setattr(AttentionPattern, "masks", _sees_next_slot)
    planted = CausalLMWithStaticCache(model, 40).eval()
    worst = 0.0
    for feeds, want in zip(samples.inputs, samples.reference):
        with torch.no_grad():
            got = planted(*[torch.from_numpy(v) for v in feeds.values()])
        worst = max(worst, float(np.max(np.abs(got["logits"].numpy() - want["logits"]))))
    assert worst > 1e-2  # the buggy step is far from the user's model on a state with noise past the position


def test_masks_follow_each_layers_kind():
    pattern = AttentionPattern(("sliding_attention", "full_attention"), 3)
    masks = pattern.masks(torch.tensor([4]), torch.arange(6), None, torch.float32)
    seen = {kind: (m[0, 0, 0] == 0).tolist() for kind, m in masks.items()}
    assert seen["full_attention"] == [True] * 5 + [False]
    assert seen[SLIDING] == [False, False, True, True, True, False]  # positions 2, 3, 4: the last 3
    uniform = AttentionPattern(("full_attention",) * 2).masks(torch.tensor([1]), torch.arange(3), None, torch.float32)
    assert isinstance(uniform, torch.Tensor)


def test_attention_patterns_are_read_from_each_config():
    assert AttentionPattern.of(decoders.mistral()[0].config) == AttentionPattern((SLIDING,) * 2, 16)
    gemma = AttentionPattern.of(decoders.gemma2()[0].config)
    assert gemma.layer_types == (SLIDING, "full_attention") * 2 and gemma.window == 8
    assert AttentionPattern.of(decoders.qwen2()[0].config).window is None  # use_sliding_window off
    assert AttentionPattern.of(decoders.phi3_sliding()[0].config).window == 12
    config = decoders.llama()[0].config
    config.attention_chunk_size = 16
    with pytest.raises(Exception, match="chunked attention"):
        AttentionPattern.of(config)


def test_gate_prompts_cross_the_window_twice_or_refuse_a_cache_that_cannot():
    spec = DecoderSpec(128, 128, (SLIDING,) * 2, 16)
    plan = gate_prompts(spec, 128)
    long = plan.prompts[1]
    assert len(long.tokens) > 16 and long.positions > 2 * 16 and "twice" in plan.crossing
    wide = DecoderSpec(128, 128, (SLIDING,) * 2, 24)
    with pytest.raises(UsageError, match="--cache-size 40: the gate decodes 50 positions"):
        gate_prompts(wide, 40, strict=True)  # holds more than the window, too few positions to cross it twice
    assert "never binds" in gate_prompts(spec, 16).crossing  # a cache no longer than the window
    assert "once" in gate_prompts(DecoderSpec(128, 40, (SLIDING,) * 2, 24), 40).crossing  # the model's own limit


def test_a_forged_generation_record_is_refused_before_decoding():
    spec = DecoderSpec(128, 128, ("full_attention",))
    good = {"prompts": [{"prompt": [1, 5], "tokens": 3, "reference": [4, 4, 4]}]}
    assert check_record(good, spec, 64)[0][1] == [4, 4, 4]
    forged = [
        {"prompts": [{"prompt": [1, 5], "tokens": 10**9, "reference": [4]}]},
        {"prompts": [{"prompt": "1,5", "tokens": 3, "reference": [4, 4, 4]}]},
        {"prompts": [{"prompt": [1, 500], "tokens": 3, "reference": [4, 4, 4]}]},
        {"prompts": [{"prompt": [1, 5], "tokens": 64, "reference": [4] * 64}]},  # 65 positions
        {"prompts": []},
        {"prompt": [1, 5]},
    ]
    for record in forged:
        with pytest.raises(UsageError, match=r"parity\.generation record is malformed"):
            check_record(record, spec, 64)


def test_a_manifest_without_a_valid_decoder_record_is_refused(tmp_path, capsys):
    from kiln.compiler.generation.decoding import DecoderSpec as Spec

    with pytest.raises(UsageError, match="no valid decoder record"):
        Spec.from_dict({"vocab_size": float("nan"), "max_positions": 8, "layer_types": ["x"], "sliding_window": None})
    with pytest.raises(UsageError, match="no valid decoder record"):
        Spec.from_dict(None)
    assert MANIFEST_NAME == "manifest.json"


@pytest.mark.slow
def test_a_prefill_chunk_written_one_slot_off_is_rejected(monkeypatch, tmp_path, capsys):
    """The chunked prefill signature (static cache) writes its 16 keys one slot late; the one-token decode step is
    right. The prefill's decoding states (judged on the user's model) and the long gate prompt both take it."""
    from kiln.compiler.generation import static_kv_cache

    written = static_kv_cache._written

    def one_slot_late(slots, new, cache):
        return written(torch.roll(slots, 1, dims=1) if new.shape[2] > 1 else slots, new, cache)

    monkeypatch.setattr(static_kv_cache, "_written", one_slot_late)
    code, results = _export("llama", "tflite", tmp_path / "out", capsys)
    (result,) = results["results"]
    assert code == 1 and not result["published"]
    manifest = json.loads((tmp_path / "out" / ".rejected" / "tflite" / MANIFEST_NAME).read_text())
    failed = [o["name"] for o in manifest["parity"]["outputs"] if not o["passed"]]
    assert any(name.startswith("present_") for name in failed), failed  # the cache the prefill wrote
