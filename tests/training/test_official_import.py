"""Importing checkpoints of the official RIDE code: loading that runs no code, the parameter names in both
directions (checked against the official models' own key lists), the architecture read from the name and the
shapes, and the errors for files that match nothing. The whole path (import, evaluate, export, serve) is in
test_official_path.py."""

from __future__ import annotations

import builtins
import hashlib
import os
from pathlib import Path

import pytest
import torch

from training.checkpoint import CheckpointError, load_checkpoint, router_state
from training.config import ConfigError, ModelConfig
from training.models import build_model
from training.models.router import Routers
from training.official.arch import OFFICIAL_ARCHES, convert
from training.official.importer import ImportOptions, import_official
from training.official.keys import CIFAR_LAYOUT, IMAGENET_LAYOUT, Naming, strip_wrappers, to_official_state_dict
from training.official.safe_load import StandIn, UnsafePickleError, load_official_file
from training.run import main

from .official_files import Call, module_while_saving, official_config, save_official_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")

CLASSES = 10


def our_state(arch: str, experts: int, *, top_z: int | None = None, shared_fc: bool = True, **model) -> dict:
    """A state dict of ours (routers under ``routers.`` when ``top_z`` is given), random weights."""
    torch.manual_seed(0)
    built = build_model(ModelConfig(arch=arch, num_experts=experts, **model), CLASSES)
    state = dict(built.state_dict())
    if top_z is not None:
        state.update(router_state(Routers(experts, CLASSES, built.feature_dim, top_z, shared_fc=shared_fc)))
    return state


def official_state(arch: str, experts: int, *, top_z: int | None = None, shared_fc: bool = True, **model) -> dict:
    layout = CIFAR_LAYOUT if arch == "ride_resnet32" else IMAGENET_LAYOUT
    naming = Naming(layout, experts, experts - 1 if top_z else 0, shared_fc)
    return to_official_state_dict(our_state(arch, experts, top_z=top_z, shared_fc=shared_fc, **model), naming)


def _key_digest(keys) -> str:
    return hashlib.sha256("\n".join(sorted(keys)).encode()).hexdigest()


# sha256 of the sorted state-dict keys of the official models (frank-xwang/RIDE-LongTailRecognition ab8be5c,
# model/model.py, reduce_dimension, NormedLinear), measured with the official code.
@pytest.mark.parametrize(
    ("arch", "experts", "routers", "count", "digest"),
    [
        ("ride_resnet32", 1, {}, 187, "57202b19b1cb3fc4b0fdea53465d708a00ac33543a1a1dee1ef4c3c6771506e0"),
        ("ride_resnet32", 3, {}, 429, "3220c526f8c6f08e2eed03645dc9dfe473c8c78792438dd64673f06caabb267c"),
        ("ride_resnet32", 3, {"top_z": 5}, 435, "28197f004839c0b59afa53a8a5bc16f7c096c4d523855c4e969bc44af9ecea97"),
        (
            "ride_resnet32",
            3,
            {"top_z": 5, "shared_fc": False},
            437,
            "ba81f75cfd01f91eb913010e71196e6acfa4a9a52e86131a30471fdd7f23ae33",
        ),
        ("ride_resnet10", 1, {}, 73, "dce7b295f169ba4d1eee72c4b8b83db96902dd3541e50493c655dc33207220bf"),
        ("ride_resnet10", 2, {"top_z": 5}, 114, "e9aebdf99a61530ee164643ead8bbf10e9d6c0a0d52a883a4e59d329924204b5"),
        ("ride_resnet50", 2, {}, 494, "ec71cf488e04a874b2543df25a581fb91315bcb23fc98084eb917b48c011ff59"),
        ("ride_resnext50", 2, {}, 494, "ec71cf488e04a874b2543df25a581fb91315bcb23fc98084eb917b48c011ff59"),
        ("ride_resnext50", 4, {"top_z": 5}, 852, "04cf9e869ed8c3736b3b25bd43f2bc188438fc170fe0cc514447101ed78297df"),
    ],
)
def test_inverse_mapping_gives_exactly_the_official_key_names(
    arch: str, experts: int, routers: dict, count: int, digest: str
) -> None:
    layout = CIFAR_LAYOUT if arch == "ride_resnet32" else IMAGENET_LAYOUT
    naming = Naming(layout, experts, experts - 1 if routers else 0, routers.get("shared_fc", True))
    with torch.device("meta"):  # names only: no memory, no initialisation
        ours = our_state(arch, experts, **routers)
    official = to_official_state_dict(ours, naming)
    assert (len(official), _key_digest(official)) == (count, digest)
    back = {naming.to_ours(key.removeprefix("backbone.")): value for key, value in official.items()}
    assert list(back) == list(ours)


