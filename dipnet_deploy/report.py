"""Stage 6: a comparison -> REPORT_DIR with metrics.json, report.md and index.html.

metrics.json schema (version 1):
  protocol, scale, models.{fp32,int8}.{path,sha256,input_shape}, receptive_field,
  int8_origin (null or {method, fp32_onnx, from_this_fp32, finetuned}),
  drop_psnr_y.{mean,worst,worst_image} (with an int8 model: the tail beside the mean; absent in older reports),
  mean.{psnr_y,ssim_y,psnr_rgb,ssim_rgb}.{fp32,int8,bicubic}, mean_int8_vs_fp32.{psnr_rgb,max_abs_diff},
  images[]: {image, hr_size, lr_size, tiles, psnr_y.{..}, ssim_y.{..}, psnr_rgb.{..}, ssim_rgb.{..},
             int8_vs_fp32.{psnr_rgb,max_abs_diff}, drop_psnr_y},
  latency.{fp32,int8}.{median_s,per_1080p_frame_s,repeats}, latency.speedup_int8, latency.runtime, skipped[]
PSNR in dB, SSIM in [0, 1], max_abs_diff in 8-bit levels, times in seconds.
Pictures are PNG files beside index.html (and embedded in it, so the page is self-contained).
"""

from __future__ import annotations

import base64
import html
import io
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from dipnet_deploy import error_maps, leftovers
from dipnet_deploy.artifacts import TOOL
from dipnet_deploy.budget_report import BUDGET_HEAD, budget_chart, budget_rows, not_int8_text
from dipnet_deploy.compare import METRICS, Comparison
from dipnet_deploy.errors import InputError
from dipnet_deploy.fileio import (
    json_bytes,
    make_folders,
    refuse_unwritable,
    removing_empty_folders,
    sha256_file,
    write_failures_named,
)
from dipnet_deploy.safety import METRICS_SCHEMA_PREFIX, our_report_files, refuse_collisions

COLOURS = {"fp32": "#1f77b4", "int8": "#d62728", "bicubic": "#7f7f7f"}
DIAGNOSIS_SHOWN = 40  # tensors in the diagnosis chart (the table lists all)
DIAGNOSIS_HEAD = ("tensor", "producer", "PSNR-Y gain in float (dB)", "SQNR (dB)", "int8 range")


def metrics_document(comparison: Comparison) -> dict:
    rows = comparison.rows
    document = {
        "schema": f"{METRICS_SCHEMA_PREFIX}1",
        "tool": TOOL,
        "protocol": comparison.protocol,
        "scale": comparison.models["fp32"].scale,
        "models": {name: {"path": str(info.path), "sha256": info.sha256, "input_shape": info.input_shape}
                   for name, info in comparison.models.items()},
        "receptive_field": comparison.receptive_field,
        "int8_origin": comparison.int8_origin,
        "count": len(rows),
        "mean": comparison.mean,
        "images": rows,
        "latency": comparison.latency,
        "execution": comparison.execution,
        "skipped": comparison.skipped,
    }
    if comparison.diagnosis is not None:
        document["int8_diagnosis"] = comparison.diagnosis
    if "int8" in comparison.models:
        worst = max(rows, key=lambda r: r["drop_psnr_y"])
        document["drop_psnr_y"] = {"mean": float(np.mean([r["drop_psnr_y"] for r in rows])),
                                   "worst": float(worst["drop_psnr_y"]), "worst_image": worst["image"]}
        document["mean_int8_vs_fp32"] = {
            "psnr_rgb": float(np.mean([r["int8_vs_fp32"]["psnr_rgb"] for r in rows])),
            "max_abs_diff": float(np.max([r["int8_vs_fp32"]["max_abs_diff"] for r in rows])),
        }
    return document


