"""normlab.lab.models.user_model: a user's model factory, loaded, built with each norm, checked."""

from __future__ import annotations

import hashlib
import json
import pickle
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from normlab.lab.models import resnet as models
from normlab.lab.models.user_model import (
    ConversionSummary,
    ModelFactoryError,
    build_user_model,
    check_output,
    lab_target,
    load_factory,
)
from normlab.nn import FrozenBatchNorm2d

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "my_model.py"
LAB_NORMS = models._known_names()

# A torchvision-like ResNet (torchvision is not a dependency): residual blocks with a
# projection shortcut, norm_layer=, and variants with a BatchNorm1d head, a frozen BN, ...
RESNETISH = """
import torch
from torch import nn


class Block(nn.Module):
    def __init__(self, cin, cout, stride, norm):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = norm(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = norm(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), norm(cout))

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + (x if self.down is None else self.down(x)))


class TinyResNet(nn.Module):
    def __init__(self, num_classes=1000, in_channels=3, norm_layer=None, head_bn=False):
        super().__init__()
        norm = norm_layer or nn.BatchNorm2d
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, 8, 3, 1, 1, bias=False), norm(8), nn.ReLU()
        )
        self.layer1 = Block(8, 8, 1, norm)
        self.layer2 = Block(8, 16, 2, norm)
        self.layer3 = Block(16, 32, 2, norm)
        self.fc = nn.Linear(32, num_classes)
        if head_bn:
            self.fc = nn.Sequential(
                nn.Linear(32, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, num_classes)
            )

    def forward(self, x):
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(x.mean((2, 3)))


def plain(num_classes=10, in_channels=1):
    return TinyResNet(num_classes, in_channels)


def head_bn(num_classes=10, in_channels=1):
    return TinyResNet(num_classes, in_channels, head_bn=True)


def torchvision_like(num_classes=10, in_channels=1, norm_layer=None):
    return TinyResNet(num_classes, in_channels, norm_layer)


def picky(num_classes=10, in_channels=1, norm_layer=None):
    norm = norm_layer or nn.BatchNorm2d
    return TinyResNet(num_classes, in_channels, lambda c: norm(c, momentum=0.05))
"""


def write(tmp_path: Path, text: str, name: str = "net.py") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


@pytest.fixture
def resnetish(tmp_path):
    return write(tmp_path, RESNETISH, "resnetish.py")


def build(spec: str, norm: str, **kw):
    kw = {"num_classes": 10, "in_channels": 1, "image_size": 16, "seed": 0, **kw}
    return build_user_model(load_factory(spec), norm, **kw)


# ----------------------------------------------------------------------------- loading


def test_load_file_spec(tmp_path, monkeypatch):
    path = write(tmp_path, "def build(num_classes: int = 10, depth=2):\n    return None\n")
    monkeypatch.chdir(tmp_path)
    before = set(sys.modules)
    f = load_factory("net.py:build")
    assert set(sys.modules) == before  # the private module is gone again
    assert f.name == "net.py:build"
    assert f.spec == f"{path.resolve()}:build"
    assert f.accepts == frozenset({"num_classes"})
    assert f.source_hash == hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    assert load_factory(f"{path}:build").source_hash == f.source_hash  # absolute path


def test_a_class_is_a_factory_and_hashes_its_own_file():
    f = load_factory(f"{EXAMPLE}:SmallCNN")
    assert f.accepts == frozenset({"num_classes", "in_channels"})
    assert f.source_hash == hashlib.sha256(EXAMPLE.read_bytes()).hexdigest()[:16]
    model, s = build_user_model(f, "gn", 3, 1, 16, 0)
    assert s.output_shape == (2, 3) and s.factory == "my_model.py:SmallCNN"


def test_hash_changes_with_the_file(tmp_path):
    path = write(tmp_path, "def build():\n    return 1\n")
    first = load_factory(f"{path}:build").source_hash
    path.write_text("def build():\n    return 2\n")
    assert load_factory(f"{path}:build").source_hash != first


def test_pickle_reloads_and_refuses_an_edited_file(tmp_path):
    path = write(tmp_path, RESNETISH)
    f = load_factory(f"{path}:plain")
    again = pickle.loads(pickle.dumps(f))
    assert (again.name, again.source_hash, again.accepts) == (f.name, f.source_hash, f.accepts)
    assert isinstance(again.factory(), nn.Module)
    data = pickle.dumps(f)
    path.write_text(RESNETISH + "\n# edited\n")
    with pytest.raises(ModelFactoryError, match="source changed"):
        pickle.loads(data)


def test_a_file_imports_its_neighbours(tmp_path):
    write(tmp_path, "WIDTH = 7\n", "helpers_for_user_model.py")
    path = write(
        tmp_path, "from helpers_for_user_model import WIDTH\n\ndef build():\n    return WIDTH\n"
    )
    assert load_factory(f"{path}:build").factory() == 7
    assert str(tmp_path) not in sys.path
    sys.modules.pop("helpers_for_user_model", None)


