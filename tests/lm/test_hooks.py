"""Residual and MLP hooks on a tiny random Qwen3.5 MoE (hybrid attention) and on SmolLM2."""

from __future__ import annotations

import pytest
import torch

from qsae.errors import LayerError
from qsae.lm.hooks import capture, decoder_layers, run_with_capture


def _inputs(lm, texts=("Q: Who wrote Hamlet? A:", "Q: What is the capital of France? A:")):
    lm.tokenizer.padding_side = "right"
    enc = lm.tokenizer(list(texts), return_tensors="pt", padding=True)
    lm.tokenizer.padding_side = "left"
    return enc.input_ids, enc.attention_mask


def test_tiny_qwen_is_the_target_architecture(tiny_qwen):
    model = tiny_qwen.model
    assert type(model).__name__ == "Qwen3_5MoeForCausalLM"
    assert model.config.layer_types == ["linear_attention"] * 3 + ["full_attention"]
    assert len(decoder_layers(model)) == 4


@pytest.mark.parametrize("lm_name", ["tiny_qwen", "smollm2"])
def test_resid_after_layer_equals_hidden_states(request, lm_name):
    lm = request.getfixturevalue(lm_name)
    n = lm.n_layers
    layers = sorted({0, 1, n // 2, n - 2, n - 1})
    ids, mask = _inputs(lm)
    out, cap = run_with_capture(lm.model, ids, mask, layers=layers, stop_early=False, output_hidden_states=True)
    hs = out.hidden_states
    assert len(hs) == n + 1
    for layer in layers[:-1]:
        assert torch.equal(cap.resid[layer], hs[layer + 1]), layer
    last = cap.resid[n - 1]
    # The last layer's hook sees the residual before the final norm; hidden_states[-1] is after.
    assert not torch.allclose(last, hs[n])
    assert torch.equal(lm.model.model.norm(last), hs[n])


def test_mlp_output_capture_equals_manual_mlp_call(tiny_qwen):
    model = tiny_qwen.model
    block = decoder_layers(model)[2]
    seen = {}
    h = block.post_attention_layernorm.register_forward_hook(lambda m, i, o: seen.setdefault("mlp_in", o))
    ids, mask = _inputs(tiny_qwen)
    try:
        _, cap = run_with_capture(model, ids, mask, layers=[2], mlp_layers=[2], stop_early=False)
    finally:
        h.remove()
    with torch.inference_mode():
        manual = block.mlp(seen["mlp_in"])
    manual = manual[0] if isinstance(manual, tuple) else manual
    assert cap.mlp[2].shape == cap.resid[2].shape
    torch.testing.assert_close(cap.mlp[2], manual)


def test_stop_early_skips_later_layers_and_keeps_values(tiny_qwen):
    model = tiny_qwen.model
    ids, mask = _inputs(tiny_qwen)
    calls = []
    h = decoder_layers(model)[3].register_forward_hook(lambda *a: calls.append(1))
    try:
        out, early = run_with_capture(model, ids, mask, layers=[1], stop_early=True)
        assert out is None and early.stopped_early and calls == []
        full, late = run_with_capture(model, ids, mask, layers=[1], stop_early=False)
        assert full is not None and calls == [1]
    finally:
        h.remove()
    assert torch.equal(early.resid[1], late.resid[1])


def test_positions_select_tokens_per_row(smollm2):
    ids, mask = _inputs(smollm2)
    last = mask.sum(1) - 1
    _, full = run_with_capture(smollm2.model, ids, mask, layers=[3], stop_early=True)
    _, sel = run_with_capture(smollm2.model, ids, mask, layers=[3], positions=last[:, None], stop_early=True)
    assert sel.resid[3].shape == (2, 1, 576)
    for row in range(2):
        assert torch.equal(sel.resid[3][row, 0], full.resid[3][row, last[row]])


def _hook_ids(blocks):
    """Hook handles on layers and MLPs (transformers 5 keeps its own output-capturing ones)."""
    return [(list(b._forward_hooks), list(b.mlp._forward_hooks)) for b in blocks]


def test_hooks_are_removed_even_when_forward_raises(tiny_qwen):
    model = tiny_qwen.model
    blocks = decoder_layers(model)
    before = _hook_ids(blocks)

    def boom(*args):
        raise RuntimeError("boom")

    bad = blocks[2].register_forward_hook(boom)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            run_with_capture(model, *_inputs(tiny_qwen), layers=[0, 3], mlp_layers=[1], stop_early=False)
    finally:
        bad.remove()
    assert _hook_ids(blocks) == before


@pytest.mark.parametrize("layers", [[4], [-1], [0, 99]])
def test_out_of_range_layer_is_refused(tiny_qwen, layers):
    before = _hook_ids(decoder_layers(tiny_qwen.model))
    with pytest.raises(LayerError, match=r"out of range.*4 layers \(0\.\.3\)"):
        with capture(tiny_qwen.model, layers):
            pass
    assert _hook_ids(decoder_layers(tiny_qwen.model)) == before


def test_converted_smollm2_is_a_plain_savable_model(smollm2, tmp_path):
    import json

    from qsae.lm.models import embedded_model_dir

    folder = embedded_model_dir("smollm2")
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())
    assert not getattr(smollm2.model, "is_quantized", False)
    smollm2.model.save_pretrained(tmp_path / "copy")  # a GGUF-marked model refuses this
    assert (tmp_path / "copy" / "config.json").exists()