def _psnr_chart(rows: list[dict], path: Path) -> None:
    names = [n for n in ("bicubic", "fp32", "int8") if n in rows[0]["psnr_y"]]
    labels = [display_name(Path(r["image"]).stem) for r in rows]
    width = 0.8 / len(names)
    fig = Figure(figsize=(max(6, 0.5 * len(rows) + 2), 3.6), dpi=110)
    ax = fig.subplots()
    x = np.arange(len(rows))
    for i, name in enumerate(names):
        ax.bar(x + (i - (len(names) - 1) / 2) * width, [r["psnr_y"][name] for r in rows], width,
               label=name, color=COLOURS[name])
    low = min(r["psnr_y"][n] for r in rows for n in names)
    ax.set_ylim(max(0, low - 2), None)
    ax.set_xticks(x, labels, rotation=60 if len(rows) > 8 else 0, ha="right" if len(rows) > 8 else "center",
                  fontsize=8)
    ax.set_ylabel("PSNR-Y (dB)")
    ax.set_title("PSNR on the Y channel per image")
    ax.legend(ncols=len(names), fontsize=8, loc="lower right")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)


def _diagnosis_chart(diagnosis: list[dict]) -> bytes:
    """Horizontal bars (PNG bytes): PSNR-Y regained by leaving each tensor in float, largest on top. Made in
    memory: it is only embedded in the page, never a file of the report."""
    shown = diagnosis[:DIAGNOSIS_SHOWN]
    fig = Figure(figsize=(8, 0.28 * len(shown) + 1.2), dpi=110)
    ax = fig.subplots()
    y = np.arange(len(shown))[::-1]
    ax.barh(y, [d["psnr_y_gain_db"] for d in shown], color=COLOURS["int8"])
    ax.set_yticks(y, [f"{d['tensor']} ({d['producer']})" for d in shown], fontsize=7)
    ax.set_xlabel("PSNR-Y regained with only this tensor in float (dB)")
    ax.set_title("Where int8 loses: each quantized activation")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def _diagnosis_rows(document: dict) -> list[list[str]]:
    return [[d["tensor"], d["producer"], f"{d['psnr_y_gain_db']:+.3f}",
             "exact" if d["sqnr_db"] is None else f"{d['sqnr_db']:.1f}", f"[{d['range'][0]:.3g}, {d['range'][1]:.3g}]"]
            for d in document["int8_diagnosis"]]


def _difference_pair(images: dict) -> tuple[np.ndarray, np.ndarray, str]:
    """The two pictures the crops and the heatmap compare: int8 and fp32, or without int8 fp32 and HR."""
    if "int8" in images:
        return images["int8"], images["fp32"], "int8 - fp32"
    return images["fp32"], images["hr"], "fp32 - HR"


def _crops_figure(images: dict, title: str, path: Path, amplify: float) -> None:
    """The pictures side by side in the ``error_maps.CROP``-pixel window where they differ most (found in
    bands; only the window's pixels are made float)."""
    a, b, _ = _difference_pair(images)
    top, left, size = error_maps.crop_box(a, b)
    window = (slice(top, top + size), slice(left, left + size))
    panels = [("HR", images["hr"][window]), ("bicubic", images["bicubic"][window]), ("fp32", images["fp32"][window])]
    if "int8" in images:
        diff = error_maps.crop_difference(a, b, top, left, size)
        panels += [("int8", images["int8"][window]),
                   (f"|int8 - fp32| x{amplify:g}", np.clip(diff[..., None].repeat(3, 2) * amplify, 0, 255))]
    fig = Figure(figsize=(2.3 * len(panels), 2.7), dpi=110)
    axes = fig.subplots(1, len(panels))
    for ax, (name, image) in zip(axes, panels):
        ax.imshow(np.clip(np.asarray(image, dtype=np.float64) / 255.0, 0, 1), interpolation="nearest")
        ax.set_title(name, fontsize=9)
        ax.axis("off")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)


HEATMAP_ASPECT = 3.0  # the heatmap figure is at most this many times as tall as wide (a taller image is drawn narrower)


def _heatmap(images: dict, path: Path) -> str:
    """|a - b|, the maximum over RGB, of ``_difference_pair``: drawn from block maxima for a large image
    (``error_maps.heatmap``), the colour scale up to the 99.9th percentile of every pixel."""
    a, b, what = _difference_pair(images)
    label = f"|{what}| (8-bit levels, max over RGB)"
    shown, top = error_maps.heatmap(a, b)
    h, w = a.shape[:2]
    height = 6 * h / w if h <= HEATMAP_ASPECT * w else 6 * HEATMAP_ASPECT
    fig = Figure(figsize=(6, height + 0.6), dpi=110)
    ax = fig.subplots()
    drawn = ax.imshow(shown, cmap="magma", vmin=0, vmax=max(1.0, top))
    ax.axis("off")
    fig.colorbar(drawn, ax=ax, fraction=0.046, pad=0.02, label=label)
    fig.tight_layout()
    fig.savefig(path)
    return label