def test_module_spec(tmp_path, monkeypatch):
    pkg = tmp_path / "userpkg_for_lab"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    mod = write(
        pkg,
        "from torch import nn\n\ndef build(in_channels=1, norm_layer=None):\n"
        "    return nn.Conv2d(in_channels, 2, 1)\n",
        "nets.py",
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    f = load_factory("userpkg_for_lab.nets:build")
    assert f.name == "userpkg_for_lab.nets:build"
    assert f.accepts == frozenset({"in_channels", "norm_layer"})
    assert f.source_hash == hashlib.sha256(mod.read_bytes()).hexdigest()[:16]
    for key in ("userpkg_for_lab", "userpkg_for_lab.nets"):
        monkeypatch.delitem(sys.modules, key, raising=False)


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("examples/my_model.py", "expected 'path/to/file.py:factory'"),
        ("examples/my_model.py:", "expected 'path/to/file.py:factory'"),
        ("nowhere/missing.py:build", r"missing\.py does not exist .*current directory"),
        ("normlab_no_such_module_xyz:build", "no module named 'normlab_no_such_module_xyz'"),
        ("not a module:build", "neither a .py file nor a module name"),
    ],
)
def test_bad_specs(spec, match):
    with pytest.raises(ModelFactoryError, match=match):
        load_factory(spec)


@pytest.mark.parametrize(
    ("source", "match"),
    [
        ("def build(:\n", r"importing .* failed with SyntaxError: "),
        ("raise RuntimeError('no GPU here')\n", r"failed with RuntimeError: no GPU here\. Fix"),
        ("import sys\nsys.exit(3)\n", "failed with SystemExit: 3"),
    ],
)
def test_a_file_that_does_not_import(tmp_path, source, match):
    path = write(tmp_path, source)
    with pytest.raises(ModelFactoryError, match=match) as info:
        load_factory(f"{path}:build")
    assert "Traceback" not in str(info.value)


def test_missing_name_lists_what_the_file_defines(tmp_path):
    path = write(
        tmp_path,
        "from os import getcwd\n\nclass Net:\n    pass\n\n"
        "def make_net():\n    return Net()\n\ndef _private():\n    pass\n",
    )
    with pytest.raises(ModelFactoryError, match=r"'build' is not defined .*: Net, make_net\)"):
        load_factory(f"{path}:build")
    empty = write(tmp_path, "X = 1\n", "empty.py")
    with pytest.raises(ModelFactoryError, match="defines no public function or class"):
        load_factory(f"{empty}:build")


def test_not_callable_and_required_parameters(tmp_path):
    path = write(tmp_path, "build = 42\n\ndef deep(depth, num_classes=10):\n    pass\n")
    with pytest.raises(ModelFactoryError, match=r"'build' is a int \(42\), not callable"):
        load_factory(f"{path}:build")
    with pytest.raises(ModelFactoryError, match="requires depth, which the lab cannot pass"):
        load_factory(f"{path}:deep")


# ----------------------------------------------------------------------------- building


def test_every_lab_norm_converts_the_example():
    assert LAB_NORMS[0] == "bn" and "gn" in LAB_NORMS and "frn" in LAB_NORMS
    for norm in LAB_NORMS:
        model, s = build(f"{EXAMPLE}:build", norm)
        assert isinstance(s, ConversionSummary)
        assert (s.built_with, s.built, s.converted, s.output_shape) == (
            "convert_norms",
            0,
            4,
            (2, 10),
        )
        json.dumps(s.to_dict())
        assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
        base = models.resolve_norm(norm)
        want = type(models._norm(base, 16))  # the class the lab's ResNet uses
        if base in ("bn1d", "bn3d"):
            want = type(models._norm("bn", 16))
        assert sum(isinstance(m, want) for m in model.modules()) == 4, norm


def test_bn_becomes_normlabs_batch_norm_with_the_same_numbers():
    ref = load_factory(f"{EXAMPLE}:build")
    torch.manual_seed(0)
    plain = ref.factory()
    model, s = build(f"{EXAMPLE}:build", "bn")
    assert s.new_types == {"normlab.nn.batch_norm.BatchNorm2d": 4}
    assert any("the class the lab's ResNet uses for 'bn'" in n for n in s.notes)
    x = 0.7 + 0.4 * torch.randn(4, 1, 16, 16)
    torch.testing.assert_close(model(x), plain(x), rtol=1e-5, atol=1e-5)
    assert set(model.state_dict()) == set(plain.state_dict())


