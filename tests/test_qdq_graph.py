"""qdq_graph: the padding for onnxruntime's fast integer kernel is exact, and ``dequantize_early`` undoes it.

The models are small float graphs quantized by onnxruntime's own ``quantize_static``; the reference for each
rewrite is the same QDQ model before it, run by onnxruntime on the same input.
"""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from dipnet_deploy.qdq_graph import FAST_PATH, depth_to_space_on_uint8, dequantize_early, pad_for_fast_path
from dipnet_deploy.qdq_pairs import activation_pairs
from dipnet_deploy.runtime import ort_options

SIDE = 12


def conv(name: str, source: str, inputs: int, outputs: int, rng: np.random.Generator) -> tuple[onnx.NodeProto, list]:
    weight = numpy_helper.from_array(rng.normal(0, 0.3, (outputs, inputs, 3, 3)).astype(np.float32), f"{name}.weight")
    bias = numpy_helper.from_array(rng.normal(0, 0.1, outputs).astype(np.float32), f"{name}.bias")
    return helper.make_node("Conv", [source, weight.name, bias.name], [name], pads=[1, 1, 1, 1], name=name), [weight, bias]


@pytest.fixture(scope="module")
def int8_model(tmp_path_factory):
    """x2 graph with every case: the input read by two convs (3 -> 16, 3 -> 8), an 8-channel conv read by a
    conv and an Add's branch, and a last conv of 12 channels before DepthToSpace; quantized by onnxruntime."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    rng = np.random.default_rng(0)
    nodes, weights = [], []
    for name, source, cin, cout in (("a", "input", 3, 16), ("b", "input", 3, 8), ("c", "b", 8, 16),
                                    ("up", "sum", 16, 12)):
        node, tensors = conv(name, source, cin, cout, rng)
        nodes.append(node)
        weights += tensors
        if name == "c":
            nodes.append(helper.make_node("Add", ["a", "c"], ["sum"]))
    nodes.append(helper.make_node("DepthToSpace", ["up"], ["output"], blocksize=2, mode="CRD"))
    graph = helper.make_graph(nodes, "cases", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, SIDE, SIDE])],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 3, 2 * SIDE, 2 * SIDE])],
                              weights)
    work = tmp_path_factory.mktemp("qdq")
    fp32, int8 = work / "fp32.onnx", work / "int8.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(fp32))

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{"input": rng.random((1, 3, SIDE, SIDE), dtype=np.float32)} for _ in range(4)])

        def get_next(self):
            return next(self.batches, None)

    quantize_static(str(fp32), str(int8), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    extra_options={"ActivationSymmetric": False, "WeightSymmetric": True})
    model = onnx.load(str(int8))
    # the input on [0, 1] with zero point 0, as quantize's image grid writes it
    inits = {init.name: init for init in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "QuantizeLinear" and node.input[0] == "input":
            inits[node.input[1]].CopyFrom(numpy_helper.from_array(np.asarray(1 / 255, np.float32), node.input[1]))
            inits[node.input[2]].CopyFrom(numpy_helper.from_array(np.asarray(0, np.uint8), node.input[2]))
    return model


def run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    return ort.InferenceSession(model.SerializeToString(), ort_options(), providers=["CPUExecutionProvider"]).run(
        None, {"input": x})[0]


def copy_of(model: onnx.ModelProto) -> onnx.ModelProto:
    twin = onnx.ModelProto()
    twin.CopyFrom(model)
    return twin


def test_padding_reaches_the_fast_path_counts_and_is_bit_identical(int8_model):
    padded = depth_to_space_on_uint8(copy_of(int8_model))
    changes = pad_for_fast_path(padded)
    by_conv = {c["conv"]: (c["channels"], c["padded"]) for c in changes}
    # 3 input channels -> 4; 8 outputs -> 16 (below the kernel's minimum); 12 outputs -> 16; c (8 -> 16) fits
    assert by_conv == {"a": ([3, 16], [4, 16]), "b": ([3, 8], [4, 16]), "up": ([16, 12], [16, 16])}
    onnx.checker.check_model(padded, full_check=True)
    weights = {i.name: numpy_helper.to_array(i) for i in padded.graph.initializer if i.name.endswith("_quantized")}
    for shape in [w.shape for name, w in weights.items() if name.endswith("weight_quantized")]:
        assert shape[1] % FAST_PATH.input_multiple == 0
        assert shape[0] >= FAST_PATH.min_outputs and shape[0] % FAST_PATH.output_multiple == 0
    x = np.random.default_rng(1).random((1, 3, SIDE, SIDE), dtype=np.float32)
    assert np.array_equal(run(padded, x), run(int8_model, x))
    again = depth_to_space_on_uint8(copy_of(int8_model))
    pad_for_fast_path(again)
    assert again.SerializeToString() == padded.SerializeToString()  # deterministic


def test_dequantize_early_restores_the_quantizers_graph(int8_model):
    padded = depth_to_space_on_uint8(copy_of(int8_model))
    pad_for_fast_path(padded)
    early = dequantize_early(copy_of(padded))
    # the same nodes reading the same constants (the tensor DepthToSpace's move renamed aside)
    nodes = lambda model: [(n.op_type, [i for i in n.input if i in arrays(model)]) for n in model.graph.node]  # noqa: E731
    arrays = lambda model: {i.name: numpy_helper.to_array(i).tolist() for i in model.graph.initializer}  # noqa: E731
    assert nodes(early) == nodes(int8_model) and arrays(early) == arrays(int8_model)
    producers = {out: node for node in early.graph.node for out in node.output}
    initializers = {init.name for init in early.graph.initializer}
    for node in early.graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0] not in initializers:
            assert producers[node.input[0]].op_type == "QuantizeLinear", node.name
    # every activation pair is readable (diagnose takes each out in turn)
    assert all(pair.dequantized for pair in activation_pairs(early))
    x = np.random.default_rng(2).random((1, 3, SIDE, SIDE), dtype=np.float32)
    assert np.array_equal(run(early, x), run(int8_model, x))


def test_convs_that_fit_the_rule_are_left_alone(int8_model):
    anything = FAST_PATH._replace(input_multiple=1, min_outputs=1, output_multiple=1)
    model = copy_of(int8_model)
    assert pad_for_fast_path(model, anything) == []
    assert model.SerializeToString() == int8_model.SerializeToString()


def test_a_conv_whose_inputs_cannot_be_padded_is_left_whole(int8_model):
    """Input channels are padded only behind a Q of zero point 0 (the image); c reads b's output, whose zero
    point is not 0, so under a rule wanting 16 input channels it keeps its 8 and its outputs too."""
    wide_inputs = FAST_PATH._replace(input_multiple=16, min_outputs=1, output_multiple=1)
    model = depth_to_space_on_uint8(copy_of(int8_model))
    changes = pad_for_fast_path(model, wide_inputs)
    assert {c["conv"]: c["padded"] for c in changes} == {"a": [16, 16], "b": [16, 8]}
    x = np.random.default_rng(3).random((1, 3, SIDE, SIDE), dtype=np.float32)
    assert np.array_equal(run(model, x), run(int8_model, x))


def test_unpad_takes_out_only_the_exact_forms_it_wrote(int8_model):
    """A crafted Pad that also shifts rows, or a Slice with steps, is not the padding: it stays, and diagnose
    forms no Q/DQ pair around it (taking the pair out would feed it float values)."""
    model = depth_to_space_on_uint8(copy_of(int8_model))
    pad_for_fast_path(model)
    inits = {init.name: init for init in model.graph.initializer}
    pads = next(node for node in model.graph.node if node.op_type == "Pad").input[1]
    inits[pads].CopyFrom(numpy_helper.from_array(np.asarray([0, 0, 2, 0, 0, 1, -2, 0], np.int64), pads))
    dequantize_early(model)
    assert [node.op_type for node in model.graph.node].count("Pad") == 1
    assert "Slice" not in {node.op_type for node in model.graph.node}  # the exact Slices went
    quantized_by_pad = {node.input[0] for node in model.graph.node if node.op_type == "Pad"}
    assert not quantized_by_pad & {pair.quantized for pair in activation_pairs(model)}