def _fmt(value: float, key: str) -> str:
    return f"{value:.4f}" if key.startswith("ssim") else f"{value:.2f}"


def _summary_rows(document: dict) -> list[list[str]]:
    names = [n for n in ("bicubic", "fp32", "int8") if n in document["mean"]["psnr_y"]]
    rows = [[name] + [_fmt(document["mean"][key][name], key) for key in METRICS] for name in names]
    if "int8" in names:
        rows.append(["int8 - fp32"] + [
            (f"{document['mean'][k]['int8'] - document['mean'][k]['fp32']:+.4f}" if k.startswith("ssim") else
             f"{document['mean'][k]['int8'] - document['mean'][k]['fp32']:+.2f}") for k in METRICS])
    return rows


def _latency_lines(document: dict) -> list[str]:
    latency = document["latency"]
    lines = []
    for name in ("fp32", "int8"):
        if name in latency:
            shape = "x".join(map(str, document["models"][name]["input_shape"]))
            lines.append(f"{name}: {latency[name]['median_s'] * 1000:.0f} ms per {shape} forward, "
                         f"{latency[name]['per_1080p_frame_s'] * 1000:.0f} ms per 1080p-equivalent frame "
                         f"(median of {latency[name]['repeats']}, {latency.get('runtime', 'onnxruntime')} CPU, "
                         f"{os.cpu_count()} cores)")
    if "speedup_int8" in latency:
        lines.append(f"int8 speed-up: {latency['speedup_int8']:.2f}x")
    execution = document.get("execution", {})
    if execution.get("backend") == "ray":
        lines.append(f"the images were scored on a Ray cluster ({execution['workers']} workers on {execution['nodes']} "
                     "node(s)); latency is measured on the machine that ran compare")
    return lines


def _origin_text(document: dict) -> str:
    """One sentence on where the int8 model came from, when its card says it is not this fp32 quantized."""
    origin = document.get("int8_origin")
    budget = not_int8_text(origin["mixed_precision"]) if origin and "mixed_precision" in origin else ""
    if not origin or origin["from_this_fp32"]:
        return budget
    what = ("fine-tuned weights (quantization-aware `finetune`, `--method learned`)" if origin["finetuned"]
            else f"another fp32 model (`--method {origin['method']}`)")
    return (f"The int8 model was made from {what}: {origin['fp32_onnx']}. Its figures are measured against the fp32 "
            f"model above, the one it replaces. {budget}").strip()


def _protocol_text(document: dict) -> str:
    scale = document["scale"]
    if document["protocol"] == "sr":
        field = document["receptive_field"]
        tiling = ("tiles stitched exactly (halo {halo} px >= receptive radius {radius} px); images smaller than "
                  "the model input are mirror-padded, which touches a band near their right/bottom edge"
                  if field.get("local") else
                  "tiles with a {halo} px halo; this model has global attention (ESA), which sees tile boundaries "
                  "and padding, so results deviate slightly from a whole-image run")
        return (f"BasicSR convention: HR cropped to a multiple of {scale}; LR = uint8 MATLAB bicubic x1/{scale}; "
                f"SR rounded to uint8; PSNR/SSIM on Y (BT.601) and RGB with {scale} px border cropped. "
                f"Fixed-shape models run by {tiling.format(**field)}.")
    return ("Vendor seed protocol: LR resized with cv2 bilinear to the model input; output vs HR resized with cv2 "
            "bilinear to the output size; full RGB, no crop; outputs clipped x255 as floats.")


REPORT_FILES = ("psnr_per_image.png", "worst_crops.png", "error_heatmap.png", "report.md", "index.html",
                "metrics.json")  # every file write_report makes, in the order they are moved in: metrics.json last


STAGING_PREFIX = ".dipnet-report-"  # write_report's hidden staging folder inside the report folder


