"""SyntheticTokens: determinism by seed and position, resumability, learnable structure."""

import math

import pytest
import torch

from healthwatch.demo.data import SyntheticTokens


def test_shape_dtype_range() -> None:
    data = SyntheticTokens(vocab_size=256, seq_len=64, batch_size=8, seed=0)
    batch = data.batch_at(0)
    assert batch.shape == (8, 67) and batch.dtype == torch.long
    assert int(batch.min()) >= 0 and int(batch.max()) < 256
    assert data.tokens_per_batch == 8 * 64


def test_deterministic_by_seed_and_position() -> None:
    a = SyntheticTokens(256, 32, 4, seed=1)
    b = SyntheticTokens(256, 32, 4, seed=1)
    assert torch.equal(a.batch_at(5), b.batch_at(5))
    # Order of access does not matter: position, not history, defines a batch.
    b.batch_at(9)
    assert torch.equal(a.batch_at(7), b.batch_at(7))
    assert not torch.equal(a.batch_at(5), a.batch_at(6))
    assert not torch.equal(a.batch_at(5), SyntheticTokens(256, 32, 4, seed=2).batch_at(5))


def test_iterator_walks_positions() -> None:
    data = SyntheticTokens(64, 16, 2, seed=3)
    got = [next(data) for _ in range(3)]
    for i, batch in enumerate(got):
        assert torch.equal(batch, data.batch_at(i))
    assert data.position == 3
    assert iter(data) is data


def test_state_dict_round_trip_and_branches_see_identical_batches() -> None:
    parent = SyntheticTokens(256, 32, 4, seed=4)
    for _ in range(5):
        next(parent)
    state = parent.state_dict()
    branch_a = SyntheticTokens(256, 32, 4, seed=4)
    branch_b = SyntheticTokens(256, 32, 4, seed=4)
    branch_a.load_state_dict(state)
    branch_b.load_state_dict(dict(state))
    want = [next(parent) for _ in range(3)]
    for w in want:
        assert torch.equal(next(branch_a), w)
        assert torch.equal(next(branch_b), w)
    assert branch_a.position == parent.position == 8


def test_load_state_dict_refuses_another_stream() -> None:
    state = SyntheticTokens(256, 32, 4, seed=4).state_dict()
    with pytest.raises(ValueError, match="seed"):
        SyntheticTokens(256, 32, 4, seed=5).load_state_dict(state)
    with pytest.raises(ValueError, match="seq_len"):
        SyntheticTokens(256, 16, 4, seed=4).load_state_dict(state)


def test_unigram_entropy_is_below_uniform_and_stable() -> None:
    data = SyntheticTokens(256, 64, 8, seed=0)
    before = data.batch_at(0)
    h = data.unigram_entropy()
    assert 3.0 < h < math.log(256) - 0.3
    assert h == data.unigram_entropy()
    # Estimating it draws from its own stream: batches are unchanged.
    assert torch.equal(before, data.batch_at(0)) and data.position == 0
    # A much larger sample agrees to a few hundredths of a nat.
    assert abs(h - data.unigram_entropy(num_tokens=400_000)) < 0.05


def test_has_structure_beyond_unigrams() -> None:
    # The next token is far more predictable from the previous two than from nothing: the
    # plug-in conditional entropy on a big sample is well under the unigram entropy.
    data = SyntheticTokens(64, 256, 64, seed=0)
    seqs = torch.cat([data.batch_at(i) for i in range(8)])
    ctx = seqs[:, :-2] * 64 + seqs[:, 1:-1]
    tri = (ctx * 64 + seqs[:, 2:]).flatten()
    n_tri = torch.bincount(tri, minlength=64**3).double()
    n_ctx = torch.bincount(ctx.flatten(), minlength=64**2).double()
    p_tri = n_tri[n_tri > 0] / n_tri.sum()
    h_joint = -(p_tri * p_tri.log()).sum()
    p_ctx = n_ctx[n_ctx > 0] / n_ctx.sum()
    h_ctx = -(p_ctx * p_ctx.log()).sum()
    assert h_joint - h_ctx < data.unigram_entropy() - 1.0


def test_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError):
        SyntheticTokens(vocab_size=4)
    with pytest.raises(ValueError):
        SyntheticTokens(seed=-1)
    with pytest.raises(ValueError):
        SyntheticTokens().batch_at(-1)
