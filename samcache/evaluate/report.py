"""The eval report: the table, before/after overlays and plots (pictures drawn with plotting.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np

from samcache.data import masks
from samcache.fileio import atomic_write_bytes
from samcache.models.families import family_of
from samcache.plotting import pyplot, save_figure

MODELS = ("zero_shot", "fine_tuned")


COLORS = {"truth": (0.1, 0.8, 0.2), "zero_shot": (0.95, 0.35, 0.1), "fine_tuned": (0.15, 0.45, 0.95)}


def model_titles(model_type: str) -> dict[str, str]:
    """What the pictures and tables call each model, as the model's family names it: the tiny is
    samcache's own model, never called SAM ("zero-shot (tiny)"); Meta's are "zero-shot SAM (vit_b)"."""
    family = family_of(model_type)
    return {"truth": "ground truth", "zero_shot": family.zero_shot_title(model_type),
            "fine_tuned": f"fine-tuned ({family.label(model_type)})"}


def _panel(ax, preview: np.ndarray, mask: np.ndarray, box, color, title: str, outline: np.ndarray) -> None:
    """One overlay panel: the preview crop around `box`, `mask` filled, the truth outlined, the box drawn."""
    import cv2
    from matplotlib.patches import Rectangle  # matplotlib loads only when a picture is drawn

    scale = preview.shape[1] / mask.shape[1]
    small = cv2.resize(mask.astype(np.uint8), preview.shape[1::-1], interpolation=cv2.INTER_NEAREST).astype(bool)
    truth = cv2.resize(outline.astype(np.uint8), preview.shape[1::-1], interpolation=cv2.INTER_NEAREST)
    x0, y0, x1, y1 = (v * scale for v in box)
    margin = 0.25 * max(x1 - x0, y1 - y0) + 4
    cx0, cy0 = int(max(0, x0 - margin)), int(max(0, y0 - margin))
    cx1, cy1 = int(min(preview.shape[1], x1 + margin)), int(min(preview.shape[0], y1 + margin))
    image = preview.astype(np.float32) / 255
    image[small] = 0.55 * image[small] + 0.45 * np.array(color)
    contours, _ = cv2.findContours(truth, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    ax.imshow(image[cy0:cy1, cx0:cx1], extent=(cx0, cx1, cy1, cy0))
    for contour in contours:
        c = contour[:, 0, :]
        ax.plot(np.append(c[:, 0], c[0, 0]) + 0.5, np.append(c[:, 1], c[0, 1]) + 0.5, color=COLORS["truth"], lw=1)
    ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, color="yellow", lw=1, ls="--"))
    ax.set_title(title, fontsize=8)
    ax.axis("off")


def plot_overlays(path: Path, cache, rows: dict[str, list[dict]], picks: list[int], heading: str,
                  titles: dict[str, str]) -> None:
    """A grid: one row per picked object; columns ground truth, zero-shot, fine-tuned (when present)."""
    plt = pyplot()
    models = [m for m in MODELS if m in rows]
    fig, axes = plt.subplots(len(picks), 1 + len(models), figsize=(3.2 * (1 + len(models)), 3.0 * len(picks)),
                             squeeze=False)
    for r, k in enumerate(picks):
        base = rows["zero_shot"][k]
        index = cache.index_of(base["image"])
        info = cache.images[index]
        obj = next(o for o in info.objects if o.object_id == base["object_id"])
        preview, truth = cache.preview(index), masks.decode(obj.rle)
        _panel(axes[r][0], preview, truth, obj.box, COLORS["truth"],
               f"{base['image']} #{obj.object_id}\n{obj.category} (truth)", truth)
        for c, model in enumerate(models, start=1):
            row = rows[model][k]
            _panel(axes[r][c], preview, masks.decode(row["rle"]), obj.box, COLORS[model],
                   f"{titles[model]}\nIoU {row['iou']:.3f}  boundary F {row['boundary_f']:.3f}", truth)
    fig.suptitle(heading, fontsize=11)
    fig.tight_layout()
    save_figure(fig, path, dpi=90)


def plot_iou_histogram(path: Path, rows: dict[str, list[dict]], titles: dict[str, str]) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    bins = np.linspace(0, 1, 21)
    for model, model_rows in rows.items():
        ax.hist([r["iou"] for r in model_rows], bins=bins, alpha=0.55, color=COLORS[model],
                label=f"{titles[model]} (mIoU {np.mean([r['iou'] for r in model_rows]):.3f})")
    ax.set_xlabel("IoU per object")
    ax.set_ylabel("objects")
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path, dpi=100)


def plot_iou_vs_clicks(path: Path, clicks: dict[str, dict], titles: dict[str, str]) -> None:
    """mIoU after each click of the click protocol, one line per model."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for model, result in clicks.items():
        x = np.arange(1, len(result["miou"]) + 1)
        ax.plot(x, result["miou"], marker="o", color=COLORS[model],
                label=f"{titles[model]} (NoC@85 {result['noc85']:.2f}, NoC@90 {result['noc90']:.2f})")
    ax.set_xlabel("clicks")
    ax.set_ylabel("mIoU")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path, dpi=100)


