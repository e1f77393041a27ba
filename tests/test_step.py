"""The training step as a GPU needs it: no value read on the host (each read stalls a CUDA stream), counted on the
CPU by utils.host_reads; a non-finite step skipped on the device and reported at the next read point; the
compiled model."""

import functools

import pytest
import torch
from torchvision.ops import complete_box_iou_loss, generalized_box_iou_loss

import helper
import optimization.base
from argumentparser import build_parser
from dataset.NuscenesDataset.collate_2d import padded_targets
from models.Yolo.boxes import complete_iou_loss, generalized_iou_loss
from optimization.base import BaseSolver
from tests.conftest import PROJECT_ROOT
from utils.config import merge_config
from utils.errors import NonFiniteLossError
from utils.host_reads import HostReadCounter


def solver_args(*flags) -> dict:
    return merge_config(vars(build_parser().parse_args(["--num_cores", "0", *flags])), str(PROJECT_ROOT / "config"))


def yolo_solver(*flags):
    args = solver_args("--cfg", "data.2DObjDet.image.w=96", "--cfg", "data.2DObjDet.image.h=64", *flags)
    return helper.load_solver(args, device=torch.device("cpu"), class_names=[str(i) for i in range(10)],
                              steps_per_epoch=10)


def yolo_batch(boxes_per_image=(3, 0, 1, 2)) -> dict:
    """2 samples x 2 cameras at 96x64 with the given numbers of boxes per image (an image without any included)."""
    generator = torch.Generator().manual_seed(0)
    count = sum(boxes_per_image)
    corners = torch.rand(count, 2, generator=generator) * torch.tensor([70.0, 40.0])
    sizes = 4 + torch.rand(count, 2, generator=generator) * 20
    boxes = torch.cat([corners, corners + sizes], 1)
    image_index = torch.repeat_interleave(torch.arange(len(boxes_per_image)), torch.tensor(boxes_per_image))
    return {"images": torch.randint(0, 256, (2, 2, 3, 64, 96), dtype=torch.uint8, generator=generator),
            **padded_targets(boxes, torch.arange(count) % 10, image_index, len(boxes_per_image))}


@pytest.mark.parametrize("flags", [(), ("--bool_mixed_precision", "1"), ("--grad_clip", "0"),
                                   ("--optimizer_type", "sgd", "--cfg", "model.Yolo.architecture=resnet_fpn",
                                    "--cfg", "model.Yolo.backbone=resnet18")],
                         ids=["csp_pan", "bf16", "no_clipping", "resnet_fpn_sgd"])
def test_a_yolo_step_reads_nothing_on_the_host(flags):
    solver = yolo_solver(*flags)
    solver.mode_selection(True)
    batch = yolo_batch()
    solver.train(batch)  # the first step creates the optimizer state
    with HostReadCounter() as reads:
        for _ in range(2):
            losses = solver.train(batch)
            solver.learning_rate_step()
    assert reads.total == 0, reads.by_op
    assert all(value.dim() == 0 for value in losses.values())
    assert solver.ema_updates == 3 and int(solver.ema.n_averaged) == 3


@pytest.mark.parametrize("app_mode, model_name, task_flags", [
    ("BEVSeg", "LiftBEV", ["--cfg", "data.BEVSeg.bev.x_range_m=[-20.0, 20.0]",
                           "--cfg", "data.BEVSeg.bev.y_range_m=[-20.0, 20.0]", "--cfg", "data.BEVSeg.bev.cell_m=1.0",
                           "--cfg", "model.LiftBEV.image_channels=16", "--cfg", "model.LiftBEV.bev_channels=32",
                           "--cfg", "model.LiftBEV.bev_blocks=1"]),
    ("3DObjDet", "Mono3D", []),
])
def test_a_multi_camera_step_reads_nothing_on_the_host(app_mode, model_name, task_flags, embedded_dir, tmp_path):
    args = solver_args("--app_mode", app_mode, "--model_name", model_name, "--dataset_dir", embedded_dir,
                       "--batch_size", "2", "--cfg", f"data.{app_mode}.image.w=96",
                       "--cfg", f"data.{app_mode}.image.h=64",
                       "--cfg", f'data.{app_mode}.cameras=["CAM_FRONT", "CAM_BACK"]',
                       "--cfg", f"data.{app_mode}.label_cache_dir={tmp_path}", *task_flags)
    dataset, loader = helper.load_datasetloader(args, 1, 0, "train")
    solver = helper.load_solver(args, device=torch.device("cpu"), class_names=dataset.class_names,
                                steps_per_epoch=len(loader))
    solver.mode_selection(True)
    batch = next(iter(loader))
    solver.train(batch)
    with HostReadCounter() as reads:
        solver.train(batch)
        solver.learning_rate_step()
    assert reads.total == 0, reads.by_op


