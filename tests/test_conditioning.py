"""Conditioning (lightning_modules/generator/conditioning.py): AU encoder, condition dropout/augmentation,
decoupled AU cross-attention on a tiny UNet, adapter save/load, the tiny text encoder."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0

from lightning_modules.generator.conditioning import (AU_ADAPTER_CONFIG, AU_ADAPTER_WEIGHTS, AUEncoder, augment_aus,
                                                      cross_attention_layers, drop_conditions, encode_text,
                                                      install_au_attention, load_au_adapter, null_aus,
                                                      plain_attention_processors, save_au_adapter,
                                                      set_au_attention_scale, tiny_text_encoder)

NUM_AUS, DIM, TOKENS = 6, 32, 3


pytestmark = pytest.mark.usefixtures("single_thread")


def _aus(n: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    aus = torch.rand(n, NUM_AUS, generator=g) * 5
    mask = torch.rand(n, NUM_AUS, generator=g) > 0.3
    mask[:, 0] = False  # every sample has at least one unknown AU
    mask[:, 1] = True
    return aus, mask


def _encoder(seed: int = 0) -> AUEncoder:
    torch.manual_seed(seed)
    return AUEncoder(NUM_AUS, DIM, num_tokens=TOKENS, hidden_dim=16).eval()


# ---------------------------------------------------------------------- AUEncoder
def test_au_encoder_shape():
    enc = _encoder()
    aus, mask = _aus(5)
    out = enc(aus, mask)
    assert out.shape == (5, TOKENS, DIM)
    assert torch.isfinite(out).all()
    # no mask = every AU known
    assert torch.allclose(enc(aus), enc(aus, torch.ones_like(mask)))
    assert enc.config == dict(num_aus=NUM_AUS, token_dim=DIM, num_tokens=TOKENS, hidden_dim=16)


def test_au_encoder_ignores_value_of_unknown_au():
    enc = _encoder()
    aus, mask = _aus()
    changed = aus.clone()
    changed[:, 0] = torch.tensor([0.0, 5.0, 2.0, 4.5])  # AU 0 is unknown everywhere
    assert torch.equal(enc(aus, mask), enc(changed, mask))
    # ... but the value of a known AU matters
    changed = aus.clone()
    changed[:, 1] = 5.0 - changed[:, 1]
    assert not torch.allclose(enc(aus, mask), enc(changed, mask))
    # ... and knowing an AU with value 0 differs from not knowing it
    zeros = torch.zeros_like(aus)
    assert not torch.allclose(enc(zeros, mask), enc(zeros, torch.zeros_like(mask)))


@pytest.mark.parametrize("shape", [(4, NUM_AUS + 1), (NUM_AUS,), (2, 2, NUM_AUS)])
def test_au_encoder_bad_shape(shape):
    with pytest.raises(ValueError, match=rf"expected AUs of shape \(N, {NUM_AUS}\)"):
        _encoder()(torch.zeros(shape))


def test_au_encoder_bad_sizes():
    with pytest.raises(ValueError, match="must be >= 1"):
        AUEncoder(0, DIM)
    with pytest.raises(ValueError, match="must be >= 1"):
        AUEncoder(NUM_AUS, DIM, num_tokens=0)


def test_null_aus():
    aus, mask = null_aus(3, NUM_AUS)
    assert aus.shape == mask.shape == (3, NUM_AUS)
    assert aus.dtype == torch.float32 and mask.dtype == torch.bool
    assert not aus.any() and not mask.any()
    aus16, _ = null_aus(2, NUM_AUS, dtype=torch.float16)
    assert aus16.dtype == torch.float16
    # the null condition is what an all-unknown AU vector encodes to, whatever its values
    enc = _encoder()
    real, _ = _aus(3)
    assert torch.equal(enc(*null_aus(3, NUM_AUS)), enc(real, torch.zeros(3, NUM_AUS, dtype=torch.bool)))


# ---------------------------------------------------------------------- condition dropout / augmentation
def test_drop_conditions_p0_keeps_everything():
    aus, mask = _aus(8)
    caps = [f"caption {i}" for i in range(8)]
    out_aus, out_mask, out_caps = drop_conditions(aus, mask, caps, 0.0, 0.0, torch.Generator().manual_seed(0))
    assert torch.equal(out_aus, aus) and torch.equal(out_mask, mask) and out_caps == caps
    assert out_mask.dtype == torch.bool


def test_drop_conditions_p1_drops_everything():
    aus, mask = _aus(8)
    caps = [f"caption {i}" for i in range(8)]
    out_aus, out_mask, out_caps = drop_conditions(aus, mask, caps, 1.0, 1.0)
    assert out_caps == [""] * 8
    assert not out_aus.any() and not out_mask.any()
    assert out_aus.shape == aus.shape and out_mask.shape == mask.shape
    # inputs are not modified in place
    assert mask.any() and caps[0] == "caption 0"


def test_drop_conditions_text_only_and_au_only():
    aus, mask = _aus(8)
    caps = [f"c{i}" for i in range(8)]
    a, m, c = drop_conditions(aus, mask, caps, 1.0, 0.0)
    assert c == [""] * 8 and torch.equal(a, aus) and torch.equal(m, mask)
    a, m, c = drop_conditions(aus, mask, caps, 0.0, 1.0)
    assert c == caps and not a.any() and not m.any()


def test_drop_conditions_independent_and_seeded():
    n = 200
    aus = torch.full((n, NUM_AUS), 3.0)
    mask = torch.ones(n, NUM_AUS, dtype=torch.bool)
    caps = ["a face"] * n
    a, m, c = drop_conditions(aus, mask, caps, 0.5, 0.5, torch.Generator().manual_seed(123))
    text_dropped = torch.tensor([x == "" for x in c])
    au_dropped = ~m.any(1)
    # whole rows are dropped together
    assert torch.equal(~m.all(1), au_dropped) and torch.equal(a.sum(1) == 0, au_dropped)
    # all four combinations occur: text and AUs are dropped independently
    for t_drop in (True, False):
        for a_drop in (True, False):
            assert ((text_dropped == t_drop) & (au_dropped == a_drop)).any(), (t_drop, a_drop)
    assert 60 < int(text_dropped.sum()) < 140 and 60 < int(au_dropped.sum()) < 140
    # same seed, same drops; another seed, other drops
    a2, m2, c2 = drop_conditions(aus, mask, caps, 0.5, 0.5, torch.Generator().manual_seed(123))
    assert c2 == c and torch.equal(m2, m) and torch.equal(a2, a)
    _, m3, c3 = drop_conditions(aus, mask, caps, 0.5, 0.5, torch.Generator().manual_seed(7))
    assert c3 != c or not torch.equal(m3, m)


def test_augment_aus():
    aus, mask = _aus(16)
    g = torch.Generator().manual_seed(0)
    out = augment_aus(aus, mask, 3.0, g)  # large noise: clipping is exercised
    assert out.shape == aus.shape
    assert out.min() >= 0.0 and out.max() <= 5.0
    assert (out == 0).any() and (out == 5).any()
    assert torch.equal(out[~mask], aus[~mask])          # unknown AUs untouched
    assert not torch.allclose(out[mask], aus[mask])      # known AUs jittered
    # seeded: reproducible
    assert torch.equal(out, augment_aus(aus, mask, 3.0, torch.Generator().manual_seed(0)))
    # no noise: identity
    assert torch.equal(augment_aus(aus, mask, 0.0), aus)
    small = augment_aus(aus, mask, 1e-3, torch.Generator().manual_seed(1))
    assert (small - aus).abs().max() < 0.01


# ---------------------------------------------------------------------- decoupled AU attention on a tiny UNet
def _unet(seed: int = 0, cross_attention_dim: int = DIM):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(block_out_channels=(32, 64), layers_per_block=1, sample_size=16, in_channels=3,
                                out_channels=3, cross_attention_dim=cross_attention_dim, norm_num_groups=8,
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D")).eval()


def _inputs(n: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 16, 16, generator=g)
    text = torch.randn(n, 5, DIM, generator=g)
    t = torch.tensor([10, 500][:n] if n <= 2 else [10] * n)
    return x, t, text


@pytest.fixture(scope="module")
def unet_state():
    return _unet().state_dict()


@pytest.fixture
def unet(unet_state):
    u = _unet()
    u.load_state_dict(unet_state)
    return u


def test_install_replaces_exactly_cross_attention(unet):
    before = dict(unet.attn_processors)
    attn2 = {n for n in before if n.endswith("attn2.processor")}
    assert attn2 and len(attn2) < len(before)
    assert set(cross_attention_layers(unet)) == attn2
    procs = install_au_attention(unet, num_tokens=TOKENS, au_attn_scale=0.5)
    after = unet.attn_processors
    assert set(after) == set(before)
    for name, proc in after.items():
        if name in attn2:
            assert isinstance(proc, IPAdapterAttnProcessor2_0)
            assert proc.scale == [0.5] and proc.num_tokens == (TOKENS,)
        else:
            assert proc is before[name]
    assert isinstance(procs, nn.ModuleDict)
    assert set(procs.keys()) == {n.replace(".", "__") for n in attn2}
    layers = cross_attention_layers(unet)
    for name, attn in layers.items():
        proc = procs[name.replace(".", "__")]
        assert proc is after[name]
        assert torch.equal(proc.to_k_ip[0].weight, attn.to_k.weight)
        assert torch.equal(proc.to_v_ip[0].weight, attn.to_v.weight)
        # copies, not shared storage
        assert proc.to_k_ip[0].weight.data_ptr() != attn.to_k.weight.data_ptr()
    set_au_attention_scale(procs, 2.0)
    assert all(p.scale == [2.0] for p in procs.values())


def test_install_without_cross_attention_raises():
    class NoCross(nn.Module):
        attn_processors = {}

    with pytest.raises(ValueError, match="no cross-attention layers"):
        install_au_attention(NoCross(), num_tokens=TOKENS)


def test_au_attention_scale_zero_equals_plain_attention(unet):
    x, t, text = _inputs()
    with torch.no_grad():
        plain_before = unet(x, t, encoder_hidden_states=text).sample
        enc = _encoder()
        procs = install_au_attention(unet, num_tokens=TOKENS)
        tokens = enc(*_aus(2))
        set_au_attention_scale(procs, 0.0)
        au_off = unet(x, t, encoder_hidden_states=(text, [tokens])).sample
        set_au_attention_scale(procs, 1.0)
        au_on = unet(x, t, encoder_hidden_states=(text, [tokens])).sample
        unet.set_attn_processor(plain_attention_processors(unet))
        assert not any(isinstance(p, IPAdapterAttnProcessor2_0) for p in unet.attn_processors.values())
        plain = unet(x, t, encoder_hidden_states=text).sample
    assert torch.allclose(plain, plain_before, atol=1e-6)
    assert torch.allclose(au_off, plain, atol=1e-5)
    assert not torch.allclose(au_on, plain, atol=1e-3)


def _perturb(module: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)


def test_save_load_au_adapter_roundtrip(tmp_path, unet, unet_state):
    x, t, text = _inputs()
    aus, mask = _aus(2)
    enc = _encoder(1)
    procs = install_au_attention(unet, num_tokens=TOKENS, au_attn_scale=0.7)
    _perturb(procs, 0)   # K/V_au no longer equal K/V_text: the loaded values matter
    _perturb(enc, 1)
    with torch.no_grad():
        ref = unet(x, t, encoder_hidden_states=(text, [enc(aus, mask)])).sample
    save_au_adapter(tmp_path / "adapter", enc, procs, aus=[1, 2, 4, 6, 12, 25], au_attn_scale=0.7)
    assert (tmp_path / "adapter" / AU_ADAPTER_WEIGHTS).is_file()
    assert (tmp_path / "adapter" / AU_ADAPTER_CONFIG).is_file()

    fresh = _unet(seed=5)
    fresh.load_state_dict(unet_state)  # same base weights, fresh modules
    enc2, procs2, config = load_au_adapter(tmp_path / "adapter", fresh)
    assert config["aus"] == [1, 2, 4, 6, 12, 25] and config["au_attn_scale"] == 0.7
    assert enc2.config == enc.config
    assert all(p.scale == [0.7] for p in procs2.values())
    assert set(procs2.keys()) == set(procs.keys())
    enc2.eval()
    with torch.no_grad():
        out = fresh(x, t, encoder_hidden_states=(text, [enc2(aus, mask)])).sample
    assert torch.allclose(out, ref, atol=1e-6)

    # a freshly installed (not loaded) adapter gives something else
    other = _unet()
    other.load_state_dict(unet_state)
    install_au_attention(other, num_tokens=TOKENS, au_attn_scale=0.7)
    with torch.no_grad():
        out_other = other(x, t, encoder_hidden_states=(text, [_encoder(1)(aus, mask)])).sample
    assert not torch.allclose(out_other, ref, atol=1e-4)


def test_load_au_adapter_missing_files(tmp_path, unet):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=AU_ADAPTER_WEIGHTS):
        load_au_adapter(tmp_path / "empty", unet)
    procs = install_au_attention(_unet(), num_tokens=TOKENS)
    save_au_adapter(tmp_path / "a", _encoder(), procs, aus=[1], au_attn_scale=1.0)
    (tmp_path / "a" / AU_ADAPTER_CONFIG).unlink()
    with pytest.raises(FileNotFoundError, match=AU_ADAPTER_CONFIG):
        load_au_adapter(tmp_path / "a", unet)


def test_load_au_adapter_into_mismatched_unet(tmp_path):
    procs = install_au_attention(_unet(), num_tokens=TOKENS)
    save_au_adapter(tmp_path / "a", _encoder(), procs, aus=[1], au_attn_scale=1.0)
    with pytest.raises(ValueError, match="does not fit"):
        load_au_adapter(tmp_path / "a", _unet(cross_attention_dim=16))


# ---------------------------------------------------------------------- text encoder
def test_tiny_text_encoder_and_encode_text():
    torch.manual_seed(0)
    text_encoder, tokenizer = tiny_text_encoder(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=37,
                                                max_length=12)
    text_encoder.eval()
    assert tokenizer.model_max_length == 12
    assert text_encoder.config.hidden_size == 32
    assert text_encoder.config.vocab_size == tokenizer.vocab_size
    caps = ["a smiling face", "", "a very long caption " * 10]  # empty and truncated captions too
    with torch.no_grad():
        emb = encode_text(text_encoder, tokenizer, caps)
    assert emb.shape == (3, 12, 32)
    assert torch.isfinite(emb).all()
    with torch.no_grad():
        single = encode_text(text_encoder, tokenizer, caps[:1])
    assert torch.allclose(single[0], emb[0], atol=1e-5)  # not batch dependent
    assert not torch.allclose(emb[0], emb[1], atol=1e-4)