def test_a_few_names_spelled_out() -> None:
    naming = Naming(IMAGENET_LAYOUT, 3, num_routers=2, shared_fc=False)
    assert naming.to_ours("conv1.weight") == "trunk.stem.conv.weight"
    assert naming.to_ours("layer2.0.downsample.1.running_var") == "trunk.layer2.0.shortcut.1.running_var"
    assert naming.to_ours("layer4s.2.0.downsample.0.weight") == "experts.2.features.layer4.0.shortcut.0.weight"
    assert naming.to_ours("linears.1.weight") == "experts.1.classifier.weight"
    assert naming.to_ours("expert_help_pred_fcs.1.bias") == "routers.fcs.1.bias"
    assert naming.to_ours("layer3.0.conv1.weight") is None  # a shared layer3 (share_layer3) is not ours
    cifar = Naming(CIFAR_LAYOUT, 3)
    assert cifar.to_ours("layer3s.0.4.bn2.weight") == "experts.0.features.layer3.4.bn2.weight"
    assert cifar.to_official("trunk.layer1.0.conv1.weight") == "layer1.0.conv1.weight"
    assert strip_wrappers({"module.backbone.bn1.bias": 1}) == {"bn1.bias": 1}


# ---------------------------------------------------------------------------------------------------------------
# Loading that runs no code
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ea_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An official ResNet32EAModel checkpoint (3 experts, top-z 5) with the pickled ConfigParser."""
    path = tmp_path_factory.mktemp("official") / "ea.pth"
    args = {"num_classes": CLASSES, "num_experts": 3, "top_choices_num": 5, "use_norm": True, "pos_weight": 100}
    config = official_config("ResNet32EAModel", args)
    return save_official_checkpoint(
        path, official_state("ride_resnet32", 3, top_z=5), arch="ResNet32EAModel", config=config
    )


def test_plain_weights_only_loading_refuses_the_official_format(ea_file: Path) -> None:
    """Why the restricted loader exists: torch's own safe mode stops at the first global it does not know (here
    the NumPy scalar; the pickled ConfigParser comes next)."""
    with pytest.raises(Exception, match=r"Unsupported global"):
        torch.load(ea_file, weights_only=True)


def test_official_file_loads_with_inert_stand_ins(ea_file: Path) -> None:
    loaded = load_official_file(ea_file)
    assert loaded.stand_ins == sorted(
        ["numpy._core.multiarray.scalar", "numpy.dtype", "parse_config.ConfigParser", "pathlib.PosixPath"]
    )
    config = loaded.content["config"]
    assert isinstance(config, StandIn) and config.global_name == "parse_config.ConfigParser"
    assert config.state["_config"]["arch"]["type"] == "ResNet32EAModel"
    assert isinstance(loaded.content["monitor_best"], StandIn)  # a numpy scalar, recorded, never rebuilt
    assert all(isinstance(v, torch.Tensor) for v in loaded.content["state_dict"].values())


@pytest.mark.parametrize(
    ("function", "argument", "named"),
    [
        (os.system, "touch {marker}", "system"),
        (builtins.eval, "open({marker!r}, 'w')", "builtins.eval"),
        (builtins.exec, "open({marker!r}, 'w')", "builtins.exec"),
    ],
)
def test_a_pickle_that_runs_code_is_refused_and_runs_nothing(
    tmp_path: Path, function, argument: str, named: str, capsys
) -> None:
    marker = tmp_path / "ran"
    path = save_official_checkpoint(
        tmp_path / "evil.pth",
        official_state("ride_resnet32", 2),
        arch="ResNet32Model",
        config=None,
        monitor_best=Call(function, argument.format(marker=str(marker))),
    )
    with pytest.raises(UnsafePickleError, match=named):
        load_official_file(path)
    assert main(["import-official", "--checkpoint", str(path), "--out", str(tmp_path / "out")]) == 2
    assert "refused" in capsys.readouterr().err
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_a_call_to_any_other_global_is_refused_too(tmp_path: Path) -> None:
    """A function of a module the refusal list does not know: its stand-in refuses to be called."""
    ran = []

    def run(*args):
        ran.append(args)

    run.__module__, run.__qualname__ = "innocent_package", "run"
    with module_while_saving("innocent_package", run=run):
        path = save_official_checkpoint(
            tmp_path / "evil.pth", official_state("ride_resnet32", 2), arch="ResNet32Model", config=None, x=Call(run, 1)
        )
    with pytest.raises(UnsafePickleError, match=r"calls innocent_package\.run\(\.\.\.\)"):
        load_official_file(path)
    assert ran == []


def test_not_a_torch_save_archive_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "legacy.pth"
    path.write_bytes(b"\x80\x02}q\x00.")  # a bare pickle, as torch < 1.6 wrote (roughly)
    with pytest.raises(CheckpointError, match=r"not a checkpoint written by torch.save"):
        load_official_file(path)
    with pytest.raises(CheckpointError, match="not found"):
        load_official_file(tmp_path / "absent.pth")


# ---------------------------------------------------------------------------------------------------------------
# Architecture from the name and the shapes
# ---------------------------------------------------------------------------------------------------------------


def test_shapes_give_experts_width_classes_classifier_and_routers() -> None:
    state = official_state("ride_resnet10", 3, top_z=7, reduce_dimension=False, classifier="linear")
    imported = convert(OFFICIAL_ARCHES["ResNet10EAModel"], strip_wrappers(state), {"top_choices_num": 7})
    assert imported.model == ModelConfig(
        arch="ride_resnet10", num_experts=3, reduce_dimension=False, classifier="linear", scale=30.0
    )
    assert imported.num_classes == CLASSES
    assert (imported.routers.top_z, imported.routers.hidden, imported.routers.shared_fc) == (7, 16, True)
    assert imported.routers.threshold == 0.5


def test_per_router_output_layers_import_and_compute_per_router() -> None:
    ours = our_state("ride_resnet32", 3, top_z=4, shared_fc=False)
    naming = Naming(CIFAR_LAYOUT, 3, 2, shared_fc=False)
    imported = convert(OFFICIAL_ARCHES["ResNet32EAModel"], strip_wrappers(to_official_state_dict(ours, naming)), {})
    assert imported.routers.shared_fc is False
    assert all(torch.equal(imported.state[k], ours[k]) for k in ours)
    routers = Routers(3, CLASSES, 48, top_z=4, shared_fc=False)
    routers.load_state_dict({k.removeprefix("routers."): v for k, v in ours.items() if k.startswith("routers.")})
    mean, feature = torch.randn(2, CLASSES), torch.rand(2, 48)
    by_hand = [
        routers.fcs[k - 1](
            torch.cat(
                [
                    mean.topk(4).values,
                    torch.relu(routers.hidden_fcs[k - 1](feature / feature.norm(dim=1, keepdim=True))),
                ],
                1,
            )
        )
        for k in (1, 2)
    ]
    for k in (1, 2):
        torch.testing.assert_close(routers(k, mean, feature), by_hand[k - 1].squeeze(1))


def _convert(arch: str, state: dict, args: dict | None = None):
    return convert(OFFICIAL_ARCHES[arch], strip_wrappers(state), args or {})


def test_unknown_architecture_is_named() -> None:
    with pytest.raises(CheckpointError, match="unknown official architecture 'ResNet152Model'"):
        from training.official.arch import resolve_arch

        resolve_arch("ResNet152Model", None, None)


def test_a_shape_no_supported_architecture_has_is_named() -> None:
    state = official_state("ride_resnet32", 2)
    state["backbone.layer2s.1.0.conv1.weight"] = torch.zeros(32, 16, 3, 3)
    with pytest.raises(CheckpointError, match=r"backbone\.layer2s\.1\.0\.conv1\.weight has shape \[32, 16, 3, 3\]"):
        _convert("ResNet32Model", state)
    wide = official_state("ride_resnet32", 2)
    wide["backbone.linears.0.weight"] = torch.zeros(40, CLASSES)
    with pytest.raises(CheckpointError, match=r"linears\.0\.weight has shape \[40, 10\].*expected 48 or 64"):
        _convert("ResNet32Model", wide)
    # A ResNet-50 file under the ResNeXt-50 name: the bottleneck's inner width tells.
    with pytest.raises(
        CheckpointError, match=r"layer1\.0\.conv1\.weight has shape \[64, 64, 1, 1\].*needs \[128, 64, 1, 1\]"
    ):
        _convert("ResNeXt50Model", official_state("ride_resnet50", 2))


def test_missing_and_unexpected_keys_are_named() -> None:
    state = official_state("ride_resnet32", 2)
    del state["backbone.layer3s.1.4.bn2.running_mean"]
    with pytest.raises(CheckpointError, match=r"missing: backbone\.layer3s\.1\.4\.bn2\.running_mean"):
        _convert("ResNet32Model", state)
    extra = official_state("ride_resnet32", 2)
    extra["backbone.layer2.0.conv1.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match=r"match no part of ResNet32Model: backbone\.layer2\.0\.conv1\.weight"):
        _convert("ResNet32Model", extra)
    with pytest.raises(CheckpointError, match=r"missing key backbone\.expert_help_pred_hidden_fcs\.0\.weight"):
        _convert("ResNet32EAModel", official_state("ride_resnet32", 2))
    with pytest.raises(CheckpointError, match=r"router weights .* give --arch with the EA model, e.g. ResNet32EAModel"):
        _convert("ResNet32Model", official_state("ride_resnet32", 2, top_z=5))


def test_a_router_reading_another_feature_is_refused_not_rewired() -> None:
    """layer3_feat = False in the official code: W1 reads layer2's 24 channels; our graphs cannot give them."""
    state = official_state("ride_resnet32", 2, top_z=5)
    state["backbone.expert_help_pred_hidden_fcs.0.weight"] = torch.zeros(16, 24)
    with pytest.raises(CheckpointError, match=r"shape \[16, 24\].*feature of width 24.*gives 48.*not supported"):
        _convert("ResNet32EAModel", state)