def display_name(path: str | Path) -> str:
    """A file's name as text any font, page and JSON parser takes: bytes that are not UTF-8 (kept by
    Python as lone surrogates) become U+FFFD."""
    return os.fsencode(Path(path).name).decode("utf-8", "replace")


def check_report_dir(report_dir: Path, inputs: Iterable[tuple[str, Path]] = ()) -> None:
    """Refuse a report folder before any work: not a folder, not writable, holding someone else's files,
    a report file changed since our last run wrote it, or where one of our report files would replace an
    input (``inputs``: (option, path) pairs).

    The folder must be new, empty, or hold our report (``safety.our_report_files``): then every report
    file there must still have the content our last run recorded, so a user's own ``index.html`` (or an
    edited one) is never replaced. Staging folders of killed runs are removed first (``leftovers``).
    """
    report_dir = Path(report_dir)
    if report_dir.exists() and not report_dir.is_dir():
        raise InputError(report_dir, "exists and is not a directory")
    leftovers.sweep()
    try:
        entries = list(report_dir.iterdir()) if report_dir.is_dir() else []
    except OSError as error:
        raise InputError(report_dir, f"cannot list the folder ({error.strerror})") from None
    recorded = our_report_files(report_dir)
    if entries and recorded is None:
        raise InputError(report_dir, "is a non-empty folder that is not a dipnet-deploy report (no sealed metrics.json "
                                     "of ours); give a new or empty folder, or a previous report to update")
    for name in REPORT_FILES[:-1]:
        path = report_dir / name
        if (path.exists() or path.is_symlink()) and (
                path.is_symlink() or not path.is_file() or recorded.get(name) != sha256_file(path)):
            raise InputError(path, "is not the file our last report wrote there (changed, or not ours); refusing to "
                                   "replace it (move it first, or give another report folder)")
    refuse_unwritable(report_dir, folder=True)
    refuse_collisions([(f"report file {name}", report_dir / name) for name in REPORT_FILES], inputs)


def write_report(comparison: Comparison, report_dir: Path) -> dict:
    """Write REPORT_FILES into ``report_dir``, replacing only those; nothing else there is touched.

    The folder must be new, empty or a previous report (``check_report_dir``). The files are made in a
    hidden staging folder inside ``report_dir`` and moved in at the end, so a failed or interrupted run
    leaves the folder as it was; ``metrics.json`` records the sha256 of the others (``files``).
    """
    report_dir = Path(report_dir)
    check_report_dir(report_dir, [(f"--{name}", info.path) for name, info in comparison.models.items()])
    with removing_empty_folders():  # a report folder made here that stays empty (the run failed) goes again
        try:
            make_folders(report_dir)
            staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=report_dir))
        except OSError as error:
            raise InputError(report_dir, f"cannot write the report ({error.strerror})") from None
        leftovers.record(staging)
        try:
            with write_failures_named(report_dir):
                document = _stage_report(comparison, staging)
            try:
                for name in REPORT_FILES:
                    os.replace(staging / name, report_dir / name)
            except OSError as error:
                raise InputError(report_dir / name, f"cannot write the report file ({error.strerror})") from None
        finally:
            shutil.rmtree(staging, ignore_errors=True)  # our own staging folder only
            leftovers.forget(staging)
    return document


def _stage_report(comparison: Comparison, staging: Path) -> dict:
    """Make every REPORT_FILE in ``staging``; the metrics document, with the sha256 of the others."""
    document = metrics_document(comparison)
    worst, images = comparison.worst, comparison.worst_images
    _psnr_chart(comparison.rows, staging / "psnr_per_image.png")
    worst_name = display_name(worst["image"])
    caption = (f"{worst_name}: largest int8 drop ({worst['drop_psnr_y']:.2f} dB PSNR-Y)"
               if "int8" in images else f"{worst_name}: smallest gain over bicubic")
    _crops_figure(images, caption, staging / "worst_crops.png", amplify=32.0)
    heat_label = _heatmap(images, staging / "error_heatmap.png")
    document["worst_image"] = worst["image"]
    (staging / "report.md").write_text(_markdown(document, caption, heat_label), encoding="utf-8", errors="replace")
    (staging / "index.html").write_text(_html(document, caption, heat_label, staging), encoding="utf-8", errors="replace")
    document["files"] = {name: sha256_file(staging / name) for name in REPORT_FILES[:-1]}
    (staging / "metrics.json").write_bytes(json_bytes(document))
    return document


