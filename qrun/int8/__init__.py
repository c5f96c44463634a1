"""Real int8: BatchNorm folding for QAT, an integer-only reference model, ONNX QDQ export and onnxruntime runs.

Kept free of imports at package level: `qrun.quant.affine` reaches `qrun.int8.fold` lazily, and the modes
(`qrun.int8.modes`) use the trainer's helpers.
"""