def test_the_top_z_count_comes_from_the_weights_and_must_agree_with_the_config() -> None:
    state = official_state("ride_resnet32", 2, top_z=5)
    assert _convert("ResNet32EAModel", state, {"top_choices_num": 5}).routers.top_z == 5
    with pytest.raises(CheckpointError, match=r"top_choices_num = 30.*5 top logits"):
        _convert("ResNet32EAModel", state, {"top_choices_num": 30})


# ---------------------------------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------------------------------


def _class_names(tmp_path: Path, n: int = CLASSES) -> Path:
    path = tmp_path / "classes.txt"
    path.write_text("".join(f"c{i}\n" for i in range(n)))
    return path


def test_import_writes_a_checkpoint_with_its_provenance(ea_file: Path, tmp_path: Path) -> None:
    out = import_official(ea_file, tmp_path / "imported", ImportOptions(class_names=_class_names(tmp_path)))
    meta, weights = load_checkpoint(out)
    assert meta.stage == "routers" and meta.model.arch == "ride_resnet32" and meta.model.num_experts == 3
    assert meta.routers.top_z == 5 and meta.router_config.pos_weight == 100
    # CIFAR-10 via the official loader: its long tail (imb_factor 0.01 of 5,000 per class) and its mean/std.
    assert meta.class_counts == [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]
    assert meta.input.image_size == 32 and meta.input.mean == (0.4914, 0.4822, 0.4465)
    source = meta.imported_from
    assert (source.file, source.arch, source.epoch) == ("ea.pth", "ResNet32EAModel", 200)
    assert source.config["arch"]["args"]["top_choices_num"] == 5
    assert "parse_config.ConfigParser" in source.stand_ins
    assert any("sigmoid(router logit) > 0.5" in note for note in source.notes)
    expected = our_state("ride_resnet32", 3, top_z=5)
    assert sorted(weights) == sorted(expected) and all(torch.equal(weights[k], expected[k]) for k in expected)