def _markdown(document: dict, caption: str, heat_label: str) -> str:
    header = "| | PSNR-Y (dB) | SSIM-Y | PSNR-RGB (dB) | SSIM-RGB |\n|---|---|---|---|---|\n"
    table = header + "".join("| " + " | ".join(row) + " |\n" for row in _summary_rows(document))
    lines = [f"# fp32 vs int8 — {document['count']} images, x{document['scale']}, protocol `{document['protocol']}`",
             "", _protocol_text(document), "", *([_origin_text(document), ""] if _origin_text(document) else []), table]
    if "mean_int8_vs_fp32" in document:
        fidelity = document["mean_int8_vs_fp32"]
        lines += [f"int8 vs fp32 fidelity: mean PSNR {fidelity['psnr_rgb']:.2f} dB, "
                  f"max abs diff {fidelity['max_abs_diff']:.0f} levels.", ""]
    lines += ["## Latency", "", *[f"- {line}" for line in _latency_lines(document)], "",
              "## Per image", "", "![PSNR per image](psnr_per_image.png)", "",
              "| image | tiles | bicubic | fp32 | int8 | drop |", "|---|---|---|---|---|---|"]
    for row in document["images"]:
        p = row["psnr_y"]
        lines.append(f"| {display_name(row['image'])} | {row['tiles']} | {p['bicubic']:.2f} | {p['fp32']:.2f} | "
                     f"{p['int8']:.2f} | {row['drop_psnr_y']:+.2f} |" if "int8" in p else
                     f"| {display_name(row['image'])} | {row['tiles']} | {p['bicubic']:.2f} | {p['fp32']:.2f} | | |")
    lines += ["", f"## {caption}", "", "![crops](worst_crops.png)", "", f"Error heatmap: {heat_label}", "",
              "![heatmap](error_heatmap.png)", ""]
    budget = (document.get("int8_origin") or {}).get("mixed_precision")
    if budget:
        lines += ["## Quality budget", "", "| " + " | ".join(BUDGET_HEAD) + " |", "|---|---|---|---|",
                  *["| " + " | ".join(row) + " |" for row in budget_rows(budget)], ""]
    if "int8_diagnosis" in document:
        lines += ["## Diagnosis", "", DIAGNOSIS_TEXT, "", "| " + " | ".join(DIAGNOSIS_HEAD) + " |",
                  "|---|---|---|---|---|", *["| " + " | ".join(row) + " |" for row in _diagnosis_rows(document)], ""]
    return "\n".join(lines)


DIAGNOSIS_TEXT = ("Each quantized activation: the PSNR-Y the int8 model regains when only that tensor stays in "
                  "float (its QuantizeLinear/DequantizeLinear pair removed), and its SQNR against the fp32 model's "
                  "tensor over the first tile of each image. Largest gain first.")


def _embed(png: Path | bytes) -> str:
    data = png if isinstance(png, bytes) else png.read_bytes()
    return "data:image/png;base64," + base64.b64encode(data).decode()


