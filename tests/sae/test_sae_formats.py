"""SAE loading: every format, numbers against independent references, refusals."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from qsae.errors import SAEFormatError, SAEModelMismatchError, SAENotCachedError, UntrustedPickleError
from qsae.sae.formats import load_sae, load_saes
from qsae.sae.model import check_sae_matches_model, file_sha256

from ..helpers import qwen_scope_dict


def numpy_topk_codes(x, W_enc, b_enc, k):
    """Independent reference: the published Qwen-Scope recipe in numpy (topk of the
    pre-activations, scattered as they are: no ReLU)."""
    pre = x @ W_enc.T + b_enc
    idx = np.argsort(-pre, axis=-1, kind="stable")[..., :k]
    vals = np.take_along_axis(pre, idx, -1)
    order = np.argsort(idx, axis=-1)
    return np.take_along_axis(idx, order, -1), np.take_along_axis(vals, order, -1)


@pytest.fixture
def qwen_scope_repo(tmp_path):
    folder = tmp_path / "SAE-Res-Tiny-W64-L0_5"
    folder.mkdir()
    for layer in (1, 3):
        torch.save(qwen_scope_dict(seed=layer), folder / f"layer{layer}.sae.pt")
    return folder


def test_qwen_scope_encode_matches_numpy_reference(qwen_scope_repo):
    sae = load_sae(qwen_scope_repo, layer=3)
    assert (sae.d_model, sae.d_sae, sae.k, sae.info.layer, sae.info.hook) == (16, 64, 5, 3, "resid_post")
    assert sae.info.sha256 == file_sha256(qwen_scope_repo / "layer3.sae.pt")
    d = qwen_scope_dict(seed=3)
    x = torch.randn(7, 16, generator=torch.Generator().manual_seed(1))
    idx, vals = sae.encode_topk(x)
    ref_idx, ref_vals = numpy_topk_codes(x.numpy().astype(np.float64), d["W_enc"].double().numpy(),
                                         d["b_enc"].double().numpy(), 5)
    np.testing.assert_array_equal(idx.numpy(), ref_idx)
    np.testing.assert_allclose(vals.numpy(), ref_vals, rtol=1e-5, atol=1e-5)
    # decode: x_hat = z @ W_dec.T + b_dec (the card's formula), sparse and dense agree
    z = sae.encode(x)
    ref_xhat = z.double().numpy() @ d["W_dec"].double().numpy().T + d["b_dec"].double().numpy()
    np.testing.assert_allclose(sae.decode(z).numpy(), ref_xhat, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(sae.decode_sparse(idx, vals).numpy(), ref_xhat, rtol=1e-5, atol=1e-4)


def test_qwen_scope_topk_keeps_negative_values_as_the_official_code(tmp_path):
    """Exactly k non-zero features, even when every pre-activation is negative (no ReLU)."""
    d = qwen_scope_dict(seed=4)
    d["b_enc"] = torch.full((64,), -50.0)
    torch.save(d, tmp_path / "layer2.sae.pt")
    sae = load_sae(tmp_path / "layer2.sae.pt", k=5, layer=2)
    assert sae.info.topk_relu is False
    x = torch.randn(9, 16, generator=torch.Generator().manual_seed(2))
    idx, vals = sae.encode_topk(x)
    pre = x.double().numpy() @ d["W_enc"].double().numpy().T + d["b_enc"].double().numpy()
    official = np.zeros_like(pre)
    top = np.argsort(-pre, axis=-1)[:, :5]
    np.put_along_axis(official, top, np.take_along_axis(pre, top, -1), axis=-1)  # topk, scatter, no ReLU
    np.testing.assert_allclose(sae.encode(x).double().numpy(), official, rtol=1e-5, atol=1e-4)
    assert (vals < 0).all() and ((sae.encode(x) != 0).sum(-1) == 5).all()


def test_qwen_scope_folder_errors(qwen_scope_repo, tmp_path):
    with pytest.raises(SAEFormatError, match=r"layers \[1, 3\]"):
        load_sae(qwen_scope_repo, layer=2)
    with pytest.raises(SAEFormatError, match="pass layer="):
        load_sae(qwen_scope_repo)
    no_k = tmp_path / "plain"
    no_k.mkdir()
    torch.save(qwen_scope_dict(), no_k / "layer0.sae.pt")
    with pytest.raises(SAEFormatError, match="needs k"):
        load_sae(no_k, layer=0)
    assert load_sae(no_k, layer=0, k=7).k == 7
    saes = load_saes(qwen_scope_repo, [1, 3])
    assert sorted(saes) == [1, 3] and saes[1].info.sha256 != saes[3].info.sha256


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: d.pop("b_enc"), r"missing keys \['b_enc'\]"),
        (lambda d: d.__setitem__("W_dec", d["W_dec"].T.contiguous()), r"W_dec has shape \(64, 16\).*transposed"),
        (lambda d: d.__setitem__("b_dec", torch.zeros(15)), r"b_dec has shape \(15,\), expected \(16,\)"),
        (lambda d: d["W_enc"].__setitem__((0, 0), float("nan")), "non-finite"),
        (lambda d: d.__setitem__("W_enc", torch.zeros(3)), "must be 2-D"),
    ],
)
def test_bad_qwen_scope_files_are_refused_clearly(tmp_path, mutate, message):
    d = qwen_scope_dict()
    mutate(d)
    path = tmp_path / "layer0.sae.pt"
    torch.save(d, path)
    with pytest.raises(SAEFormatError, match=message):
        load_sae(path, k=4)


class _Trap:
    """Pickles to a call of os.system: loading it unsafely would run a shell command."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_booby_trapped_pickle_runs_no_code(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "layer0.sae.pt"
    torch.save({"W_enc": torch.zeros(4, 2), "payload": _Trap(marker)}, path)
    with pytest.raises(UntrustedPickleError, match="weights_only"):
        load_sae(path, k=1)
    assert not marker.exists()
    # The trap is real: an unsafe load would have run it.
    torch.load(path, weights_only=False)
    assert marker.exists()


