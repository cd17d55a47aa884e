"""NF4 base weights in bitsandbytes' format, for QLoRA (see nf4.py for the model-level API)."""

from mistral_train.quant.linear import NF4Linear
from mistral_train.quant.nf4 import dequantize_model, nf4_storage_bytes, quantization_config, quantize_model
from mistral_train.quant.nf4_format import NF4Weight, dequantize_nf4, quantize_nf4

__all__ = [
    "NF4Linear",
    "NF4Weight",
    "dequantize_model",
    "dequantize_nf4",
    "nf4_storage_bytes",
    "quantization_config",
    "quantize_model",
    "quantize_nf4",
]