def test_same_seed_same_model_other_seed_other_model():
    a, _ = build(f"{EXAMPLE}:build", "gn", seed=3)
    b, _ = build(f"{EXAMPLE}:build", "gn", seed=3)
    c, _ = build(f"{EXAMPLE}:build", "gn", seed=4)
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        torch.testing.assert_close(va, vb, msg=k)
    assert not torch.equal(a.features[0][0].weight, c.features[0][0].weight)


def test_summary_of_gn_frn_and_sync(resnetish):
    _, gn = build(f"{resnetish}:plain", "gn")
    assert gn.converted == 9 and gn.new_types == {"normlab.nn.group_norm.GroupNorm": 9}
    by_path = {r["path"]: r for r in gn.layers}
    assert by_path["stem.1"]["old_type"] == "torch.nn.modules.batchnorm.BatchNorm2d"
    assert by_path["stem.1"]["details"]["num_groups"] == models._norm("gn", 8).num_groups == 2
    assert by_path["layer3.bn1"]["details"]["num_groups"] == models._norm("gn", 32).num_groups
    assert "the lab's rule" in by_path["layer3.bn1"]["details"]["groups_reason"]
    model, frn = build(f"{resnetish}:plain", "frn")
    assert all(m.learnable_eps for m in model.modules() if type(m).__name__.startswith("Filter"))
    assert frn.warnings and any("nonlinearity" in w or "TLU" in w for w in frn.warnings)
    assert any("drops the ReLU" in n for n in frn.notes)
    model, sync = build(f"{resnetish}:plain", "bn+sync")
    assert any("synchronized" in n for n in sync.notes)
    synced = [m for m in model.modules() if getattr(m, "process_group", None) is not None]
    assert len(synced) == 9


def test_lab_target_gives_the_lab_resnets_layers():
    for base in ("gn", "frn", "sn", "in", "brn"):
        to, kw = lab_target(base)
        model = nn.Sequential(nn.Conv2d(1, 48, 1), nn.BatchNorm2d(48))
        from normlab.convert import convert_norms

        convert_norms(model, to, **kw)
        lab = models._norm(base, 48)
        assert type(model[1]) is type(lab)
        for attr in ("num_groups", "learnable_eps"):
            assert getattr(model[1], attr, None) == getattr(lab, attr, None), (base, attr)


def test_torchvision_like_factory_gets_norm_layer(resnetish):
    for norm in LAB_NORMS:
        model, s = build(f"{resnetish}:torchvision_like", norm)
        assert (s.built_with, s.built, s.converted) == ("norm_layer", 9, 0), norm
        assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
        assert sum(s.new_types.values()) == 9
        json.dumps(s.to_dict())


def test_norm_layer_that_does_not_fit_falls_back_to_batch_norm(resnetish):
    model, s = build(f"{resnetish}:picky", "gn")
    assert (s.built_with, s.built, s.converted) == ("convert_norms", 0, 9)
    assert "momentum" in s.warnings[0] and "norm_layer=torch.nn.BatchNorm2d" in s.warnings[0]
    model, s = build(f"{resnetish}:picky", "bn")  # normlab BN takes momentum=
    assert (s.built_with, s.built) == ("norm_layer", 9)


def test_head_batch_norm_1d(resnetish):
    model, s = build(f"{resnetish}:head_bn", "gn")
    assert s.converted == 10
    assert "normlab.nn.batch_norm.BatchNorm1d" in build(f"{resnetish}:head_bn", "bn")[1].new_types
    with pytest.raises(ModelFactoryError, match=r"norm 'evonorm_b0' cannot be used .*fc\.1"):
        build(f"{resnetish}:head_bn", "evonorm_b0")
    with pytest.raises(
        ModelFactoryError,
        match=r"norm 'ln' does not fit .*in fc\.1 \(LayerNorm2d\).*BatchNorm it runs",
    ):
        build(f"{resnetish}:head_bn", "ln")


def test_frozen_batch_norm_is_skipped_unless_asked(tmp_path):
    path = write(
        tmp_path,
        "from torch import nn\nfrom normlab.nn import FrozenBatchNorm2d\n\n"
        "def build(num_classes=10, in_channels=1):\n"
        "    return nn.Sequential(nn.Conv2d(in_channels, 8, 3), FrozenBatchNorm2d(8),\n"
        "        nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8), nn.AdaptiveAvgPool2d(1),\n"
        "        nn.Flatten(), nn.Linear(8, num_classes))\n",
    )
    model, s = build(f"{path}:build", "gn")
    assert s.converted == 1 and s.skipped[0]["path"] == "1" and "frozen" in s.skipped[0]["reason"]
    assert isinstance(model[1], FrozenBatchNorm2d)
    model, s = build(f"{path}:build", "gn", frozen=True)
    assert s.converted == 2 and not s.skipped


