"""A small causal-LM fine-tune, enough to make a "fine-tuned variant" for the compare demo.

Trains every weight with AdamW on short texts (e.g. "Q: ...\\nA: answer" lines), loss on all
tokens, seeded, and saves a plain transformers folder with the tokenizer and a revision file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from collections.abc import Sequence
from pathlib import Path

import torch

from qsae.lm.models import LoadedModel

log = logging.getLogger("qsae.lm.finetune")


def popqa_lines(questions) -> list[str]:
    """Fine-tuning texts from PopQA rows: the question and its first gold answer."""
    return [f"Q: {q.question}\nA: {q.answers[0]}\n" for q in questions if q.answers]


def finetune(lm: LoadedModel, texts: Sequence[str], out: Path, *, steps: int = 300, batch: int = 8, lr: float = 1e-4,
             seed: int = 0) -> Path:
    """Fine-tune ``lm`` in place on ``texts`` and save it to ``out``; returns ``out``."""
    torch.manual_seed(seed)
    rng = random.Random(seed)
    tok, model = lm.tokenizer, lm.model
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    pad = tok.pad_token_id
    losses = []
    for step in range(steps):
        picked = [texts[rng.randrange(len(texts))] for _ in range(batch)]
        enc = [tok(t, add_special_tokens=False).input_ids + [tok.eos_token_id] for t in picked]
        width = max(len(e) for e in enc)
        ids = torch.full((batch, width), pad, dtype=torch.long)
        mask = torch.zeros((batch, width), dtype=torch.long)
        for i, e in enumerate(enc):
            ids[i, : len(e)] = torch.tensor(e)
            mask[i, : len(e)] = 1
        labels = ids.masked_fill(mask == 0, -100)
        loss = model(input_ids=ids.to(lm.device), attention_mask=mask.to(lm.device), labels=labels.to(lm.device)).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if (step + 1) % 50 == 0:
            log.info(f"fine-tune step {step + 1}/{steps}: loss {sum(losses[-50:]) / 50:.3f}")
    model.eval()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    digest = hashlib.sha256(json.dumps([lm.revision, steps, batch, lr, seed, len(texts)]).encode()).hexdigest()[:16]
    (out / "qsae_revision.txt").write_text(f"finetune-{digest}\n")
    (out / "qsae_finetune.json").write_text(json.dumps({"base": lm.name, "base_revision": lm.revision, "steps": steps,
                                                        "batch": batch, "lr": lr, "seed": seed, "texts": len(texts),
                                                        "final_loss": sum(losses[-50:]) / min(50, len(losses))}))
    return out
