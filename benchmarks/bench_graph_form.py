"""The int8 graph padded for onnxruntime's fast integer kernel (``qdq_graph.pad_for_fast_path``) against the
same model without the padding (``qdq_graph.unpad``), side by side in one run.

Prints: whether both give bit-identical outputs (a real photo and a random input), the forward latency of each
on onnxruntime (and OpenVINO when installed), interleaved A/B rounds within one runtime at a time (onnxruntime's
idle threads spin after a forward and slow whatever runs next), medians and their ratio; then
onnxruntime's profiler table: every conv's kernel time, its real multiply-accumulates (the model's own
channels, not the padded ones) and its time per MAC against the median conv's.

    python benchmarks/bench_graph_form.py --int8 ../build/dipnet_x2_1080x1920.int8.onnx

Time nothing while another job runs on the machine (torch and onnxruntime threads slow down many times over).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

from dipnet_deploy.errors import InputError
from dipnet_deploy.imageio import list_images, read_rgb8, vendor_preprocess
from dipnet_deploy.qdq_graph import unpad
from dipnet_deploy.quantize import default_calibration_dir
from dipnet_deploy.runtime import cpu_name, import_openvino, open_session, time_interleaved


def profiled_session(model: onnx.ModelProto, threads: int, prefix: str) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.enable_profiling, options.profile_file_prefix = True, prefix
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def real_macs(model: onnx.ModelProto) -> dict[str, int]:
    """Multiply-accumulates of each Conv of ``model`` (a QDQ graph without padding), by node name."""
    inferred = onnx.shape_inference.infer_shapes(model)
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
              for v in (*inferred.graph.value_info, *inferred.graph.output, *inferred.graph.input)}
    producers = {out: node for node in model.graph.node for out in node.output}
    weights = {init.name: numpy_helper.to_array(init).shape for init in model.graph.initializer}
    macs = {}
    for node in model.graph.node:
        if node.op_type == "Conv":
            weight_dq = producers[node.input[1]]
            kernel = weights[weight_dq.input[0]]
            macs[node.name] = math.prod(shapes[node.output[0]][2:]) * math.prod(kernel)
    return macs


def conv_kernel_times(model: onnx.ModelProto, feed: dict, threads: int, runs: int) -> dict[str, float]:
    """Median over ``runs`` of each conv's kernel time (ms) in onnxruntime's profiler, by Conv node name."""
    with tempfile.TemporaryDirectory() as work:
        runner = profiled_session(model, threads, str(Path(work) / "profile"))
        for _ in range(runs + 1):
            runner.run(None, feed)
        events = json.loads(Path(runner.end_profiling()).read_text())
    convs = [node.name for node in model.graph.node if node.op_type == "Conv"]
    times: dict[str, list[float]] = {}
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time") and \
                event["args"].get("op_name") == "QLinearConv":
            name = next((conv for conv in convs if event["name"].startswith(conv + "_")), None)
            if name is not None:
                times.setdefault(name, []).append(event["dur"] / 1000)
    return {name: statistics.median(values[1:] or values) for name, values in times.items()}  # the first warms up


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--int8", type=Path, default=Path("../build/dipnet_x2_1080x1920.int8.onnx"),
                        help="an int8 ONNX written by `quantize` (padded)")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--profile-runs", type=int, default=3)
    args = parser.parse_args()

    padded = onnx.load(str(args.int8))
    plain = onnx.ModelProto()
    plain.CopyFrom(padded)
    if not unpad(plain):
        raise SystemExit(f"{args.int8}: no padded conv (written before the fast-path padding?)")
    shape = [d.dim_value for d in padded.graph.input[0].type.tensor_type.shape.dim]
    name = padded.graph.input[0].name
    photo = vendor_preprocess(read_rgb8(list_images(default_calibration_dir())[0])[0], shape[2], shape[3])
    noise = np.random.default_rng(0).random(shape, dtype=np.float32)
    print(f"{args.int8} ({shape[3]}x{shape[2]}), {cpu_name()}, {args.threads} threads, onnxruntime {ort.__version__}")

    with tempfile.TemporaryDirectory() as work:
        paths = {"padded": Path(work) / "padded.onnx", "plain": Path(work) / "plain.onnx"}
        onnx.save(padded, str(paths["padded"]))
        onnx.save(plain, str(paths["plain"]))
        runtimes = ["onnxruntime"]
        try:
            import_openvino()
            runtimes.append("openvino")
        except InputError:
            print("OpenVINO not installed: onnxruntime only")
        forwards = {f"{runtime} {key}": open_session(path, runtime, args.threads).run
                    for runtime in runtimes for key, path in paths.items()}
        for what, x in (("photo", photo), ("random", noise)):
            for runtime in runtimes:
                same = np.array_equal(forwards[f"{runtime} padded"](x), forwards[f"{runtime} plain"](x))
                print(f"bit-identical output, {runtime} ({what}): {same}")
        # one runtime at a time: onnxruntime's idle threads spin after a forward and slow whatever runs next
        times = {}
        for runtime in runtimes:
            pair = {key: forward for key, forward in forwards.items() if key.startswith(runtime)}
            times |= time_interleaved(pair, photo, args.rounds)
    medians = {key: statistics.median(values) for key, values in times.items()}
    for key, seconds in medians.items():
        print(f"  {key:22s} {seconds * 1000:8.1f} ms per forward (median of {args.rounds}, interleaved)")
    for runtime in runtimes:
        ratio = medians[f"{runtime} padded"] / medians[f"{runtime} plain"]
        print(f"{runtime}: padded / plain = {ratio:.3f} ({(1 - ratio) * 100:+.1f}% faster)")

    macs = real_macs(plain)
    for key, model in (("plain", plain), ("padded", padded)):
        times = conv_kernel_times(model, {name: photo}, args.threads, args.profile_runs)
        per_mac = {conv: times[conv] / macs[conv] for conv in times}
        median = statistics.median(per_mac.values())
        print(f"\nonnxruntime profiler, {key} graph: conv kernel time per real MAC against the median conv's")
        print(f"  {'conv':32s} {'MMACs':>8s} {'ms':>8s} {'x median':>9s}")
        for conv in times:
            print(f"  {conv:32s} {macs[conv] / 1e6:8.1f} {times[conv]:8.2f} {per_mac[conv] / median:9.2f}")
        print(f"  convs: {sum(times.values()):.1f} ms; worst {max(per_mac.values()) / median:.2f}x the median per MAC")


if __name__ == "__main__":
    main()