def test_a_non_finite_step_is_skipped_on_the_device_and_reported_at_the_read(monkeypatch):
    solver = yolo_solver()
    solver.mode_selection(True)
    batch = yolo_batch()
    solver.train(batch)
    solver.read_nonfinite()  # all finite: nothing to report
    real_loss = solver.loss_fn.forward

    def nan_loss(outputs, targets):
        losses = real_loss(outputs, targets)
        return {**losses, "total_loss": losses["total_loss"] * float("nan")}

    parameters = [parameter.detach().clone() for parameter in solver.model.parameters()]
    monkeypatch.setattr(solver.loss_fn, "forward", nan_loss)
    with HostReadCounter() as reads:
        solver.train(batch)  # the bad step: skipped by the fused optimizer, decided on the device
    assert reads.total == 0, reads.by_op
    assert all(torch.equal(before, after) for before, after in zip(parameters, solver.model.parameters(), strict=True))
    assert int(solver.optimizer.state_dict()["state"][0]["step"]) == 1
    assert solver.scaler.get_scale() == 1.0  # float32: nothing is scaled, after a skipped step either
    monkeypatch.setattr(solver.loss_fn, "forward", real_loss)
    solver.train(batch)  # a good one after it, before the read
    with pytest.raises(NonFiniteLossError) as error:
        solver.read_nonfinite()
    assert error.value.steps_ago == 1 and error.value.terms["total_loss"] != error.value.terms["total_loss"]
    assert set(error.value.terms) >= {"box_loss", "dfl_loss", "cls_loss", "total_loss"}
    assert all(torch.isfinite(parameter).all() for parameter in solver.model.parameters())


def test_float16_scales_the_loss_and_skips_an_overflowing_step_on_the_device(monkeypatch):
    """Where a GPU has no bfloat16, autocast takes float16 and the GradScaler scales the loss: the same step, run
    here with CPU autocast to float16. A step whose scaled gradients overflow is skipped (the weights stay) and the
    scale halves, with nothing read on the host; the scale backs off until the steps are taken."""
    monkeypatch.setattr(optimization.base, "mixed_precision_dtype", lambda device: torch.float16)
    solver = yolo_solver("--bool_mixed_precision", "1")
    solver.mode_selection(True)
    batch = yolo_batch()
    assert solver.amp_dtype == torch.float16 and solver.scaler.get_scale() == 2.0**16
    solver.train(batch)
    solver.scaler.update(2.0**127)  # the scaled gradients overflow float32
    parameters = [parameter.detach().clone() for parameter in solver.model.parameters()]
    with HostReadCounter() as reads:
        losses = solver.train(batch)
    assert reads.total == 0, reads.by_op
    assert torch.isfinite(losses["total_loss"]) and solver.scaler.get_scale() == 2.0**126
    assert all(torch.equal(before, after) for before, after in zip(parameters, solver.model.parameters(), strict=True))
    solver.scaler.update(2.0**16)
    for _ in range(8):  # float16 gradients overflow at the first scales too
        solver.train(batch)
    assert solver.scaler.get_scale() < 2.0**16
    assert not all(torch.equal(before, after) for before, after in zip(parameters, solver.model.parameters(),
                                                                       strict=True))


def test_the_loss_scale_carries_over_between_float16_runs_only(monkeypatch):
    """A float32 (or bfloat16) run saves no scaler state, as checkpoints always did: a float16 run resumed from it
    keeps its own loss scale, not a fixed 1; a float16 run resumed from a float16 one takes its scale."""
    batch = yolo_batch()
    plain = yolo_solver()
    plain.mode_selection(True)
    plain.train(batch)
    assert plain.state_dict()["scaler"] == {}
    monkeypatch.setattr(optimization.base, "mixed_precision_dtype", lambda device: torch.float16)
    scaled = yolo_solver("--bool_mixed_precision", "1")
    scaled.load_state_dict({**plain.state_dict(), "config": plain.args}, schedule_step=1)
    assert scaled.scaler.get_scale() == 2.0**16
    scaled.mode_selection(True)
    scaled.train(batch)
    scaled.scaler.update(2.0**9)
    resumed = yolo_solver("--bool_mixed_precision", "1")
    resumed.load_state_dict({**scaled.state_dict(), "config": scaled.args}, schedule_step=1)
    assert resumed.scaler.get_scale() == 2.0**9
    plain.load_state_dict({**scaled.state_dict(), "config": scaled.args}, schedule_step=1)  # float16 -> float32
    assert plain.scaler.get_scale() == 1.0


