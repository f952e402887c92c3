"""Stage 2: folded model -> fixed-shape fp32 ONNX (+ model card JSON).

The graph is traced at a small shape with symbolic H/W and then fixed to 1x3xHxW by onnxsim's
shape overwrite; for these fully convolutional graphs this gives the same graph as tracing at
the full shape, at a fraction of the time and memory (tracing at 1080p allocates every
activation). The ONNX is checked with ``onnx.checker`` and run through onnxruntime on a random
image against the folded PyTorch model; no memory for either forward is one ``OutOfMemoryError`` naming
the checkpoint.
"""

from __future__ import annotations

import hashlib
import io
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from dipnet_deploy import __version__
from dipnet_deploy.archs.dipnet_arch import count_params
from dipnet_deploy.artifacts import card_header, card_path_for
from dipnet_deploy.checkpoint import LoadedCheckpoint
from dipnet_deploy.config import refuse_beyond_memory
from dipnet_deploy.errors import InputError, OutOfMemoryError
from dipnet_deploy.fileio import atomic_paths, json_bytes, refuse_unwritable
from dipnet_deploy.model_stats import onnx_summary, torch_conv_macs
from dipnet_deploy.qat import LEARNED_RANGES_KEY, attach_learned_ranges
from dipnet_deploy.runtime import ORT_LOG_FATAL_ONLY, UNNAMED_MODEL, allocation_failures_named
from dipnet_deploy.safety import refuse_collisions, refuse_replacing_foreign
from dipnet_deploy.tiling import receptive_field, smallest_tile

TRACE_SIZE = 64  # small trace shape; must be large enough for ESA's strided conv + pool
ORT_TOLERANCE = 1e-4


@dataclass
class ExportOptions:
    """Settings of ``export``.

    height, width: the fixed input shape in pixels (the ONNX input is 1x3xHxW float32 RGB in [0, 1];
        the output is 1x3x(rH)x(rW) for scale r).
    opset: ONNX opset of the graph (11-21).
    simplify: run onnxsim (removes shape-computing nodes; the graph stays numerically the same).
    """

    height: int = 1080
    width: int = 1920
    opset: int = 17
    simplify: bool = True


@dataclass
class ExportResult:
    onnx_path: Path
    card_path: Path
    card: dict = field(default_factory=dict)


def trace_to_onnx(model: torch.nn.Module, opset: int) -> onnx.ModelProto:
    """Export with symbolic height/width (names ``input``/``output``)."""
    example = torch.rand(1, 3, TRACE_SIZE, TRACE_SIZE, generator=torch.Generator().manual_seed(0))
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(
            model,
            (example,),
            buffer,
            dynamo=False,
            input_names=["input"],
            output_names=["output"],
            opset_version=opset,
            dynamic_axes={"input": {2: "height", 3: "width"}, "output": {2: "out_height", 3: "out_width"}},
            do_constant_folding=True,
        )
    return onnx.load_from_string(buffer.getvalue())


def fix_shape(model: onnx.ModelProto, height: int, width: int, scale: int, simplify: bool) -> onnx.ModelProto:
    """Pin the input to 1x3xHxW (and the output to 1x3xrHxrW); simplify when asked."""
    if simplify:
        import onnxsim

        simplified, ok = onnxsim.simplify(model, overwrite_input_shapes={"input": [1, 3, height, width]})
        if not ok:
            raise RuntimeError("onnxsim could not validate the simplified graph")
        model = simplified
    else:
        for value, dims in ((model.graph.input[0], [1, 3, height, width]),
                            (model.graph.output[0], [1, 3, height * scale, width * scale])):
            for dim, size in zip(value.type.tensor_type.shape.dim, dims):
                dim.Clear()
                dim.dim_value = size
        model = onnx.shape_inference.infer_shapes(model)
    # Stable metadata, so the same inputs give byte-identical files.
    model.producer_name, model.producer_version = "dipnet-deploy", __version__
    return model


def ort_max_abs_diff(onnx_bytes: bytes, model: torch.nn.Module, height: int, width: int,
                     name: str | Path = UNNAMED_MODEL) -> float:
    """max |onnxruntime - PyTorch| on a fixed random image in [0, 1]. A runtime that cannot allocate what its
    forward needs: one ``OutOfMemoryError`` naming ``name`` (the model's file) and the size that needs less."""
    try:
        with allocation_failures_named(name, "PyTorch"):
            x = torch.rand(1, 3, height, width, generator=torch.Generator().manual_seed(1))
        options = ort.SessionOptions()
        options.enable_cpu_mem_arena = False  # keep peak memory at one frame's activations
        options.log_severity_level = ORT_LOG_FATAL_ONLY  # a failed allocation is said in one line, not logged too
        with allocation_failures_named(name, "onnxruntime"):
            session = ort.InferenceSession(onnx_bytes, options, providers=["CPUExecutionProvider"])
            ort_out = session.run(["output"], {"input": x.numpy()})[0]
        del session
        with torch.no_grad(), allocation_failures_named(name, "PyTorch"):
            torch_out = model(x).numpy()
        return float(np.abs(ort_out - torch_out).max())
    except OutOfMemoryError as error:
        raise OutOfMemoryError(error.where, f"{error.problem}, checking the export's {height}x{width} forward "
                                            "(a smaller --height/--width needs less)") from None