def _html(document: dict, caption: str, heat_label: str, folder: Path) -> str:
    e = html.escape
    head = "".join(f"<th>{h}</th>" for h in ("", "PSNR-Y (dB)", "SSIM-Y", "PSNR-RGB (dB)", "SSIM-RGB"))
    body = "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>" for row in _summary_rows(document))
    per_image = "".join(
        f"<tr><td>{e(display_name(r['image']))}</td><td>{r['lr_size'][0]}x{r['lr_size'][1]}</td><td>{r['tiles']}</td>"
        + "".join(f"<td>{r['psnr_y'][n]:.2f}</td>" if n in r["psnr_y"] else "<td></td>" for n in ("bicubic", "fp32", "int8"))
        + (f"<td>{r['drop_psnr_y']:+.2f}</td><td>{r['int8_vs_fp32']['max_abs_diff']:.0f}</td>" if "int8" in r["psnr_y"]
           else "<td></td><td></td>") + "</tr>" for r in document["images"])
    fidelity = ""
    if "mean_int8_vs_fp32" in document:
        f = document["mean_int8_vs_fp32"]
        fidelity = (f"<p>int8 vs fp32 fidelity: mean PSNR <b>{f['psnr_rgb']:.2f} dB</b>, "
                    f"max abs diff {f['max_abs_diff']:.0f} levels.</p>")
    headline = ""
    if "int8" in document["mean"]["psnr_y"]:
        m = document["mean"]["psnr_y"]
        speed = document["latency"].get("speedup_int8")
        drop = document["drop_psnr_y"]
        headline = (f"<p class=headline>int8 costs <b>{m['fp32'] - m['int8']:.2f} dB</b> PSNR-Y "
                    f"({m['fp32']:.2f} → {m['int8']:.2f} dB)" +
                    (f" and runs <b>{speed:.2f}×</b> the speed of fp32" if speed else "") +
                    f"; its worst image loses <b>{drop['worst']:.2f} dB</b> "
                    f"({e(display_name(drop['worst_image']))}).</p>")
    origin = f"<p>{e(_origin_text(document))}</p>" if _origin_text(document) else ""
    models = "".join(f"<li>{n}: <code>{e(m['path'])}</code> ({'x'.join(map(str, m['input_shape']))}, "
                     f"sha256 {m['sha256'][:12]}…)</li>" for n, m in document["models"].items())
    latency = "".join(f"<li>{e(line)}</li>" for line in _latency_lines(document))
    diagnosis = ""
    if "int8_diagnosis" in document:
        cells = "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>" for row in _diagnosis_rows(document))
        diagnosis = (f"<h2>Diagnosis</h2><p class=muted>{e(DIAGNOSIS_TEXT)}</p>"
                     f"<img alt=\"diagnosis\" src=\"{_embed(_diagnosis_chart(document['int8_diagnosis']))}\">"
                     f"<table><tr>{''.join(f'<th>{h}</th>' for h in DIAGNOSIS_HEAD)}</tr>{cells}</table>")
    budget = (document.get("int8_origin") or {}).get("mixed_precision")
    if budget:
        cells = "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>" for row in budget_rows(budget))
        diagnosis = (f"<h2>Quality budget</h2><img alt=\"drop against latency\" src=\"{_embed(budget_chart(budget))}\">"
                     f"<table><tr>{''.join(f'<th>{h}</th>' for h in BUDGET_HEAD)}</tr>{cells}</table>{diagnosis}")
    return f"""<!doctype html>
<html lang=en><head><meta charset=utf-8><title>dipnet-deploy report</title>
<style>
body{{font:15px/1.45 system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}}
table{{border-collapse:collapse;margin:.8em 0}} td,th{{border:1px solid #ccc;padding:.25em .6em;text-align:right}}
td:first-child,th:first-child{{text-align:left}} th{{background:#f3f3f3}}
.headline{{font-size:1.25em;background:#f6f8ff;padding:.6em .8em;border-left:4px solid #1f77b4}}
img{{max-width:100%}} code{{font-size:.9em}} .muted{{color:#666;font-size:.9em}}
</style></head><body>
<h1>fp32 vs int8 — {document['count']} images, ×{document['scale']}</h1>
{headline}{origin}
<p class=muted>{e(_protocol_text(document))}</p>
<h2>Summary (mean over images)</h2><table><tr>{head}</tr>{body}</table>{fidelity}
<h2>Latency</h2><ul>{latency}</ul>
<h2>Per image</h2><img alt="PSNR per image" src="{_embed(folder / 'psnr_per_image.png')}">
<table><tr><th>image</th><th>LR size</th><th>tiles</th><th>bicubic</th><th>fp32</th><th>int8</th><th>drop</th>
<th>max |int8−fp32|</th></tr>{per_image}</table>
<h2>{e(caption)}</h2><img alt="crops" src="{_embed(folder / 'worst_crops.png')}">
<h2>Error heatmap</h2><p class=muted>{e(heat_label)}</p>
<img alt="error heatmap" src="{_embed(folder / 'error_heatmap.png')}">
{diagnosis}
<h2>Models</h2><ul>{models}</ul>
<p class=muted>Made by {e(document['tool'])}. Numbers: <code>metrics.json</code>.</p>
</body></html>
"""