class ReleaseSAE(torch.nn.Module):
    """The 9B release's class, as printed in its model card (the independent reference)."""

    def __init__(self, d_in=16, d_sae=64):
        super().__init__()
        self.bias = torch.nn.Parameter(torch.zeros(d_in))
        self.encoder = torch.nn.Linear(d_in, d_sae)
        self.decoder = torch.nn.Linear(d_sae, d_in, bias=False)

    def forward(self, x):
        z = torch.relu(self.encoder(x - self.bias))
        return self.decoder(z) + self.bias, z


def test_relu_checkpoint_matches_release_module(tmp_path):
    torch.manual_seed(0)
    ref = ReleaseSAE()
    with torch.no_grad():
        ref.bias.normal_()
    path = tmp_path / "sae_base_best.pt"
    torch.save({"model_state_dict": ref.state_dict(), "step": 10}, path)
    sae = load_sae(path, layer=16)
    assert (sae.info.activation, sae.info.hook, sae.info.layer, sae.k) == ("relu", "mlp_out", 16, None)
    x = torch.randn(9, 16)
    with torch.no_grad():
        x_hat, z = ref(x)
    torch.testing.assert_close(sae.encode(x), z)
    torch.testing.assert_close(sae(x), x_hat)
    idx, vals = sae.encode_topk(x, k=64)  # k = d_sae: lossless
    torch.testing.assert_close(sae.decode_sparse(idx, vals), x_hat, rtol=1e-5, atol=1e-5)
    bad = {"model_state_dict": {k: v for k, v in ref.state_dict().items() if k != "encoder.bias"}}
    torch.save(bad, tmp_path / "bad.pt")
    with pytest.raises(SAEFormatError, match=r"missing keys \['encoder.bias'\]"):
        load_sae(tmp_path / "bad.pt")