def test_data_parallel_files_and_the_arch_option(tmp_path: Path) -> None:
    state = {"module." + key: value for key, value in official_state("ride_resnet32", 2).items()}
    config = official_config("ResNet32Model", {"num_classes": CLASSES, "num_experts": 2, "use_norm": True})
    del config["arch"]
    path = save_official_checkpoint(tmp_path / "dp.pth", state, arch="DataParallel", config=config)
    options = ImportOptions(class_names=_class_names(tmp_path))
    with pytest.raises(CheckpointError, match=r"does not say which official architecture.*give --arch"):
        import_official(path, tmp_path / "a", options)
    options.arch = "ResNet32Model"
    meta, _ = load_checkpoint(import_official(path, tmp_path / "b", options))
    assert meta.model.num_experts == 2 and meta.stage == "experts"


def test_a_distilled_student_imports_as_distilled(tmp_path: Path) -> None:
    args = {"num_classes": CLASSES, "num_experts": 2, "reduce_dimension": True, "use_norm": True}
    config = official_config("ResNet32Model", args, distill=True, distill_arch={"type": "ResNet32Model"})
    path = save_official_checkpoint(
        tmp_path / "s.pth", official_state("ride_resnet32", 2), arch="ResNet32Model", config=config
    )
    meta, _ = load_checkpoint(
        import_official(path, tmp_path / "out", ImportOptions(class_names=_class_names(tmp_path)))
    )
    assert meta.stage == "distilled"


