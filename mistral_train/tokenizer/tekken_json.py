"""A tekken file as an HF `tokenizers` tokenizer.json that gives the same ids (BOS in front).

transformers has a Tekken converter, but transformers is only an oracle here (a dev dependency):
this module writes the byte-level BPE itself, as sentencepiece_json.py does for SentencePiece.

How tiktoken (mistral-common's Tekkenizer) encodes, and how the tokenizers pipeline repeats it:
- the text is split by the file's regex (`config.pattern`), each piece encoded on its own: a Split
  pre-tokenizer with the same pattern, behavior `isolated` (every match is a piece);
- a piece that is itself a token is that token (tiktoken looks the whole piece up first):
  `ignore_merges=True` does the same lookup;
- otherwise the adjacent pair whose joined bytes have the lowest rank merges first: the merges are
  every split (left, right) of every token into two tokens, ranked by the joined token's rank;
- bytes are written as GPT-2's printable characters (ByteLevel without its own regex) so byte
  strings that are not UTF-8 still have a vocabulary entry;
- special tokens take the first ids (tekken.py's list, `<SPECIAL_n>` fillers included); ordinary
  ids are the rank plus that offset, as in the tekken file.
"""

from __future__ import annotations

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

from mistral_train.tokenizer.tekken import Tekken


def _byte_chars() -> dict[int, str]:
    """GPT-2's byte -> printable character table (what tokenizers' ByteLevel uses)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def tekken_to_tokenizers(tekken: Tekken) -> Tokenizer:
    """The `tokenizers.Tokenizer` equal to `tekken` on text, adding BOS in front; its special tokens
    (control tokens and fillers) are special added tokens."""
    chars = _byte_chars()
    ranks = tekken.ranks  # bytes -> rank
    offset = tekken.n_special
    as_text = {token: "".join(chars[b] for b in token) for token in ranks}
    vocab = {tekken.specials[i]: i for i in range(offset)}
    vocab.update({as_text[token]: rank + offset for token, rank in ranks.items()})
    found = []
    for token, rank in ranks.items():
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in ranks and right in ranks:
                found.append((rank, cut, as_text[left], as_text[right]))
    found.sort()
    merges = [(left, right) for _, _, left, right in found]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=True, fuse_unk=False, byte_fallback=False))
    tok.normalizer = None
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(tekken.pattern), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in tekken.specials])
    bos = tekken.specials[tekken.defaults["bos"]]
    tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                       special_tokens=[(bos, tekken.defaults["bos"])])
    return tok
