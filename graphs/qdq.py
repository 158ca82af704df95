"""Quantized (QDQ) graphs: the quantization modes an artifact may have, and ONNX passes for them.

The exporter traces INT4 weights as int8 initializers (torch has no int4 tensors); `pack_int4`
retypes every initializer that feeds a blocked DequantizeLinear to INT4, so the file stores two
weights per byte, as TensorRT and ONNX Runtime expect.
"""

from __future__ import annotations

QUANT_MODES = ("fp8", "int8-wo", "int4-wo")  # `blockrt export --quantize`
KV_CACHE_DTYPES = ("fp8",)  # `--kv-cache-dtype`


def pack_int4(model) -> int:
    """Retype the int8 initializers of blocked DequantizeLinear nodes to INT4 (values must lie in
    -8..7) of an onnx_ir model; returns how many were retyped."""
    import onnx_ir as ir

    count = 0
    for node in model.graph:
        if node.op_type != "DequantizeLinear" or not node.attributes.get_int("block_size", 0):
            continue
        value = node.inputs[0]
        if value is None or value.const_value is None or value.dtype != ir.DataType.INT8:
            continue
        array = value.const_value.numpy()
        if array.min() < -8 or array.max() > 7:
            raise ValueError(f"initializer {value.name} of {node.name} holds values outside the int4 range")
        value.const_value = ir.Tensor(array, dtype=ir.DataType.INT4, name=value.name)
        value.dtype = ir.DataType.INT4
        count += 1
    return count