def test_what_the_file_lacks_must_be_given(tmp_path: Path) -> None:
    args = {"num_classes": CLASSES, "num_experts": 2, "use_norm": True}
    imagenet = official_config("ResNet32Model", args, loader="ImageNetLTDataLoader")
    path = save_official_checkpoint(
        tmp_path / "x.pth", official_state("ride_resnet32", 2), arch="ResNet32Model", config=imagenet
    )
    with pytest.raises(CheckpointError, match="no class names: give --class-names"):
        import_official(path, tmp_path / "a")
    names = _class_names(tmp_path)
    with pytest.raises(CheckpointError, match=r"give --class-counts FILE .* or --train-list"):
        import_official(path, tmp_path / "b", ImportOptions(class_names=names))
    train_list = tmp_path / "ImageNet_LT_train.txt"
    train_list.write_text("".join(f"train/c{c}/{i}.JPEG {c}\n" for c in range(CLASSES) for i in range(30 - 2 * c)))
    meta, _ = load_checkpoint(
        import_official(path, tmp_path / "c", ImportOptions(class_names=names, train_list=train_list))
    )
    assert meta.class_counts == [30 - 2 * c for c in range(CLASSES)]
    assert meta.input.mean == (0.485, 0.456, 0.406)
    unknown = official_config("ResNet32Model", args, loader="MyLoader")
    path = save_official_checkpoint(
        tmp_path / "y.pth", official_state("ride_resnet32", 2), arch="ResNet32Model", config=unknown
    )
    counts = tmp_path / "counts.txt"
    counts.write_text("".join(f"{100 - c}\n" for c in range(CLASSES)))
    options = ImportOptions(class_names=names, class_counts=counts)
    with pytest.raises(ConfigError, match="mean/std"):
        import_official(path, tmp_path / "d", options)
    options.overrides = ("data.mean=[0.5,0.5,0.5]", "data.std=[0.25,0.25,0.25]")
    meta, _ = load_checkpoint(import_official(path, tmp_path / "e", options))
    assert meta.input.std == (0.25, 0.25, 0.25) and meta.class_counts == [100 - c for c in range(CLASSES)]
    options.overrides = ("model.num_experts=3",)
    with pytest.raises(ConfigError, match="only data"):
        import_official(path, tmp_path / "f", options)


def test_a_config_that_contradicts_the_weights_is_an_error(tmp_path: Path) -> None:
    config = official_config("ResNet32Model", {"num_classes": 100, "num_experts": 2, "use_norm": True})
    path = save_official_checkpoint(
        tmp_path / "x.pth", official_state("ride_resnet32", 2), arch="ResNet32Model", config=config
    )
    with pytest.raises(CheckpointError, match=r"arch\.args\.num_classes = 100, but its weights have 10"):
        import_official(path, tmp_path / "out", ImportOptions(class_names=_class_names(tmp_path)))


def test_the_command_refuses_to_overwrite(ea_file: Path, tmp_path: Path, capsys) -> None:
    args = ["import-official", "--checkpoint", str(ea_file), "--class-names", str(_class_names(tmp_path))]
    assert main([*args, "--out", str(tmp_path / "out")]) == 0
    assert main([*args, "--out", str(tmp_path / "out")]) == 2
    assert "already holds a checkpoint" in capsys.readouterr().err
