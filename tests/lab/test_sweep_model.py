"""`normlab sweep --model`: the user's network swept, stored with its conversions, resumed,
re-keyed by an edit, and refused with one clear line when it cannot run."""

from __future__ import annotations

import json
import pickle
import re
import shutil
import sqlite3
import sys
import textwrap
from pathlib import Path

import pytest

from normlab.cli import main
from normlab.lab.models.user_model import ModelFactoryError, load_factory
from normlab.lab.run.config import RunConfig, RunRecord
from normlab.lab.run.user_builder import UserModelBuilder
from normlab.lab.sweep.orchestrate import SweepConfig, run_sweep
from normlab.lab.sweep.store import RunStore

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "my_model.py"
#: Small enough for seconds per sweep: one epoch on 128 of the built-in 16×16 images.
TINY = ["--epochs", "1", "--max-train", "128", "--image-size", "16"]


def _sweep(tmp_path: Path, spec: str, *extra: str, db: str = "runs.db") -> list[str]:
    return [
        "sweep",
        "--model",
        spec,
        *TINY,
        "--db",
        str(tmp_path / db),
        "--out",
        str(tmp_path / "report"),
        "--workers",
        "1",
        *extra,
    ]


def _stored(db: Path) -> list[RunRecord]:
    with RunStore(db, create=False) as store:
        return store.records()