def test_factory_errors(tmp_path):
    path = write(
        tmp_path,
        "from torch import nn\n\n"
        "def broken(num_classes=10):\n    raise KeyError('widths')\n\n"
        "def tensor():\n    import torch\n    return torch.zeros(3)\n\n"
        "class Net(nn.Module):\n    pass\n\ndef klass():\n    return Net\n\n"
        "def no_bn(num_classes=10, in_channels=1):\n"
        "    return nn.Sequential(nn.Flatten(), nn.Linear(256 * in_channels, num_classes))\n",
    )
    with pytest.raises(
        ModelFactoryError,
        match=r"net\.py:broken raised KeyError: 'widths' \(called as broken\(num_classes=10\)\)",
    ):
        build(f"{path}:broken", "gn")
    with pytest.raises(ModelFactoryError, match="returned Tensor tensor.*not a torch.nn.Module"):
        build(f"{path}:tensor", "gn")
    with pytest.raises(
        ModelFactoryError, match=r"returned type .*\(the class itself: instantiate it\)"
    ):
        build(f"{path}:klass", "gn")
    with pytest.raises(
        ModelFactoryError, match="no BatchNorm layer and the factory takes no norm_layer="
    ):
        build(f"{path}:no_bn", "bn")


# ----------------------------------------------------------------------------- output check


OUTPUTS = """
from torch import nn


def head(c):
    return nn.Sequential(nn.Conv2d(c, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1))


def seven(in_channels=1):
    return nn.Sequential(head(in_channels), nn.Flatten(), nn.Linear(8, 7))


def ignores(num_classes=10, in_channels=1):
    return seven(in_channels)


def unflat(num_classes=10, in_channels=1):
    return nn.Sequential(head(in_channels), nn.Conv2d(8, num_classes, 1))


def rgb(num_classes=10):
    return nn.Sequential(head(3), nn.Flatten(), nn.Linear(8, num_classes))
"""


def test_classification_output_errors(tmp_path):
    path = write(tmp_path, OUTPUTS)
    with pytest.raises(
        ModelFactoryError,
        match=r"shape \(2, 7\).*needs \(2, 10\); set the last layer to num_classes=10 or accept",
    ):
        build(f"{path}:seven", "gn")
    with pytest.raises(ModelFactoryError, match="accepts num_classes= but the model ignores it"):
        build(f"{path}:ignores", "gn")
    with pytest.raises(ModelFactoryError, match=r"\(2, 10, 1, 1\).*torch\.flatten\(x, 1\)"):
        build(f"{path}:unflat", "gn")
    with pytest.raises(
        ModelFactoryError, match=r"failed in 0\.0 \(Conv2d\) with RuntimeError.*in_channels=1"
    ):
        build(f"{path}:rgb", "gn")


class Seg(nn.Module):
    """conv-BN-ReLU, 1×1 conv to K logit maps; ``size`` pools them down when not None."""

    def __init__(self, k: int, pool: bool = False, as_dict: bool = False) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, k, 1)
        )
        self.pool, self.as_dict = pool, as_dict

    def forward(self, x):
        y = self.body(x)
        y = nn.functional.avg_pool2d(y, 2) if self.pool else y
        return {"out": y} if self.as_dict else y


def test_segmentation_output_and_the_model_is_left_as_it_was():
    model = Seg(5)
    kw = {"num_classes": 5, "in_channels": 1, "image_size": 12}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    assert check_output(model, "segmentation", **kw) == (2, 5, 12, 12)
    assert torch.equal(torch.get_rng_state(), rng)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    with pytest.raises(
        ModelFactoryError, match=r"\(2, 5, 6, 6\).*needs \(2, 5, 12, 12\); upsample"
    ):
        check_output(Seg(5, pool=True), "segmentation", **kw)
    with pytest.raises(
        ModelFactoryError, match=r"returned a dict with keys \['out'\], not a tensor"
    ):
        check_output(Seg(5, as_dict=True), "segmentation", **kw)
    with pytest.raises(ModelFactoryError, match=r"needs \(2, 5\)"):
        check_output(Seg(5), "classification", **kw)
    with pytest.raises(ValueError, match="unknown task 'keypoints'"):
        check_output(model, "keypoints", **kw)
    with pytest.raises(ModelFactoryError, match="needs a torchvision-style detector"):
        check_output(model, "detection", **kw)


def test_build_for_segmentation(tmp_path):
    path = write(
        tmp_path,
        """
        from torch import nn


        def build(num_classes=10, in_channels=1):
            return nn.Sequential(
                nn.Conv2d(in_channels, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                nn.Conv2d(8, num_classes, 1),
            )
        """,
    )
    model, s = build(f"{path}:build", "sn", num_classes=4, task="segmentation")
    assert s.output_shape == (2, 4, 16, 16) and s.converted == 1
    with pytest.raises(ModelFactoryError, match=r"needs \(2, 4\); flatten the pooled"):
        build(f"{path}:build", "sn", num_classes=4, image_size=1)
