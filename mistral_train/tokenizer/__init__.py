"""Mistral tokenizers and chat formats, token for token as mistral-common encodes them.

tokenizer.py      Tokenizer: SentencePiece, Tekken and tokenizer.json files; `load_tokenizer`
tekken.py         Tekken's BPE (tiktoken), equal to mistral-common's Tekkenizer
chat_messages.py  OpenAI-form messages and tools, checked
chat_formats.py   the instruct formats v1 to v15: ids and the trained mask
chat_templates.py the Jinja chat template of each format, for transformers and vLLM
sentencepiece_json.py  a SentencePiece model as an equal tokenizer.json
files.py          the tokenizer files of every folder we write
"""

from mistral_train.tokenizer.tokenizer import Tokenizer, bundled_tokenizer_path, load_tokenizer, resolve_tokenizer_path

__all__ = ["Tokenizer", "bundled_tokenizer_path", "load_tokenizer", "resolve_tokenizer_path"]
