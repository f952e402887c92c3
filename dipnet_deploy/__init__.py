"""dipnet-deploy: fold, export, int8-quantize and evaluate DIPNet super-resolution models."""

__version__ = "0.1.0"