@pytest.mark.parametrize("arch", ["topk", "standard"])
def test_saelens_folder_matches_saelens(tmp_path, arch):
    from sae_lens import SAE as LensSAE
    from sae_lens.saes.standard_sae import StandardSAE, StandardSAEConfig
    from sae_lens.saes.topk_sae import TopKSAE, TopKSAEConfig

    torch.manual_seed(0)
    if arch == "topk":
        lens = TopKSAE(TopKSAEConfig(d_in=16, d_sae=64, k=6))
    else:
        lens = StandardSAE(StandardSAEConfig(d_in=16, d_sae=64))
    with torch.no_grad():
        for p in lens.parameters():
            p.normal_()
    lens.cfg.metadata.hook_name = "blocks.5.hook_resid_post"
    lens.save_model(tmp_path / "sae")
    sae = load_sae(tmp_path / "sae")
    assert (sae.info.layer, sae.info.activation, sae.k) == (5, "relu" if arch == "standard" else "topk", 6 if arch == "topk" else None)
    x = torch.randn(11, 16)
    loaded = LensSAE.load_from_disk(tmp_path / "sae")
    with torch.no_grad():
        torch.testing.assert_close(sae.encode(x), loaded.encode(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(sae(x), loaded(x), rtol=1e-5, atol=1e-4)
    cfg = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    cfg["normalize_activations"] = "layer_norm"
    (tmp_path / "sae" / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(SAEFormatError, match="normalize_activations"):
        load_sae(tmp_path / "sae")


@pytest.mark.parametrize("arch", ["topk", "standard"])
def test_saelens_config_without_apply_b_dec_to_input_means_true(tmp_path, arch):
    """SAELens defaults `apply_b_dec_to_input` to True; a cfg.json that omits it reads so."""
    from sae_lens import SAE as LensSAE
    from sae_lens.saes.standard_sae import StandardSAE, StandardSAEConfig
    from sae_lens.saes.topk_sae import TopKSAE, TopKSAEConfig

    torch.manual_seed(1)
    lens = TopKSAE(TopKSAEConfig(d_in=16, d_sae=64, k=6)) if arch == "topk" else StandardSAE(StandardSAEConfig(d_in=16, d_sae=64))
    with torch.no_grad():
        for p in lens.parameters():
            p.normal_()
        lens.b_dec.mul_(5)  # large enough that subtracting it or not changes the codes
    lens.save_model(tmp_path / "sae")
    cfg = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    cfg.pop("apply_b_dec_to_input")
    (tmp_path / "sae" / "cfg.json").write_text(json.dumps(cfg))
    sae, loaded = load_sae(tmp_path / "sae"), LensSAE.load_from_disk(tmp_path / "sae")
    assert loaded.cfg.apply_b_dec_to_input is True
    x = torch.randn(9, 16)
    with torch.no_grad():
        torch.testing.assert_close(sae.encode(x), loaded.encode(x), rtol=1e-5, atol=1e-5)
    assert torch.equal(sae.b_pre, sae.b_dec)


def test_hf_repo_id_resolves_only_through_local_cache(tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    repo = cache / "models--qsae-test--SAE-Res-Tiny-L0_4"
    snap = repo / "snapshots" / ("a" * 40)
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    torch.save(qwen_scope_dict(), snap / "layer2.sae.pt")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    sae = load_sae("qsae-test/SAE-Res-Tiny-L0_4", layer=2)
    assert sae.k == 4 and sae.info.layer == 2
    with pytest.raises(SAENotCachedError, match="not in the local Hugging Face cache"):
        load_sae("qsae-test/not-downloaded", layer=2)


def test_sae_model_size_mismatch_names_both_numbers(qwen_scope_repo):
    sae = load_sae(qwen_scope_repo, layer=1)
    check_sae_matches_model(sae, 16)
    with pytest.raises(SAEModelMismatchError, match=r"d_model=16.*hidden_size=576"):
        check_sae_matches_model(sae, 576, "SmolLM2")
