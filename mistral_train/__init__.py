"""mistral-train: native-PyTorch training and alignment for Mistral-architecture models."""

from mistral_train.model.config import MistralConfig
from mistral_train.model.mistral import Mistral
from mistral_train.quant import loading as _nf4_reading  # noqa: F401  registers quantize="nf4" with model/hf.py

__all__ = ["MistralConfig", "Mistral"]
__version__ = "0.1.0"