def plot_iou_scatter(path: Path, rows: dict[str, list[dict]]) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 5))
    before = [r["iou"] for r in rows["zero_shot"]]
    after = [r["iou"] for r in rows["fine_tuned"]]
    ax.scatter(before, after, s=14, alpha=0.7, color=COLORS["fine_tuned"])
    ax.plot([0, 1], [0, 1], color="gray", lw=1, ls="--")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("zero-shot IoU")
    ax.set_ylabel("fine-tuned IoU")
    better = sum(a > b for a, b in zip(after, before))
    ax.set_title(f"{better} of {len(after)} objects improved", fontsize=10)
    fig.tight_layout()
    save_figure(fig, path, dpi=100)


def plot_everything(path: Path, cache, results: dict[str, list[dict]], titles: dict[str, str],
                    indices: list[int]) -> None:
    """One row per cached image `indices`: the ground truth, then each model's segment-everything
    masks (COCO results, image_id = index + 1), each mask in its own colour, on the cached preview."""
    import cv2

    plt = pyplot()
    by_model = {m: results[m] for m in MODELS if m in results}
    image_ids = [index + 1 for index in indices]
    palette = np.random.default_rng(0).uniform(0.2, 1.0, size=(256, 3))
    fig, axes = plt.subplots(len(image_ids), 1 + len(by_model), figsize=(3.4 * (1 + len(by_model)),
                             3.6 * len(image_ids)), squeeze=False)
    for r, image_id in enumerate(image_ids):
        index = image_id - 1
        preview = cache.preview(index).astype(np.float32) / 255
        size = preview.shape[1::-1]
        columns = [("ground truth", [o.rle for o in cache.images[index].objects])]
        columns += [(titles[m], [d["segmentation"] for d in rows if d["image_id"] == image_id])
                    for m, rows in by_model.items()]
        for c, (title, rles) in enumerate(columns):
            image = preview.copy()
            for k, rle in enumerate(rles):
                mask = cv2.resize(masks.decode(rle).astype(np.uint8), size, interpolation=cv2.INTER_NEAREST) > 0
                image[mask] = 0.5 * image[mask] + 0.5 * palette[k % len(palette)]
            axes[r][c].imshow(image)
            axes[r][c].set_title(f"{cache.images[index].name}: {title}, {len(rles)} masks", fontsize=8)
            axes[r][c].axis("off")
    fig.tight_layout()
    save_figure(fig, path, dpi=80)


