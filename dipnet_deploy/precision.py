"""What a tensor taken out of int8 by a quality budget (``quantize --max-drop``) becomes, by name: no
imports, so that the command line can offer the choices without loading ONNX."""

# float: its Q/DQ pair removed; uint16: 16-bit Q/DQ (onnxruntime's quantizer's per-tensor override, opset
# 21), the form 16-bit accelerators take; the CPU runtimes run the convolutions around either in float
FALLBACKS = ("float", "uint16")
FP32_STEP = "fp32 (weights too)"  # how a budget's record names its last step: the fp32 model itself