def export(loaded: LoadedCheckpoint, output: str | Path, options: ExportOptions = ExportOptions()) -> ExportResult:
    """Export a loaded checkpoint; writes ``output`` and its model card together, atomically.

    Refused before any work: an output or card that is the checkpoint, or each other, or cannot be written.
    """
    if options.height < TRACE_SIZE // 4 or options.width < TRACE_SIZE // 4:
        raise InputError("--height/--width", f"input {options.height}x{options.width} is too small (min {TRACE_SIZE // 4})")
    if loaded.config.esa and min(options.height, options.width) < 25:
        raise InputError("--height/--width", "ESA models need an input of at least 25x25 (strided conv + 7x7 pool)")
    refuse_beyond_memory(loaded.config, "--height/--width", options.height, options.width, images=1)
    output, card_path = Path(output), card_path_for(output)
    refuse_unwritable(output)
    refuse_collisions([("--output", output), ("model card", card_path)], [("--checkpoint", loaded.path)])
    refuse_replacing_foreign([("fp32 model", output), ("model card", card_path)])
    started = time.perf_counter()
    model, config = loaded.model, loaded.config
    traced = trace_to_onnx(model, options.opset)
    smallest = smallest_tile(receptive_field(traced))
    if min(options.height, options.width) < smallest:
        raise InputError("--height/--width", f"input {options.height}x{options.width} is too small: `compare` runs the "
                                             f"model by tiles with a {(smallest - 1) // 2} px halo, so each side must "
                                             f"be at least {smallest}")
    graph = fix_shape(traced, options.height, options.width, config.upscale, options.simplify)
    learned_tensors = None
    if loaded.learned_ranges is not None:
        try:
            learned_tensors = attach_learned_ranges(graph, loaded.learned_ranges)
        except KeyError as error:
            raise InputError(loaded.path, f"its learned ranges do not fit the exported graph ({error.args[0]})") from None
    onnx.checker.check_model(graph, full_check=True)
    onnx_bytes = graph.SerializeToString()
    ort_diff = ort_max_abs_diff(onnx_bytes, model, options.height, options.width, loaded.path)
    if not math.isfinite(ort_diff):  # weights finite, yet a forward overflows float32 (e.g. 1e38 weights)
        raise InputError(loaded.path, "its model's output is not finite (inf or NaN) on the check image: weights "
                                      "this large overflow float32")
    if not ort_diff <= ORT_TOLERANCE:
        raise RuntimeError(f"onnxruntime output differs from PyTorch by {ort_diff:.3g} (> {ORT_TOLERANCE})")
    summary = onnx_summary(graph)
    card = card_header("fp32-onnx", output) | {
        "config": config.to_dict(),
        "params": count_params(model),
        "macs": torch_conv_macs(model, options.height, options.width),
        "input_name": "input",
        "output_name": "output",
        "input_shape": [1, 3, options.height, options.width],
        "output_shape": [1, 3, options.height * config.upscale, options.width * config.upscale],
        "opset": options.opset,
        "simplified": options.simplify,
        "ops": summary["ops"],
        "checkpoint": str(loaded.path),
        "checkpoint_sha256": loaded.sha256,
        "checkpoint_entry": loaded.source,
        "training_form": loaded.training_form,
        "fold_max_abs_diff": loaded.fold_max_abs_diff if loaded.training_form else 0.0,
        "ort_max_abs_diff": ort_diff,
        # finetune's ranges, in the ONNX metadata for `quantize --method learned`
        "learned_ranges": {"tensors": learned_tensors, "points": len(loaded.learned_ranges),
                           "metadata_key": LEARNED_RANGES_KEY} if learned_tensors else None,
        "onnx_sha256": hashlib.sha256(onnx_bytes).hexdigest(),
    }
    card["gflops"] = round(2 * card["macs"] / 1e9, 1)
    with atomic_paths(output, card_path) as (onnx_temp, card_temp):
        onnx_temp.write_bytes(onnx_bytes)
        card_temp.write_bytes(json_bytes(card))
    card["seconds"] = round(time.perf_counter() - started, 2)
    return ExportResult(output, card_path, card)
