"""A SentencePiece BPE model as an HF `tokenizers` tokenizer that gives the same ids.

transformers builds its own fast tokenizer when a folder holds only `tokenizer.model`, and that
one differs from sentencepiece on Mistral's files: its merges follow vocabulary ids where
sentencepiece follows piece scores (so `a  b` gives `▁▁ b`, not `▁ ▁b`), and it skips the dummy
prefix of text that already starts with a space. Writing our own `tokenizer.json` fixes what
transformers and vLLM load.

How sentencepiece (BPE, split by whitespace, whitespace-only pieces allowed) encodes, and how the
tokenizers pipeline below reproduces it:
- the normalizer prepends `▁` to every text and turns spaces into `▁`; tokenizers normalizes each
  stretch between special tokens on its own, so text after `[INST]` gets its own `▁`, exactly as
  mistral-common tokenizes each turn with its own dummy prefix;
- sentencepiece merges inside whitespace-delimited words; no Mistral piece holds `▁` after another
  character, so merging across the whole text gives the same result without a pre-tokenizer;
- merges are ranked by the score of the merged piece (highest first), as sentencepiece picks them.
  Whitespace-only pieces all share one score, where sentencepiece merges the leftmost pair first:
  a run of spaces grows from the left. Ranking the merges `(▁ * k, ▁)` longest first does the same.
- control pieces (`<s>`, `</s>`, `[INST]`, ...) are special tokens, so a chat template written as
  text yields their ids; characters outside the vocabulary fall back to byte pieces.
"""

from __future__ import annotations

from pathlib import Path

from sentencepiece import sentencepiece_model_pb2
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors

SPACE = "▁"
# sentencepiece_model.proto ModelProto.SentencePiece.Type
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, BYTE = 1, 2, 3, 4, 6


def _read_model(path: Path) -> sentencepiece_model_pb2.ModelProto:
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(Path(path).read_bytes())
    spec = proto.normalizer_spec
    if proto.trainer_spec.model_type != sentencepiece_model_pb2.TrainerSpec.BPE:
        raise ValueError(f"{path}: a sentencepiece {sentencepiece_model_pb2.TrainerSpec.ModelType.Name(proto.trainer_spec.model_type)}"
                         " model; only BPE models (every Mistral tokenizer.model) can be written as tokenizer.json")
    if spec.remove_extra_whitespaces or not spec.add_dummy_prefix or spec.name not in ("identity", ""):
        raise ValueError(f"{path}: normalizer {spec.name!r} (add_dummy_prefix={spec.add_dummy_prefix}, "
                         f"remove_extra_whitespaces={spec.remove_extra_whitespaces}); expected Mistral's: identity, "
                         "dummy prefix, whitespace kept")
    return proto


def _merges(proto: sentencepiece_model_pb2.ModelProto) -> list[tuple[str, str]]:
    """Every (left, right) pair of normal pieces whose concatenation is a normal piece, in the order
    sentencepiece would merge them: higher score of the result first; among equal scores (the
    whitespace runs) the longer left part first, so runs of spaces grow from the left."""
    rank = {p.piece: (p.score, i) for i, p in enumerate(proto.pieces) if p.type == NORMAL}
    found = []
    for piece, (score, index) in rank.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in rank and right in rank:
                found.append(((-score, -len(left), index), (left, right)))
    found.sort()
    return [pair for _, pair in found]


def sentencepiece_to_tokenizers(path: Path) -> Tokenizer:
    """The `tokenizers.Tokenizer` equal to the sentencepiece BPE model at `path` on text, adding BOS
    in front (transformers' `tokenizer(text)`); control pieces become special tokens."""
    proto = _read_model(path)
    vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
    unk = next(p.piece for p in proto.pieces if p.type == UNKNOWN)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=_merges(proto), unk_token=unk, fuse_unk=True, byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend(SPACE), normalizers.Replace(" ", SPACE)])
    tok.pre_tokenizer = None
    tok.decoder = decoders.Sequence([decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens([AddedToken(p.piece, special=True, normalized=False)
                            for p in proto.pieces if p.type in (UNKNOWN, CONTROL)])
    bos = proto.pieces[proto.trainer_spec.bos_id].piece
    tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                       special_tokens=[(bos, proto.trainer_spec.bos_id)])
    return tok