@pytest.mark.slow
def test_done_when_command(tmp_path, capsys):
    """The issue's command, scaled down: runs, stores and reports the conversions, resumes."""
    args = _sweep(tmp_path, f"{EXAMPLE}:build", "--norms", "bn,gn", "--batch-sizes", "2,8")
    args += ["--seeds", "2"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "## Conversions of the user's model" in out
    assert "| bn | convert_norms | 4 converted | BatchNorm2d ×4 | 0 | 0 |" in out
    assert "| gn | convert_norms | 4 converted | GroupNorm ×4 | 0 | 0 |" in out
    assert "8 new run(s), 0 already stored" in out
    factory = load_factory(f"{EXAMPLE}:build")
    records = _stored(tmp_path / "runs.db")
    assert sorted((r.config.norm, r.config.batch_size, r.config.seed) for r in records) == [
        (n, b, s) for n in ("bn", "gn") for b in (2, 8) for s in (0, 1)
    ]
    for r in records:
        assert (r.config.model, r.config.model_hash) == ("my_model.py:build", factory.source_hash)
        assert r.packed == 1 and r.final_map == 0  # unpacked, although --pack is the default
        assert r.conversion["norm"] == r.config.norm and r.conversion["converted"] == 4
        assert r.conversion["source_hash"] == factory.source_hash
    # The store keeps the summary as JSON inside each run's record.
    con = sqlite3.connect(tmp_path / "runs.db")
    blob = json.loads(con.execute("SELECT record FROM runs LIMIT 1").fetchone()[0])
    con.close()
    assert blob["conversion"]["factory"] == "my_model.py:build"
    md = (tmp_path / "report" / "report.md").read_text()
    assert "## Conversions of the user's model" in md and "GroupNorm ×4" in md
    assert "- Model: the user's my_model.py:build" in md and "deepest BN" not in md
    # Seeds differ: two runs of one cell are two models.
    errors = {(r.config.norm, r.config.batch_size, r.config.seed): r for r in records}
    assert errors[("gn", 2, 0)].epochs[0].train_loss != errors[("gn", 2, 1)].epochs[0].train_loss
    assert main(args) == 0
    assert "0 new run(s), 8 already stored" in capsys.readouterr().out


def test_an_edited_file_makes_new_runs(tmp_path, capsys):
    spec = tmp_path / "net.py"
    shutil.copy(EXAMPLE, spec)
    args = _sweep(tmp_path, f"{spec}:build", "--norms", "gn", "--batch-sizes", "8")
    args += ["--seeds", "1", "--quiet"]
    assert main(args) == 0
    first = _stored(tmp_path / "runs.db")
    spec.write_text(spec.read_text().replace("width: int = 16", "width: int = 8"))
    # Another source is another protocol: refused in the same store unless allowed ...
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "model_hash" in err and "--allow-mixed-protocols" in err
    assert len(_stored(tmp_path / "runs.db")) == 1
    # ... and then new runs, never the stale ones resumed.
    assert main([*args, "--allow-mixed-protocols"]) == 0
    both = _stored(tmp_path / "runs.db")
    assert len(both) == 2 and len({r.key for r in both}) == 2
    assert {r.config.model_hash for r in both} == {
        first[0].config.model_hash,
        load_factory(f"{spec}:build").source_hash,
    }
    assert {r.conversion["num_parameters"] for r in both} == {33338, 8610}


BAD = {
    "import": ("import torch\nraise RuntimeError('no GPU here')\n", "importing .* failed"),
    "not_a_module": ("def build():\n    return [1, 2]\n", "returned list .* not a torch.nn.Module"),
    "output": (
        """
        from torch import nn

        def build(in_channels=1):
            return nn.Sequential(
                nn.Conv2d(in_channels, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3),
            )
        """,
        r"gives output of shape \(2, 3\), but classification needs \(2, 10\)",
    ),
    "norm": (
        """
        from torch import nn

        def build(num_classes=10, in_channels=1):
            return nn.Sequential(
                nn.Conv2d(in_channels, 8, 3, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                nn.Linear(8, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, num_classes),
            )
        """,
        "norm 'evonorm_b0' cannot be used",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_models_one_line_exit_2_before_the_store(tmp_path, capsys, case):
    source, match = BAD[case]
    path = tmp_path / "bad.py"
    path.write_text(textwrap.dedent(source))
    norms = "bn,evonorm_b0" if case == "norm" else "bn"
    assert main(_sweep(tmp_path, f"{path}:build", "--norms", norms, "--batch-sizes", "2")) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("normlab sweep: error: ") and "\n" not in err, err
    assert "Traceback" not in err
    assert re.search(match, err), err
    assert not (tmp_path / "runs.db").exists()  # checked before the store is created


def test_bad_specs_and_data_parallel_exit_2(tmp_path, capsys):
    assert main(_sweep(tmp_path, str(EXAMPLE), "--norms", "bn")) == 2
    assert "expected 'path/to/file.py:factory'" in capsys.readouterr().err
    assert main(_sweep(tmp_path, "no_such_module_xyz:build", "--norms", "bn")) == 2
    assert "no module named 'no_such_module_xyz'" in capsys.readouterr().err
    assert main(_sweep(tmp_path, f"{EXAMPLE}:build", "--per-rank-batch")) == 2
    assert "--model with --per-rank-batch" in capsys.readouterr().err
    assert not (tmp_path / "runs.db").exists()


@pytest.mark.slow
def test_module_form_in_two_worker_processes(tmp_path, monkeypatch, capsys):
    """``package.module:factory`` works, and spawned workers reload it by its spec."""
    pkg = tmp_path / "mynets"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    shutil.copy(EXAMPLE, pkg / "cnn.py")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("mynets", "mynets.cnn"):  # imported by the sweep: forgotten afterwards
        monkeypatch.delitem(sys.modules, name, raising=False)
    base = ["--norms", "bn,gn", "--batch-sizes", "2,8", "--seeds", "1", "--quiet"]
    args = _sweep(tmp_path, "mynets.cnn:build", *base)
    args[args.index("--workers") + 1] = "2"
    assert main(args) == 0
    two = {r.key: r for r in _stored(tmp_path / "runs.db")}
    assert len(two) == 4 and {r.config.model for r in two.values()} == {"mynets.cnn:build"}
    assert all(r.conversion is not None for r in two.values())
    # One process gives the same runs (same seeds, same models) as the two workers.
    assert main(_sweep(tmp_path, "mynets.cnn:build", *base, db="one.db")) == 0
    one = {r.key: r for r in _stored(tmp_path / "one.db")}
    assert one.keys() == two.keys()
    assert {k: r.final_error for k, r in one.items()} == {k: r.final_error for k, r in two.items()}


def test_run_config_and_record_fields():
    plain = RunConfig(norm="gn", batch_size=4, seed=1)
    d = plain.to_dict()
    assert d["model"] is None and d["model_hash"] is None
    # Old stores keep their keys: fields at their default drop out of the key.
    old = {k: v for k, v in d.items() if k not in ("model", "model_hash")}
    assert RunConfig.from_dict(old).key() == plain.key()
    mine = RunConfig(norm="gn", batch_size=4, seed=1, model="net.py:build", model_hash="ab12")
    edited = RunConfig(norm="gn", batch_size=4, seed=1, model="net.py:build", model_hash="cd34")
    assert len({plain.key(), mine.key(), edited.key()}) == 3
    assert RunConfig.from_dict(mine.to_dict()) == mine
    with pytest.raises(ValueError, match="model and model_hash go together"):
        RunConfig(norm="gn", batch_size=4, seed=1, model="net.py:build")
    record = RunRecord(plain, [], 50.0, 1.0, False, 10, 10, 1)
    stored = record.to_dict()
    del stored["conversion"]  # a record written before the field existed
    assert RunRecord.from_dict(stored).conversion is None


def test_builder_pickles_by_spec_and_refuses_packing(tmp_path):
    factory = load_factory(f"{EXAMPLE}:build")
    build = UserModelBuilder(factory)
    again = pickle.loads(pickle.dumps(build))
    assert again.factory.spec == factory.spec and again.factory.source_hash == factory.source_hash
    cfg = SweepConfig(
        norms=("gn",), batch_sizes=(2,), seeds=(3,), epochs=1, max_train=64, model=factory
    )
    assert cfg.pack is False
    from normlab.lab.data.images import load_split
    from normlab.lab.sweep.orchestrate import plan_runs

    [run] = plan_runs(cfg)
    split = load_split(None, 16, 64)
    with pytest.raises(ValueError, match="unpacked"):
        build(run, split, 2)
    assert build.conversion(run) is None
    model = build(run, split, 1)
    assert build.conversion(run)["new_types"] == {"normlab.nn.group_norm.GroupNorm": 4}
    assert sum(p.numel() for p in model.parameters()) == 33338


def test_run_sweep_raises_model_factory_error(tmp_path):
    path = tmp_path / "bad.py"
    path.write_text("def build():\n    return 'a string'\n")
    cfg = SweepConfig(norms=("bn",), batch_sizes=(2,), seeds=(0,), epochs=1, model=f"{path}:build")
    with pytest.raises(ModelFactoryError, match="not a torch.nn.Module"):
        run_sweep(cfg, tmp_path / "runs.db", workers=1, progress=False)
    assert not (tmp_path / "runs.db").exists()


def test_the_users_data(tmp_path, tiny_npz):
    """On ``--data`` the factory gets that data's classes and channels (2 and 1, 8×8)."""
    cfg = SweepConfig(
        norms=("bn", "gn"),
        batch_sizes=(4,),
        seeds=(0,),
        epochs=1,
        data=str(tiny_npz),
        image_size=8,
        max_train=None,
        model=f"{EXAMPLE}:build",
    )
    result = run_sweep(cfg, tmp_path / "runs.db", workers=1, progress=False)
    assert result.new_runs == 2
    for r in result.records:
        assert r.conversion["output_shape"] == [2, 2] and r.num_train + r.num_test == 48
        assert r.config.data == str(tiny_npz) and 0.0 <= r.final_error <= 100.0
