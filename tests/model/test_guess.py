"""The looked-ahead layers' guessed queries (kv.lookahead_from): int8 weights made for the
guessed layers only, and guesses close to the model's own float projection."""

import torch

from retrieval_attn.model.llama import Llama
from retrieval_attn.model.spec import ModelSpec

SPEC = ModelSpec(vocab_size=64, hidden_size=96, intermediate_size=128, num_layers=4,
                 num_heads=4, num_kv_heads=2, head_dim=32, qkv_bias=True)


def _model() -> Llama:
    torch.manual_seed(0)
    model = Llama(SPEC)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
        for block in model.layers:  # norm weights near 1, as trained models have them
            block.attn_norm.weight.add_(1.0)
    model.setup_rope(64)
    return model


def test_prepare_guesses_covers_the_guessed_layers_only():
    model = _model()
    model.prepare_guesses(2)
    assert [b.guess is not None for b in model.layers] == [False, False, True, True]
    kept = model.layers[3].guess
    model.prepare_guesses(1)  # layer 0 is never guessed; prepared layers keep theirs
    assert [b.guess is not None for b in model.layers] == [False, True, True, True]
    assert model.layers[3].guess is kept
    model.prepare_guesses(3)
    assert [b.guess is not None for b in model.layers] == [False, False, False, True]


def test_int8_guess_is_close_to_the_float_guess():
    model = _model()
    x = torch.randn(2, 1, SPEC.hidden_size)
    cos, sin = model.cos[17:18], model.sin[17:18]
    want = [b.guess_query(x, cos, sin) for b in model.layers]  # [B, H, 1, D] in float
    model.prepare_guesses(1)
    for block, w in zip(model.layers[1:], want[1:], strict=True):
        got = block.guess_query(x, cos, sin)
        assert got.shape == w.shape == (2, SPEC.num_heads, 1, SPEC.head_dim)
        err = (got - w).norm(dim=-1) / w.norm(dim=-1)
        assert 0 < err.max() < 0.02, err.max()  # rounded, and not by much
    prompt = torch.randn(1, 3, SPEC.hidden_size)  # several tokens: the float path
    assert torch.equal(model.layers[1].guess_query(prompt, model.cos[:3], model.sin[:3]),
                       model.layers[1].attn.query(model.layers[1].attn_norm(prompt),
                                                  model.cos[:3], model.sin[:3]))
