"""Training data: read documents or rows, tokenize, pack into batches."""

from mistral_train.data.text import TextBatches, build_text_batches, read_documents

__all__ = ["TextBatches", "build_text_batches", "read_documents"]