def write_eval_report(report_dir: Path, cache, rows: dict[str, list[dict]], summary: dict, *, overlays: int,
                      seed: int, everything: Optional[dict[str, list[dict]]] = None) -> None:
    """report.md plus overlays (worst, best, random objects), an IoU histogram and a before/after scatter;
    with `everything` (each model's segment-everything COCO results), a section and its overlays."""
    report_dir = Path(report_dir)
    titles = model_titles(summary["model_type"])
    ranked_by = "fine_tuned" if "fine_tuned" in rows else "zero_shot"
    order = list(np.argsort([r["iou"] for r in rows[ranked_by]], kind="stable"))
    n = min(overlays, len(order))
    picks = {
        "worst": order[:n],
        "best": order[::-1][:n],
        "random": sorted(np.random.default_rng(seed).choice(len(order), n, replace=False).tolist()),
    }
    pictures = []
    for name, chosen in picks.items():
        if n:
            plot_overlays(report_dir / f"overlays_{name}.png", cache, rows, [int(k) for k in chosen],
                          f"{name} {n} objects by {titles[ranked_by]} IoU", titles)
            pictures.append((f"overlays_{name}.png", f"The {name} {n} objects by {titles[ranked_by]} IoU: ground "
                             "truth (green outline), zero-shot and fine-tuned masks, prompt box (yellow, dashed)."))
    plot_iou_histogram(report_dir / "iou_histogram.png", rows, titles)
    pictures.append(("iou_histogram.png", "IoU per object, each model."))
    if "fine_tuned" in rows:
        plot_iou_scatter(report_dir / "iou_scatter.png", rows)
        pictures.append(("iou_scatter.png", "Each object's zero-shot IoU (x) against its fine-tuned IoU (y); "
                         "points above the diagonal improved."))

    if "clicks" in summary:
        plot_iou_vs_clicks(report_dir / "iou_vs_clicks.png", summary["clicks"], titles)
        pictures.append(("iou_vs_clicks.png", "The click protocol: mIoU after each click (first click at the "
                         "object's most interior point, each next one in the largest error region, the previous "
                         "mask fed back)."))

    if everything is not None and overlays:
        shown = list(dict.fromkeys(cache.index_of(r["image"]) for r in rows["zero_shot"]))[:overlays]
        plot_everything(report_dir / "everything.png", cache, everything, titles, shown)
        pictures.append(("everything.png", "Segment everything: each image's ground truth and the masks each "
                         "model found from the point grid (one colour per mask)."))

    config = summary["config"]
    baselines = summary.get("baselines", {})
    scored = {**{m: summary[m] for m in rows}, **baselines}
    lines = [
        f"# samcache evaluation: split `{summary['split']}`",
        "",
        f"- cache: `{summary['cache']}` (model `{summary['model_type']}`)",
        (f"- run: `{summary['run']}` ({config['weights']} weights)" if summary["run"]
         else "- run: none (base model only)"),
        f"- prompts: {', '.join(_describe_prompt(kind, config) for kind in config['prompt'])}"
        + (f"; pictures and per-category figures with {summary['prompt']} prompts" if len(config["prompt"]) > 1
           else ""),
        "- metrics per object at the original resolution; mIoU/mDice/boundary F are means over objects",
        "",
        "```",
        format_table(summary),
        "```",
        "",
        *(["`box_fill` is the trivial baseline: each prompt box filled. A model is worth using where it "
           "beats it.", ""] if any("box_fill" in k.get("baselines", {}) for k in summary["by_prompt"].values())
          else []),
        "## Per category",
        "",
        "| category | objects | " + " | ".join(f"{titles.get(m, m)} mIoU" for m in scored) + " |",
        "| --- | ---: | " + " | ".join("---:" for _ in scored) + " |",
    ]
    for category, stats in summary["zero_shot"]["per_category"].items():
        cells = [f"{scored[m]['per_category'][category]['miou']:.4f}" for m in scored]
        lines.append(f"| {category} | {stats['objects']} | " + " | ".join(cells) + " |")
    if "everything" in summary:
        generator = summary["config"]["generator"]
        lines += ["", "## Segment everything", "",
                  f"A {generator['points_per_side']}x{generator['points_per_side']} point grid per image, "
                  f"predicted IoU > {generator['pred_iou_thresh']}, stability >= "
                  f"{generator['stability_score_thresh']}, box NMS {generator['box_nms_thresh']} "
                  "(SamAutomaticMaskGenerator's steps); every mask scored against all ground-truth objects, "
                  "class-agnostic, with COCO mask AP (pycocotools): the `everything` rows of the table above."]
    lines += ["", "## Pictures", ""]
    for file, caption in pictures:
        lines += [f"![{file}]({file})", "", caption, ""]
    lines += ["## Files", "", "- `summary.json`: the figures above",
              "- `objects.csv`: one row per object, each model's IoU, Dice, boundary F and predicted IoU "
              "(the baselines': IoU, Dice, boundary F; columns of further prompt kinds start with the kind)",
              *[f"- `{f}`" for f, _ in pictures], ""]
    atomic_write_bytes(report_dir / "report.md", "\n".join(lines).encode("utf-8"))


def _describe_prompt(kind: str, config: dict) -> str:
    if kind == "point":
        return "point (each mask's most interior point)"
    if config["box_jitter"]:
        return f"box (box jitter {config['box_jitter']}, seed {config['seed']})"
    return "box (exact boxes)"


def format_table(summary: dict) -> str:
    """The zero-shot vs fine-tuned table the CLI and the demo print, the baselines below the models;
    one table per prompt kind when the evaluation used several."""
    by_prompt = summary.get("by_prompt") or {summary.get("prompt", "box"): summary}
    tables = []
    for kind, scores in by_prompt.items():
        lines = [f"{'model':<12} {'objects':>7} {'mIoU':>7} {'mDice':>7} {'bound.F':>7}"]
        if len(by_prompt) > 1:
            lines.insert(0, f"prompt: {kind}")
        rows = [(name, scores[name]) for name in MODELS if name in scores]
        rows += list(scores.get("baselines", {}).items())
        for name, s in rows:
            lines.append(f"{name:<12} {s['objects']:>7} {s['miou']:>7.4f} {s['mdice']:>7.4f} "
                         f"{s['boundary_f']:>7.4f}")
        tables.append("\n".join(lines))
    if "clicks" in summary:
        n = len(next(iter(summary["clicks"].values()))["miou"])
        shown = sorted({1, 2, 3, 5, n} & set(range(1, n + 1)))
        lines = ["clicks       " + " ".join(f"{f'mIoU@{k}':>8}" for k in shown) + f" {'NoC@85':>7} {'NoC@90':>7}"]
        for name, result in summary["clicks"].items():
            lines.append(f"{name:<12} " + " ".join(f"{result['miou'][k - 1]:>8.4f}" for k in shown)
                         + f" {result['noc85']:>7.2f} {result['noc90']:>7.2f}")
        tables.append("\n".join(lines))
    if "everything" in summary:
        lines = [f"{'everything':<12} {'masks':>7} {'AP':>7} {'AP50':>7} {'AR100':>7}"]
        for name in MODELS:
            if name in summary["everything"]:
                e = summary["everything"][name]
                lines.append(f"{name:<12} {e['masks']:>7} {e['ap']:>7.4f} {e['ap50']:>7.4f} {e['ar100']:>7.4f}")
        tables.append("\n".join(lines))
    return "\n\n".join(tables)
