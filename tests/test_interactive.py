"""SAM's interactive training recipe: the error-region sampler, the click schedule, the passes of a
step, mixed mask prompts, the step's gradient, DDP, resume."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from samcache.config import PromptSettings, TrainConfig
from samcache.models.decoder import DecoderOutput, compute_loss, decode
from samcache.models.families import family_of
from samcache.models.prompts import PromptBatch, click_schedule, trained_passes, training_prompt
from samcache.models.weights import build_tiny
from samcache.train.interactive import ADDS_POINT, PICK, USES_MASK, ClickSimulation, error_points
from samcache.train.runs import RunCheckpoint
from samcache.train.samples import ClickSchedules
from samcache.train.step import interactive_step
from samcache.train.trainer import train
from tests.helpers import QUICK_TRAIN, assert_same_last_checkpoint, train_process

INTERACTIVE = PromptSettings(mode="interactive")


def _square(n: int, y0: int, x0: int, y1: int, x1: int) -> torch.Tensor:
    mask = torch.zeros((n, n), dtype=torch.bool)
    mask[y0:y1, x0:x1] = True
    return mask


# ------------------------------------------------------------------------------- the sampler
def test_error_points_are_positive_in_misses_negative_in_false_ones_and_absent_when_perfect():
    truth = _square(256, 50, 50, 150, 150)
    pred = _square(256, 100, 50, 200, 150)  # misses rows 50-99, claims rows 150-199
    valid = torch.ones((256, 256), dtype=torch.bool)
    picks = (torch.arange(400, dtype=torch.float64) + 0.5) / 400
    n = len(picks)
    points, labels, found = error_points(pred.expand(n, -1, -1), truth.expand(n, -1, -1), valid.expand(n, -1, -1),
                                         picks)
    assert found.all()
    ys, xs = ((points / 4) - 0.5).round().long().unbind(1)[::-1]
    assert ((points / 4 - 0.5) == (points / 4 - 0.5).round()).all()  # pixel centres of the 256 frame, in 1024 px
    for y, x, label in zip(ys.tolist(), xs.tolist(), labels.tolist()):
        if label == 1:
            assert truth[y, x] and not pred[y, x]
        else:
            assert pred[y, x] and not truth[y, x]
    # Uniform over the error region: the two parts are equal (5000 pixels each), so are their shares.
    assert abs(int(labels.sum()) - n // 2) <= 2
    # The ends of the pick's range are the ends of the region in raster order.
    ends, end_labels, _ = error_points(pred.expand(2, -1, -1), truth.expand(2, -1, -1), valid.expand(2, -1, -1),
                                       torch.tensor([0.0, 1 - 1e-9], dtype=torch.float64))
    assert (ends / 4 - 0.5).tolist() == [[50, 50], [149, 199]] and end_labels.tolist() == [1, 0]

    _, _, found = error_points(truth[None], truth[None], valid[None], torch.tensor([0.3]))
    assert not found.any()


def test_error_points_never_fall_in_the_padding():
    truth = torch.zeros((1, 256, 256), dtype=torch.bool)
    pred = torch.ones((1, 256, 256), dtype=torch.bool)  # false everywhere, padding included
    valid = _square(256, 0, 0, 100, 256)[None]  # a wide image: rows 100+ are padding
    for pick in np.linspace(0, 0.999, 50):
        points, labels, found = error_points(pred, truth, valid, torch.tensor([pick]))
        assert found.all() and labels.item() == 0
        assert points[0, 1] < 100 * 4


# ------------------------------------------------------------------------------ the schedule
def test_the_schedule_is_sams_eleven_passes_seeded_by_its_keys():
    sams = PromptSettings(mode="interactive", mask_prompt_prob=1.0)
    schedule = click_schedule(sams, 0, 1, 5, 2)
    assert schedule.shape == (3, 11) == (3, sams.passes)
    adds, uses, picks = schedule
    assert adds[0] == 0 and uses[0] == 0  # pass 0 is the first prompt
    assert adds.sum() == 8  # the corrective points
    refine = [p for p in range(1, 11) if not adds[p]]
    assert len(refine) == 2 and refine[-1] == 10  # one random, one last
    assert uses[1:].all()  # mask_prompt_prob 1: every later pass gets the mask
    assert ((picks[1:] >= 0) & (picks[1:] < 1)).all()
    np.testing.assert_array_equal(schedule, click_schedule(sams, 0, 1, 5, 2))
    assert not np.array_equal(schedule, click_schedule(sams, 0, 2, 5, 2))  # another epoch
    assert not np.array_equal(schedule, click_schedule(sams, 0, 1, 5, 3))  # another object
    # Where the random refinement goes varies between objects, over all 9 places before the last.
    places = {int(np.flatnonzero(click_schedule(sams, 0, 0, i, 1)[0][1:] == 0)[0]) + 1 for i in range(300)}
    assert places == set(range(1, 10))


def test_mask_feedback_probability_and_off():
    half = INTERACTIVE  # the default: 0.5
    assert half.mask_prompt_prob == 0.5
    draws = np.stack([click_schedule(half, 0, 0, i, 1) for i in range(200)])
    point_passes = draws[:, ADDS_POINT] == 1
    share = draws[:, USES_MASK][point_passes].mean()
    assert 0.4 < share < 0.6
    refine = (draws[:, ADDS_POINT] == 0)
    refine[:, 0] = False
    assert (draws[:, USES_MASK][refine] == 1).all()  # the refinement passes always get the mask

    off = PromptSettings(mode="interactive", mask_prompt_prob=0.0, click_iterations=3)
    schedule = click_schedule(off, 0, 0, 0, 1)
    assert schedule.shape == (3, 4)  # no refinement passes without a mask to refine
    assert schedule[ADDS_POINT, 1:].all() and not schedule[USES_MASK].any()


def test_the_first_prompt_is_a_box_or_one_positive_point_half_each():
    rle_mask = np.zeros((200, 300), dtype=bool)
    rle_mask[50:120, 80:200] = True
    from samcache.data import masks

    rle = masks.encode(rle_mask)
    prompts = [training_prompt(rle, (80, 50, 200, 120), (200, 300), INTERACTIVE, np.random.default_rng(i))
               for i in range(200)]
    boxes = [p for p in prompts if p.is_box]
    points = [p for p in prompts if not p.is_box]
    assert 80 < len(boxes) < 120
    assert all((p.labels == -1).all() for p in boxes)
    assert all(p.labels.tolist() == [1] + [-1] * 7 for p in points)


# ---------------------------------------------------------------------------- the simulation
def _schedules(draws: np.ndarray, n: int) -> ClickSchedules:
    return ClickSchedules(torch.from_numpy(np.stack([draws] * n)), torch.full((n, 2), 256))


def test_a_pass_adds_a_point_from_the_chosen_masks_error_and_feeds_its_logits_back():
    n = 2
    first = PromptBatch(batch_row=torch.zeros(n, dtype=torch.long), boxes=torch.tensor([[200., 200, 600, 600]] * n),
                        points=torch.tensor([[[0., 0]], [[400., 400]]]), labels=torch.tensor([[-1], [1]]),
                        is_box=torch.tensor([True, False]))
    truth = _square(256, 50, 50, 150, 150).float()
    draws = np.zeros((3, 3), np.float32)
    draws[ADDS_POINT, 1] = draws[USES_MASK, 1] = draws[USES_MASK, 2] = 1
    draws[PICK, 1] = 0.5
    simulation = ClickSimulation(first, truth.expand(n, -1, -1), _schedules(draws, n), detach=True)
    prompts = simulation.prompts()
    assert prompts.masks is None and prompts.multimask.tolist() == [False, True]
    # Row 0 (a box: single-mask output 0) predicts too little; row 1 (one point: the best-scored of
    # outputs 1-3, here output 2) predicts too much. The other outputs are wrong the other way.
    logits = torch.full((n, 4, 256, 256), -5.0)
    logits[0, 0, 50:150, 50:100] = 5  # misses the right half
    logits[0, 1:] = 5
    logits[1, 2, 50:150, 50:200] = 5  # claims 50 columns too many
    iou_pred = torch.tensor([[0.1, 0.9, 0.9, 0.9], [0.9, 0.2, 0.8, 0.3]])
    simulation.update(DecoderOutput(logits, iou_pred), prompts)

    second = simulation.prompts()
    torch.testing.assert_close(second.masks, torch.stack([logits[0, 0], logits[1, 2]]))
    assert second.mask_given.all() and not second.multimask.any()
    assert second.n_points.tolist() == [1, 2]
    x0, y0 = (second.points[0, 0] / 4 - 0.5).long().tolist()
    assert second.labels[0, 0] == 1 and truth[y0, x0] == 1 and x0 >= 100  # in the missed half
    x1, y1 = (second.points[1, 1] / 4 - 0.5).long().tolist()
    assert second.labels[1, 1] == 0 and truth[y1, x1] == 0 and x1 >= 150  # in the false part
    assert second.points[1, 0].tolist() == [400, 400]  # the first point stays
    simulation.update(DecoderOutput(logits, iou_pred), second)
    third = simulation.prompts()  # a refinement pass: no new point, the mask again
    assert third.n_points.tolist() == [1, 2] and third.mask_given.all()


def test_prompts_with_and_without_a_mask_decode_in_one_batch_as_apart():
    sam = build_tiny(0)
    torch.manual_seed(0)
    embeddings = torch.randn(2, 256, 64, 64)
    previous = torch.randn(3, 256, 256) * 3
    base = dict(batch_row=torch.tensor([0, 1, 1]), boxes=torch.tensor([[100., 100, 500, 400]] * 3),
                points=torch.tensor([[[300., 300], [200, 200]], [[500., 500], [0, 0]], [[250., 260], [300, 310]]]),
                labels=torch.tensor([[1, 0], [1, -1], [1, 1]]), is_box=torch.tensor([True, False, False]))
    has_mask = torch.tensor([True, False, True])
    with torch.no_grad():
        mixed = decode(sam.prompt_encoder, sam.mask_decoder, embeddings,
                       PromptBatch(**base, masks=previous, has_mask=has_mask))
        with_masks = decode(sam.prompt_encoder, sam.mask_decoder, embeddings, PromptBatch(**base, masks=previous))
        without = decode(sam.prompt_encoder, sam.mask_decoder, embeddings, PromptBatch(**base))
    for i, given in enumerate(has_mask.tolist()):
        expected = with_masks if given else without
        torch.testing.assert_close(mixed.logits[i], expected.logits[i], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(mixed.iou_pred[i], expected.iou_pred[i], rtol=1e-4, atol=1e-4)
    assert PromptBatch(**base, masks=previous, has_mask=has_mask).multimask.tolist() == [False, True, False]


# ----------------------------------------------------------------------------------- the step
def _step_case(n: int = 2, seed: int = 0):
    sam = build_tiny(seed)
    torch.manual_seed(seed)
    embeddings = torch.randn(2, 256, 64, 64)
    targets = torch.zeros(n, 256, 256)
    for i in range(n):
        targets[i, 40 + 10 * i : 140 + 10 * i, 60:160] = 1
    first = PromptBatch(batch_row=torch.tensor([i % 2 for i in range(n)]),
                        boxes=torch.tensor([[230., 150, 650, 600]] * n),
                        points=torch.tensor([[[400., 400]]] * n), labels=torch.tensor([[1], [-1]] * (n // 2)),
                        is_box=torch.tensor([False, True] * (n // 2)))
    # 2 corrective points: a point pass and both refinement passes, 5 passes in all.
    settings = PromptSettings(mode="interactive", click_iterations=2)
    schedules = ClickSchedules(torch.from_numpy(np.stack([click_schedule(settings, 0, 0, 0, i) for i in range(n)])),
                               torch.full((n, 2), 256))
    return sam, embeddings, first, targets, schedules, settings


def _manual_gradient(sam, embeddings, first, targets, schedules, *, detach: bool) -> dict:
    """The step's gradient written plainly: all passes in one graph, the mean of their losses. It decodes
    the outputs the step decodes: logits a rounding apart can move a corrective click to another pixel
    (decoding only the used output is tested on its own)."""
    simulation = ClickSimulation(first, targets, schedules, detach=detach)
    losses = []
    for _ in range(simulation.passes):
        prompts = simulation.prompts()
        output = decode(sam.prompt_encoder, sam.mask_decoder, embeddings, prompts, outputs="used")
        losses.append(compute_loss(output, targets, prompts.multimask, "sam").total)
        simulation.update(output, prompts)
    sam.mask_decoder.zero_grad()
    torch.stack(losses).mean().backward()
    return {k: p.grad.clone() for k, p in sam.mask_decoder.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("gradient", ["detach", "backprop"])
def test_the_interactive_step_applies_the_mean_gradient_of_its_passes(gradient):
    sam, embeddings, first, targets, schedules, settings = _step_case()
    settings = settings.model_copy(update={"mask_prompt_gradient": gradient})
    expected = _manual_gradient(sam, embeddings, first, targets, schedules, detach=gradient == "detach")
    parameters = list(sam.mask_decoder.parameters())
    before = {k: p.detach().clone() for k, p in sam.mask_decoder.named_parameters()}
    optimizer = torch.optim.SGD(parameters, lr=1.0)
    stats = interactive_step(family_of("tiny").decoder(sam, "tiny"), embeddings, first, targets, schedules,
                             settings=settings, loss=partial(compute_loss, kind="sam"), optimizer=optimizer,
                             parameters=parameters, grad_clip=0.0, precision="fp32")
    assert stats.prompts == 2 and np.isfinite(stats.loss)
    for key, p in sam.mask_decoder.named_parameters():
        torch.testing.assert_close(before[key] - p.detach(), expected.get(key, torch.zeros_like(p)),
                                   rtol=1e-4, atol=1e-6, msg=key)


def test_gradient_through_the_fed_back_mask_differs_from_detached():
    sam, embeddings, first, targets, schedules, _ = _step_case()
    detached = _manual_gradient(sam, embeddings, first, targets, schedules, detach=True)
    through = _manual_gradient(sam, embeddings, first, targets, schedules, detach=False)
    differs = [k for k in detached if not torch.allclose(detached[k], through[k], rtol=1e-3, atol=1e-7)]
    assert differs  # the option changes what is learnt


@pytest.mark.slow
def test_the_interactive_step_under_ddp_equals_the_plain_module(tmp_path):
    """One process, gloo: DDP's no_sync over all passes but the last still applies every pass's gradient."""
    import torch.distributed as tdist
    from torch.nn.parallel import DistributedDataParallel

    results = {}
    tdist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        for gradient in ("detach", "backprop"):
            for wrapped in (False, True):
                sam, embeddings, first, targets, schedules, settings = _step_case(seed=1)
                settings = settings.model_copy(update={"mask_prompt_gradient": gradient})
                module = family_of("tiny").decoder(sam, "tiny")
                module.prompt_encoder.requires_grad_(False)
                if wrapped:
                    # As the trainer wraps it: steps decode only the outputs they use.
                    module = DistributedDataParallel(module, find_unused_parameters=True)
                parameters = list(sam.mask_decoder.parameters())
                optimizer = torch.optim.SGD(parameters, lr=0.5)
                for _ in range(2):
                    interactive_step(module, embeddings, first, targets, schedules, settings=settings,
                                     loss=partial(compute_loss, kind="sam"), optimizer=optimizer, parameters=parameters,
                                     grad_clip=1.0, precision="fp32")
                results[gradient, wrapped] = [p.detach().clone() for p in parameters]
    finally:
        tdist.destroy_process_group()
    for gradient in ("detach", "backprop"):
        for plain, ddp in zip(results[gradient, False], results[gradient, True]):
            torch.testing.assert_close(ddp, plain, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
# -------------------------------------------------------------------------- trained passes
def test_trained_passes_are_drawn_per_step_from_the_seed_epoch_and_first_image():
    settings = PromptSettings(mode="interactive", trained_passes=3)  # of 11
    drawn = trained_passes(settings, 0, 1, 5)
    assert drawn.shape == (11,) and drawn.dtype == bool and drawn.sum() == 3
    np.testing.assert_array_equal(trained_passes(settings, 0, 1, 5), drawn)  # a resumed step draws the same
    others = [trained_passes(settings, seed, epoch, image) for seed, epoch, image in ((1, 1, 5), (0, 2, 5), (0, 1, 6))]
    assert all(o.sum() == 3 for o in others) and any(not np.array_equal(o, drawn) for o in others)
    assert trained_passes(PromptSettings(mode="interactive"), 0, 1, 5).all()  # SAM's recipe: every pass


@pytest.mark.parametrize("prompts, said", [
    ({"trained_passes": 3, "mask_prompt_gradient": "backprop"}, "--trained-passes leaves passes out of the backward"),
    ({"trained_passes": 12}, "--trained-passes 12 is more than the 11 passes of a step"),
    ({"trained_passes": 10, "mask_prompt_prob": 0.0}, "--trained-passes 10 is more than the 9 passes"),
])
def test_trained_passes_that_cannot_be_are_refused_in_one_line(stamps_cache, tmp_path, prompts, said):
    from click.testing import CliRunner

    from samcache.cli import main

    flags = {"trained_passes": "--trained-passes", "mask_prompt_gradient": "--mask-prompt-gradient",
             "mask_prompt_prob": "--mask-prompt-prob"}
    args = [a for key, value in prompts.items() for a in (flags[key], str(value))]
    result = CliRunner().invoke(main, ["train", str(stamps_cache), "--out", str(tmp_path / "run"), "--prompt",
                                       "interactive", *args])
    assert result.exit_code == 2, result.output
    assert said in result.output and "Traceback" not in result.output
    assert not (tmp_path / "run").exists()


def test_the_interactive_step_backpropagates_only_its_trained_passes():
    """With 2 of the 5 passes trained, the update is the mean gradient of those two passes' losses; the
    other passes still run (their points and fed-back masks shape the trained ones) and count in the log."""
    sam, embeddings, first, targets, schedules, settings = _step_case()
    settings = settings.model_copy(update={"trained_passes": 2})
    schedules = ClickSchedules(schedules.draws, schedules.valid_sizes, torch.tensor([False, True, False, True, False]))
    simulation = ClickSimulation(first, targets, schedules, detach=True)
    losses, chosen = [], []
    for number in range(simulation.passes):
        prompts = simulation.prompts()
        output = decode(sam.prompt_encoder, sam.mask_decoder, embeddings, prompts, outputs="used")
        losses.append(compute_loss(output, targets, prompts.multimask, "sam").total)
        if number in (1, 3):
            chosen.append(losses[-1])
        simulation.update(output, prompts)
    sam.mask_decoder.zero_grad()
    torch.stack(chosen).mean().backward()
    expected = {k: p.grad.clone() for k, p in sam.mask_decoder.named_parameters() if p.grad is not None}

    parameters = list(sam.mask_decoder.parameters())
    before = {k: p.detach().clone() for k, p in sam.mask_decoder.named_parameters()}
    stats = interactive_step(family_of("tiny").decoder(sam, "tiny"), embeddings, first, targets, schedules,
                             settings=settings, loss=partial(compute_loss, kind="sam"),
                             optimizer=torch.optim.SGD(parameters, lr=1.0), parameters=parameters, grad_clip=0.0,
                             precision="fp32")
    assert stats.loss == pytest.approx(float(torch.stack(losses).mean().detach()), rel=1e-4)  # the log: all five
    for key, p in sam.mask_decoder.named_parameters():
        torch.testing.assert_close(before[key] - p.detach(), expected.get(key, torch.zeros_like(p)),
                                   rtol=1e-4, atol=1e-6, msg=key)


def test_interactive_training_with_trained_passes_runs_from_the_cli(stamps_cache, tmp_path):
    from click.testing import CliRunner

    from samcache.cli import main

    run = tmp_path / "run"
    result = CliRunner().invoke(main, ["train", str(stamps_cache), "--out", str(run), "--epochs", "1",
                                       "--batch-size", "2", "--objects-per-image", "2", "--workers", "0",
                                       "--val-max-images", "2", "--prompt", "interactive", "--click-iterations",
                                       "3", "--trained-passes", "2"])
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r for r in records if r["type"] == "step"] and all(np.isfinite(r["loss"]) for r in records
                                                               if r["type"] == "step")
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert TrainConfig.model_validate(saved).prompts.trained_passes == 2


def test_bf16_autocast_interactive_step_runs_and_learns():
    sam, embeddings, first, targets, schedules, settings = _step_case()
    parameters = list(sam.mask_decoder.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=1e-3)
    losses = [interactive_step(family_of("tiny").decoder(sam, "tiny"), embeddings, first, targets, schedules,
                               settings=settings, loss=partial(compute_loss, kind="dice-bce"), optimizer=optimizer,
                               parameters=parameters, grad_clip=1.0,
                               precision="bf16").loss for _ in range(4)]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]


# ----------------------------------------------------------------------------------- training
def _interactive_config(**overrides) -> TrainConfig:
    values = dict(QUICK_TRAIN, epochs=1, batch_size=2, objects_per_image=2, lr=1e-3, warmup_steps=1,
                  val_max_images=2, prompts={"mode": "interactive", "click_iterations": 3})
    return TrainConfig(**{**values, **overrides})


def test_interactive_training_logs_validation_by_clicks(stamps_cache, tmp_path):
    run = tmp_path / "run"
    result = train(stamps_cache, run, _interactive_config(), progress=False)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in records if r["type"] == "epoch"]
    assert [r["epoch"] for r in epochs] == [0, 1]
    for record in epochs:
        clicks = record["val_click_miou"]
        assert len(clicks) == 3 and all(0 <= v <= 1 for v in clicks)
    assert result.history == [r["val_miou"] for r in epochs]
    steps = [r for r in records if r["type"] == "step"]
    assert steps and all(np.isfinite(r["loss"]) for r in steps)
    # A box run validates by clicks only when asked.
    box = train(stamps_cache, tmp_path / "box", TrainConfig(**dict(QUICK_TRAIN, val_max_images=2)), progress=False)
    box_epochs = [json.loads(line) for line in (Path(box.run_dir) / "metrics.jsonl").read_text().splitlines()]
    assert not any("val_click_miou" in r for r in box_epochs)


@pytest.mark.slow
def test_interactive_run_killed_mid_epoch_resumes_to_the_same_weights(stamps_cache, tmp_path):
    # One epoch of 5 one-image steps, killed in its fourth: the draws of a resumed epoch's later steps.
    args = ["--epochs", "1", "--batch-size", "1", "--objects-per-image", "2", "--workers", "1", "--warmup-steps", "2",
            "--prompt", "interactive", "--click-iterations", "2", "--mask-prompt-prob", "0.5", "--save-every", "2",
            "--val-clicks", "2", "--val-max-images", "2"]

    reference = train_process(stamps_cache, tmp_path / "reference", args)
    assert reference.returncode == 0, reference.stderr[-3000:]
    killed = train_process(stamps_cache, tmp_path / "killed", args, crash_at="train-step:3")
    assert killed.returncode != 0
    assert RunCheckpoint.read(tmp_path / "killed" / "last.pt").state.batch == 2
    resumed = train_process(stamps_cache, tmp_path / "killed", ["--resume"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_last_checkpoint(tmp_path / "reference", tmp_path / "killed")


def test_interactive_options_are_checked_and_resume_may_not_change_them(stamps_cache, tmp_path):
    from samcache.config import from_sources, resume_changes
    from samcache.errors import ConfigError

    with pytest.raises(ConfigError, match="--mask-prompt-prob 1.5"):
        from_sources(TrainConfig, overrides={"prompts.mask_prompt_prob": 1.5},
                     flags={"prompts.mask_prompt_prob": "--mask-prompt-prob"})
    with pytest.raises(ConfigError, match="--click-iterations"):
        from_sources(TrainConfig, overrides={"prompts.click_iterations": 99},
                     flags={"prompts.click_iterations": "--click-iterations"})
    saved = _interactive_config().model_dump(mode="json")
    changed = resume_changes(saved, _interactive_config(prompts={"mode": "interactive", "click_iterations": 3,
                                                                  "mask_prompt_gradient": "backprop"}))
    assert changed == ["prompts.mask_prompt_gradient ('detach' -> 'backprop')"]
    assert TrainConfig().val_clicks_in_effect == 0 and _interactive_config().val_clicks_in_effect == 3
    assert _interactive_config(val_clicks=0).val_clicks_in_effect == 0


def test_every_ranks_share_of_a_step_trains_the_same_passes(stamps_cache, tmp_path, monkeypatch):
    """Under torchrun each rank takes every world_size-th image of a step's global batch, and all
    of them must backpropagate the same passes (DDP all-reduces at the last one): the trainer draws
    them from the global batch's first image, for a rank whose share starts elsewhere, or is empty
    (the placeholder step), alike; a share's own first image would draw other passes."""
    from samcache.cache.reader import EmbeddingCache
    from samcache.distributed import SINGLE
    from samcache.train.runs import RunFolder, RunWriter, TrainState
    from samcache.train.samples import EpochBatches
    from samcache.train.trainer import Training, _splits, train_epoch

    class FirstStep(Exception):
        pass

    def record(self, batch):
        raise FirstStep(batch.indices, batch.schedules.trained.tolist())

    monkeypatch.setattr(Training, "step", record)
    cache = EmbeddingCache(stamps_cache)
    for batch_size in (3, 1):  # shares of 2 and 1 images; of 1 and none
        config = TrainConfig(prompts=PromptSettings(mode="interactive", click_iterations=3, trained_passes=2),
                             batch_size=batch_size, objects_per_image=1, workers=0, save_every=None, epochs=1)
        training = Training.setup(cache, RunFolder(tmp_path / f"run{batch_size}"), config,
                                  _splits(cache, config, SINGLE), resume=False, dist=SINGLE)
        first_step = []
        for rank in (0, 1):
            training.sampler = EpochBatches(training.train_indices, batch_size, config.seed, rank=rank, world_size=2)
            with pytest.raises(FirstStep) as raised:
                train_epoch(training, TrainState(history=[0.0]), RunWriter(training.run, enabled=False), 0,
                            progress=False)
            first_step.append(raised.value.args)
        (share_0, passes_0), (share_1, passes_1) = first_step
        global_first = training.sampler.global_batches()[0][0]
        assert share_0[0] == global_first and share_1 != share_0 and sum(passes_0) == 2
        assert passes_0 == passes_1 == trained_passes(config.prompts, config.seed, 0, global_first).tolist()
        if share_1:  # what rank 1's own first image would have drawn
            assert trained_passes(config.prompts, config.seed, 0, share_1[0]).tolist() != passes_1
