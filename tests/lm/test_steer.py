"""The intervention building block: a vector added exactly where asked, and the batched greedy
loop against the rivalry paper's own loop (``generate`` with batch 1 and a forward hook)."""

from __future__ import annotations

import pytest
import torch
from transformers import GenerationConfig

from qsae.lm.hooks import decoder_layers, forward_with_capture
from qsae.lm.steer import Steering, add_at, greedy_conditions, steer

LAYER = 15


def _prompt(lm, text="Q: What is the capital of France?\nA:"):
    return lm.tokenizer(text, add_special_tokens=True).input_ids


def test_the_hook_adds_exactly_m_v_at_the_chosen_position_and_nowhere_else(smollm2):
    model = smollm2.model
    ids = torch.tensor([_prompt(smollm2)[:9], _prompt(smollm2, "Q: Who wrote the play Hamlet?\nA: The")[:9]])
    d = model.config.hidden_size
    v = torch.randn(2, d, generator=torch.Generator().manual_seed(0))
    v = 7.5 * v / v.norm(dim=1, keepdim=True)
    pos = torch.tensor([4, 8])
    _, clean = forward_with_capture(model, ids, layers=[LAYER, LAYER + 1], stop_early=False, use_cache=False)
    with steer(model, LAYER, Steering(v), positions=pos):
        _, steered = forward_with_capture(model, ids, layers=[LAYER, LAYER + 1], stop_early=False, use_cache=False)
    diff = steered.resid[LAYER] - clean.resid[LAYER]
    for b in range(2):
        torch.testing.assert_close(diff[b, pos[b]], v[b], rtol=0, atol=1e-5)  # exactly m v there
        others = [t for t in range(ids.shape[1]) if t != pos[b]]
        assert diff[b, others].abs().max() == 0  # and nothing anywhere else
    # downstream: the next layer equals a forward with the edited residual put in its place
    edited = add_at(clean.resid[LAYER], v, pos)

    def put(x):
        return edited

    from qsae.lm.hooks import splice

    with splice(model, LAYER, put):
        _, ref = forward_with_capture(model, ids, layers=[LAYER + 1], stop_early=False, use_cache=False)
    torch.testing.assert_close(steered.resid[LAYER + 1], ref.resid[LAYER + 1], rtol=1e-5, atol=1e-5)
    assert (steered.resid[LAYER + 1][0, : pos[0]] - clean.resid[LAYER + 1][0, : pos[0]]).abs().max() < 1e-5  # causal


def paper_loop(lm, prompt_text, vectors, layer=LAYER, max_new_tokens=10):
    """The paper's exp2 loop for one prompt, as its code runs it: for each condition a batch-1
    ``generate`` (greedy, 10 new tokens) with a forward hook adding the vector at the last
    position of the layer's output of every forward pass."""
    tok, model = lm.tokenizer, lm.model
    inputs = tok(prompt_text, return_tensors="pt")
    texts = []
    for vec in vectors:
        def hook(module, inp, output, vec=vec):
            hidden = output if isinstance(output, torch.Tensor) else output[0]
            steered = hidden.clone()
            steered[0, -1, :] += vec
            return steered if isinstance(output, torch.Tensor) else (steered,) + output[1:]

        handle = decoder_layers(model)[layer].register_forward_hook(hook)
        try:
            with torch.no_grad():
                out = model.generate(inputs["input_ids"], attention_mask=inputs["attention_mask"],
                                     generation_config=GenerationConfig(do_sample=False, max_new_tokens=max_new_tokens,
                                                                        pad_token_id=tok.eos_token_id,
                                                                        eos_token_id=tok.eos_token_id))
        finally:
            handle.remove()
        texts.append(tok.decode(out[0][inputs["input_ids"].shape[1]:], skip_special_tokens=True))
    return texts


@pytest.mark.parametrize("text", ["Q: What is the capital of France?\nA:", "Q: Who was the composer of Carmen?\nA:"])
def test_the_batched_loop_equals_the_papers_loop_for_every_condition(smollm2, text):
    tok, model = smollm2.tokenizer, smollm2.model
    d = model.config.hidden_size
    g = torch.Generator().manual_seed(1)
    dirs = torch.randn(5, d, generator=g)
    dirs = dirs / dirs.norm(dim=1, keepdim=True)
    vectors = torch.cat([torch.zeros(1, d)] + [m * dirs for m in (5.0, 20.0, 80.0)])  # 16 conditions
    out = greedy_conditions(model, _prompt(smollm2, text), vectors, LAYER, 10, [tok.eos_token_id])
    ours = [tok.decode(r[r >= 0].tolist(), skip_special_tokens=True) for r in out.tokens]
    ref = paper_loop(smollm2, text, vectors)
    differ = [i for i, (a, b) in enumerate(zip(ours, ref)) if a != b]
    # float32 sums in another order (16 rows at once vs one) may break a near-tie of the argmax:
    # counted, at most one condition in 16
    assert len(differ) <= 1, [(ours[i], ref[i]) for i in differ]
    assert len(set(ref)) > 1  # the conditions do change the answers: the comparison is not vacuous


def test_rows_that_are_settled_leave_and_the_rest_match(smollm2):
    tok, model = smollm2.tokenizer, smollm2.model
    d = model.config.hidden_size
    vectors = torch.cat([torch.zeros(1, d), 60.0 * torch.nn.functional.normalize(torch.randn(3, d), dim=1)])
    full = greedy_conditions(model, _prompt(smollm2), vectors, LAYER, 10, [tok.eos_token_id])
    part = greedy_conditions(model, _prompt(smollm2), vectors, LAYER, 10, [tok.eos_token_id],
                             settled=lambda row, toks: row > 0 and len(toks) >= 2)
    assert part.left_early == 3 and (part.lengths[1:] == 2).all()
    assert (part.tokens[:, :2] == full.tokens[:, :2]).all() and (part.tokens[0] == full.tokens[0]).all()
