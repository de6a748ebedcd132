"""Seeds packed side by side train exactly like separate runs (up to float rounding).

Every lab norm is trained for an epoch both ways; each seed's weights, buffers and
per-epoch errors must match its own unpacked run. A norm that mixes channels packed as one
wide layer (a wrong ``CHANNEL_SEPARABLE``) must be caught, and a seed that diverges must
leave the others untouched.
"""

from __future__ import annotations

import math

import pytest
import torch

from normlab.lab.data.images import load_split
from normlab.lab.models import resnet as lab_models
from normlab.lab.models.resnet import build_model
from normlab.lab.run import loop as lab_loop
from normlab.lab.run.packed import pack_states, unpack_state
from normlab.lab.run.train import RunConfig, train_model, train_packed, train_runs

NORMS = ["bn", "bn+recal", "bn+recal-pb", "gn", "frn", "sn", "mabn", "brn", "evonorm_b0"]
NORMS += ["evonorm_s0", "ln", "in"]


def _configs(npz, norm: str, seeds=(3, 11), batch_size: int = 4, epochs: int = 2, **kw):
    return [
        RunConfig(
            norm=norm,
            batch_size=batch_size,
            seed=s,
            epochs=epochs,
            data=str(npz),
            image_size=8,
            max_train=None,
            widths=(8, 16),
            base_lr=0.05,
            **kw,
        )
        for s in seeds
    ]


def _split(npz):
    return load_split(str(npz), 8, None)


def _plain(config: RunConfig, split) -> torch.nn.Module:
    return build_model(
        config.norm,
        in_channels=split.in_channels,
        num_classes=split.num_classes,
        widths=config.widths,
    )


def _assert_same_state(got: dict, want: dict, what: str) -> None:
    assert got.keys() == want.keys()
    for k, w in want.items():
        g = got[k]
        if w.is_floating_point():
            scale = max(1.0, float(w.abs().max()))
            err = float((g - w).abs().max()) / scale
            assert err < 5e-5, f"{what}: {k} differs by {err:.2e} (relative to max |w|)"
        else:
            assert torch.equal(g, w), f"{what}: {k}: {g} != {w}"


@pytest.mark.parametrize("norm", NORMS)
def test_packed_training_matches_separate_runs(tiny_npz, norm):
    split = _split(tiny_npz)
    configs = _configs(tiny_npz, norm)
    packed, results = train_packed(configs, split)
    moved = 0
    for s, config in enumerate(configs):
        model, history, diverged = train_model(config, split)
        assert not diverged and not results[s][1]
        got = unpack_state(packed, s, model)
        _assert_same_state(got, model.state_dict(), f"{norm} seed {config.seed}")
        assert [e.test_error for e in results[s][0]] == [e.test_error for e in history]
        for a, b in zip(results[s][0], history, strict=True):
            assert math.isclose(a.train_loss, b.train_loss, rel_tol=1e-4)
            assert a.train_error == b.train_error and a.lr == b.lr
        torch.manual_seed(config.seed)
        init = _plain(config, split)
        moved += sum(
            float((model.state_dict()[k] - v).abs().max()) > 1e-3
            for k, v in init.state_dict().items()
            if v.is_floating_point()
        )
    assert moved > 0, "training did not change the weights: the comparison proves nothing"


def test_pack_unpack_round_trip(tiny_npz):
    split = _split(tiny_npz)
    for norm in ("sn", "gn", "mabn"):
        plains = []
        for seed in (0, 1, 2):
            torch.manual_seed(seed)
            plains.append(_plain(_configs(tiny_npz, norm)[0], split))
        packed = build_model(norm, in_channels=1, num_classes=2, widths=(8, 16), packs=3)
        pack_states(packed, plains)
        for s, p in enumerate(plains):
            _assert_same_state(unpack_state(packed, s, p), p.state_dict(), norm)
        x = [torch.randn(3, 1, 8, 8) + 2.0 for _ in range(3)]
        out = packed(torch.cat(x, dim=1))
        assert out.shape == (3, 3, 2)
        for s, p in enumerate(plains):
            torch.testing.assert_close(out[s], p(x[s]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("norm", ["ln", "sn"])
def test_mixing_is_detected_by_the_comparison(tiny_npz, monkeypatch, norm):
    """LN or SN as one wide layer (statistics over all seeds' channels, SN's mixing weights
    shared): the packed seeds no longer match their own runs, and the comparison says so."""
    split = _split(tiny_npz)
    monkeypatch.setattr(lab_models, "CHANNEL_SEPARABLE", lab_models.CHANNEL_SEPARABLE | {norm})
    configs = _configs(tiny_npz, norm, epochs=1)
    packed, _ = train_packed(configs, split)
    model, _, _ = train_model(configs[0], split)
    with pytest.raises(AssertionError, match="differs"):
        _assert_same_state(unpack_state(packed, 0, model), model.state_dict(), norm)


def test_a_diverging_seed_leaves_the_others_untouched(tiny_npz, monkeypatch):
    split = _split(tiny_npz)
    configs = _configs(tiny_npz, "bn", seeds=(3, 11, 5))
    real_pack = lab_loop.pack_states

    def poison_seed_1(packed, plains):
        real_pack(packed, plains)
        k = packed.head.out_features
        with torch.no_grad():
            packed.head.bias[k : 2 * k] = float("inf")

    monkeypatch.setattr(lab_loop, "pack_states", poison_seed_1)
    packed, results = train_packed(configs, split)
    assert results[1][1] and len(results[1][0]) == 1 and math.isnan(results[1][0][0].train_loss)
    for s in (0, 2):
        history, diverged = results[s]
        assert not diverged and len(history) == configs[s].epochs
        model, ref_history, _ = train_model(configs[s], split)
        _assert_same_state(unpack_state(packed, s, model), model.state_dict(), f"seed {s}")
        assert [e.test_error for e in history] == [e.test_error for e in ref_history]


def test_train_runs_records_and_validation(tiny_npz):
    configs = _configs(tiny_npz, "gn", seeds=(0, 1, 2), epochs=1)
    calls = []
    records = train_runs(configs, on_epoch=lambda i, st: calls.append((i, st.epoch)))
    assert [r.config.seed for r in records] == [0, 1, 2]
    assert all(r.packed == 3 and r.wall_time > 0 and len(r.epochs) == 1 for r in records)
    assert sorted(calls) == [(0, 1), (1, 1), (2, 1)]
    alone = train_runs(configs[:1])
    assert alone[0].packed == 1
    with pytest.raises(ValueError, match="differ only in seed"):
        train_runs([configs[0], _configs(tiny_npz, "bn", seeds=(1,), epochs=1)[0]])
    with pytest.raises(ValueError, match="distinct seeds"):
        train_runs([configs[0], configs[0]])