def test_the_compiled_model_trains_like_the_eager_one(monkeypatch):
    """config.json solver.compile: the model is captured by TorchDynamo and AOTAutograd (graph breaks, the backward)
    and trains like the eager one. Inductor's code generation is replaced by the eager "aot_eager" backend: on 2 CPU
    cores it compiles the C++ of this graph in about 130 s, and its numerics are PyTorch's to test."""
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    eager, compiled = yolo_solver("--optimizer_type", "sgd"), yolo_solver("--optimizer_type", "sgd",
                                                                         "--cfg", "config.solver.compile=true")
    compiled.model.load_state_dict(eager.model.state_dict())
    assert compiled.trained_model is not compiled.model  # the torch.compile wrapper
    batch = yolo_batch()
    for solver in (eager, compiled):
        solver.mode_selection(True)
        losses = solver.train(batch)
        solver.losses = losses
    for key, value in eager.losses.items():
        assert torch.allclose(compiled.losses[key].float(), value.float(), rtol=1e-4, atol=1e-5), key
    before = dict(yolo_solver("--optimizer_type", "sgd").model.named_parameters())  # a third copy: the start
    for (name, weight), compiled_weight in zip(eager.model.named_parameters(), compiled.model.parameters(),
                                               strict=True):  # the step: gradients, then weights
        assert torch.allclose(compiled_weight.grad, weight.grad, rtol=1e-3, atol=1e-6), name
        assert torch.allclose(compiled_weight, weight, rtol=1e-4, atol=1e-7), name
    assert any(not torch.equal(weight, before[name]) for name, weight in eager.model.named_parameters())


def test_the_ema_follows_its_warm_up_as_computed_by_hand():
    """ema_n = d_n ema_(n-1) + (1 - d_n) w_n with d_n = min(ema_decay, (1 + n) / (10 + n)) for the n-th update
    after the first, which copies the weights: a one-weight model set to 1, 3, -2, 5 before updates 0-3, decay 0.2,
    which the warm-up reaches at the second update. By hand: 1; 2/11 * 1 + 9/11 * 3 = 29/11 (warm-up);
    1/5 * 29/11 - 4/5 * 2 = -59/55 (the decay); 1/5 * -59/55 + 4/5 * 5 = 1041/275."""
    solver = BaseSolver(torch.nn.Linear(1, 1, bias=False), solver_args("--cfg", "config.solver.ema_decay=0.2"),
                        torch.device("cpu"), steps_per_epoch=1)
    averaged = []
    for weight in (1.0, 3.0, -2.0, 5.0):
        with torch.no_grad():
            solver.model.weight.fill_(weight)
        solver.update_ema()
        averaged.append(solver.ema.module.weight.item())
    assert averaged == pytest.approx([1.0, 29 / 11, -59 / 55, 1041 / 275], rel=1e-6)
    assert solver.evaluated_model() is solver.ema.module


def test_a_mixed_precision_step_moves_the_weights_as_a_float32_step_does():
    """The same step from the same weights in bfloat16 autocast and in float32 (SGD: the update is the gradient):
    the weights move, by about as much and in about the same direction."""
    plain = yolo_solver("--optimizer_type", "sgd")
    mixed = yolo_solver("--optimizer_type", "sgd", "--bool_mixed_precision", "1")
    mixed.model.load_state_dict(plain.model.state_dict())
    before = [weight.detach().clone() for weight in plain.model.parameters()]
    batch = yolo_batch()
    for solver in (plain, mixed):
        solver.mode_selection(True)
        solver.train(batch)
    plain_update, mixed_update = (torch.cat([(weight.detach() - start).flatten() for weight, start in
                                             zip(solver.model.parameters(), before, strict=True)])
                                  for solver in (plain, mixed))
    assert plain_update.norm() > 0 and 0.8 < mixed_update.norm() / plain_update.norm() < 1.25
    assert not torch.equal(plain_update, mixed_update)  # autocast was on
    assert torch.nn.functional.cosine_similarity(plain_update, mixed_update, dim=0) > 0.8  # 0.94 measured


def test_compile_without_a_compiler_warns_and_runs_eager(monkeypatch, caplog):
    monkeypatch.setenv("CXX", "no-such-compiler")
    solver = yolo_solver("--cfg", "config.solver.compile=true")
    assert solver.trained_model is solver.model
    assert "no C++ compiler (no-such-compiler) is on the PATH" in caplog.text


@pytest.mark.parametrize("ours, torchvisions", [(generalized_iou_loss, generalized_box_iou_loss),
                                                (complete_iou_loss, complete_box_iou_loss)])
def test_the_box_losses_without_host_reads_equal_torchvisions(ours, torchvisions):
    generator = torch.Generator().manual_seed(0)
    corners = torch.rand(2, 500, 2, generator=generator) * 50
    boxes, targets = (torch.cat([c, c + 1 + torch.rand(500, 2, generator=generator) * 30], 1) for c in corners)
    boxes.requires_grad_()
    with HostReadCounter() as reads:
        loss = ours(boxes, targets)
        gradient, = torch.autograd.grad(loss.sum(), boxes)
    assert reads.total == 0
    expected = torchvisions(boxes, targets, reduction="none")
    expected_gradient, = torch.autograd.grad(expected.sum(), boxes)
    assert torch.allclose(loss, expected, atol=1e-6) and torch.allclose(gradient, expected_gradient, atol=1e-6)
