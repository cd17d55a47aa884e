"""mistral-train: native-PyTorch training and alignment for Mistral-architecture models."""

from mistral_train.model.config import MistralConfig
from mistral_train.model.mistral import Mistral

__all__ = ["MistralConfig", "Mistral"]
__version__ = "0.1.0"
