"""Self-distillation: the trainer adds the teacher's KD term (checked against a hand computation), the teacher
stays frozen in eval mode, the student checkpoint records its teacher, and bad teachers fail clearly."""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import pytest
import torch

from training.checkpoint import CheckpointError, load_meta, save_meta, weights_sha256
from training.config import ConfigError, TrainConfig, config_from_dict
from training.data import BatchAugment, DataError, ImageSet, iterate_batches, load_data
from training.distill import load_teacher
from training.losses import ExpertLoss, build_loss
from training.models import build_model
from training.run import main
from training.run_folder import epoch_seed
from training.runtime import Runtime
from training.schedule import drw_epoch, resolve_schedule
from training.train import logit_scale, train, train_one_epoch

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parents[2]


def _student_config(teacher: Path, **sections: dict) -> TrainConfig:
    raw = load_meta(teacher).config.model_dump(mode="json")
    raw["name"] = "student"
    raw["model"]["num_experts"] = 2
    for section, values in sections.items():
        raw[section].update(values)
    return config_from_dict(raw)


def _one_epoch_loss(student, cfg: TrainConfig, train_set: ImageSet, teacher) -> tuple[float, ExpertLoss]:
    counts = torch.bincount(train_set.labels, minlength=10).clamp(min=1).tolist()
    loss_fn = build_loss(cfg.loss, counts, logit_scale(cfg), drw_epoch(cfg.loss, resolve_schedule(cfg.schedule)))
    loss_fn.set_epoch(1)
    # lr 0: the step changes nothing, so the epoch's reported loss is the loss of the initial weights.
    optimizer = torch.optim.SGD(student.parameters(), lr=0.0)
    stats = train_one_epoch(
        student,
        loss_fn,
        optimizer,
        train_set,
        BatchAugment.from_config(cfg.data),
        cfg=cfg,
        epoch=1,
        runtime=Runtime(torch.device("cpu")),
        progress=False,
        teacher=teacher,
    )
    return stats.loss, loss_fn


def test_trainer_adds_the_kd_term_on_mean_logits_with_an_eval_mode_teacher(tiny_checkpoint: Path) -> None:
    cfg = _student_config(tiny_checkpoint, optim={"batch_size": 16}, distill={"temperature": 1.5, "factor": 0.5})
    data = load_data(cfg.data, progress=False)
    train_set = ImageSet(data.train.images[:16], data.train.labels[:16])
    teacher = load_teacher(tiny_checkpoint, cfg)
    teacher_before = {k: v.clone() for k, v in teacher.model.state_dict().items()}
    torch.manual_seed(1)
    student = build_model(cfg.model, data.num_classes)
    reference_student, reference_teacher = copy.deepcopy(student), copy.deepcopy(teacher.model)

    with_teacher, loss_fn = _one_epoch_loss(student, cfg, train_set, teacher)
    without_teacher, _ = _one_epoch_loss(copy.deepcopy(reference_student), cfg, train_set, None)

    # By hand: the same augmented batch, the student in train mode, the teacher in eval mode.
    generator = torch.Generator().manual_seed(epoch_seed(cfg.runtime.seed, 1))
    (indices,) = list(iterate_batches(16, 16, shuffle=True, seed=cfg.runtime.seed, epoch=1))
    images = BatchAugment.from_config(cfg.data)(train_set.images[indices], generator)
    reference_student.train()
    student_mean = reference_student(images).logits.mean(dim=1)
    with torch.no_grad():
        teacher_mean = reference_teacher.eval()(images).logits.mean(dim=1)
    tau = 1.5
    p_teacher = torch.softmax(teacher_mean / tau, dim=1)
    log_p_student = torch.log_softmax(student_mean / tau, dim=1)
    kl = (p_teacher * (p_teacher.log() - log_p_student)).sum(dim=1).mean()
    expected_kd = 0.5 * tau**2 * kl.item()

    assert expected_kd > 1e-3  # the term is large enough for the comparison to mean something
    assert with_teacher - without_teacher == pytest.approx(expected_kd, rel=1e-4)
    base = loss_fn(reference_student(images).logits, train_set.labels[indices]).item()
    assert without_teacher == pytest.approx(base, rel=1e-5)
    # The teacher is untouched: eval mode, no gradients, weights and batch-norm statistics bit-identical.
    assert not teacher.model.training and not any(p.requires_grad for p in teacher.model.parameters())
    assert all(torch.equal(v, teacher.model.state_dict()[k]) for k, v in teacher_before.items())


def test_distill_cli_writes_a_student_that_records_its_teacher(
    tiny_checkpoint: Path, tiny_data_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "student"
    overrides = [
        f'data.root="{tiny_data_dir}"',
        f'data.cache_dir="{tmp_path / "cache"}"',
        "data.dataset=folder",
        "data.imbalance_factor=10",
        "data.val_per_class=20",  # leaves 46 training images: a cheap epoch
        "data.many_shot_above=15",
        "data.few_shot_below=5",
        "model.num_experts=2",
        "schedule.epochs=1",
        "optim.batch_size=64",
        "runtime.num_threads=1",
    ]
    args = ["distill", "--teacher", str(tiny_checkpoint), "--config", str(REPO / "configs" / "cifar10_lt_ride3.toml")]
    sets = [item for value in overrides for item in ("--set", value)]
    assert main([*args, *sets, "--out", str(out), "--device", "cpu"]) == 0
    meta = load_meta(out)
    assert meta.stage == "distilled" and meta.complete and meta.model.num_experts == 2
    assert meta.parent == weights_sha256(tiny_checkpoint)
    assert meta.metrics.distillation.temperature == 1.5
    assert meta.metrics.distillation.teacher_experts == 3


def test_teacher_with_other_classes_is_a_clear_error(tiny_checkpoint: Path, tmp_path: Path) -> None:
    teacher = Path(shutil.copytree(tiny_checkpoint, tmp_path / "teacher"))
    meta = load_meta(teacher)
    save_meta(teacher, meta.model_copy(update={"class_names": [f"other{i}" for i in range(meta.num_classes)]}))
    cfg = _student_config(tiny_checkpoint)
    with pytest.raises(DataError, match="same classes in the same order"):
        train(cfg, out=tmp_path / "student", teacher=load_teacher(teacher, cfg))


def test_teacher_checks_experts_input_and_existence(tiny_checkpoint: Path, tmp_path: Path) -> None:
    same_size = _student_config(tiny_checkpoint, model={"num_experts": 3})
    with pytest.warns(UserWarning, match="teacher has 3 experts and the student 3"):
        load_teacher(tiny_checkpoint, same_size)
    other_input = _student_config(tiny_checkpoint, data={"mean": [0.5, 0.5, 0.5]})
    with pytest.raises(ConfigError, match="same normalised images"):
        load_teacher(tiny_checkpoint, other_input)
    with pytest.raises(CheckpointError, match="not found"):
        load_teacher(tmp_path / "missing", same_size)
