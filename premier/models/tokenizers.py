"""Tokenizers for the embedded model, built in code (no vocabulary files to fetch).

A WordPiece vocabulary of whole English words (the synthetic world's and common ones) plus
every printable ASCII character as a fallback piece, so any prompt tokenizes
deterministically. The CLIP-style tokenizer wraps prompts in <s> ... </s> (CLIP pools at
the first </s>); the T5-style one appends </s>, as T5 does.
"""

from __future__ import annotations

import string

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

PAD, EOS, BOS, UNK = "<pad>", "</s>", "<s>", "<unk>"
SPECIAL_TOKENS = (PAD, EOS, BOS, UNK)  # ids 0, 1, 2, 3

_WORDS = """
a an the one two three four five six seven eight nine ten many few some several single pair
of and or with without in on at to from by for over under above below behind beside between near
left right top bottom center centre middle corner upper lower front back side edge
red orange yellow green cyan blue purple violet magenta pink brown black white gray grey gold silver
light dark bright pale deep vivid muted pastel neon warm cool soft hard
circle circles square squares triangle triangles star stars ring rings cross crosses diamond diamonds
heart hearts hexagon hexagons dot dots line lines stripe stripes shape shapes box boxes disk disks
big small large tiny huge little round sharp thin thick tall short wide narrow long
background foreground pattern patterns texture grid checker checkers checkerboard wave waves noise
gradient plain solid outline outlined filled empty border frame style styled
photo photograph picture image painting drawing sketch illustration render art artwork poster
portrait landscape scene view close up closeup detailed simple minimal abstract realistic
cat cats dog dogs bird birds fish horse tree trees flower flowers house city street mountain
mountains sea ocean river lake forest sky sun moon cloud clouds rain snow night day morning evening
sunset sunrise beach field garden road car cars boat train person people man woman child face
is are be has have this that these those it its very
""".split()


def _vocab() -> dict[str, int]:
    tokens: list[str] = list(SPECIAL_TOKENS)
    printable = [c for c in string.printable if not c.isspace()]
    tokens += printable
    tokens += ["##" + c for c in printable]
    tokens += [w for w in dict.fromkeys(_WORDS) if w not in tokens]
    return {tok: i for i, tok in enumerate(tokens)}


def _base_tokenizer() -> Tokenizer:
    tok = Tokenizer(models.WordPiece(vocab=_vocab(), unk_token=UNK, max_input_chars_per_word=100))
    tok.normalizer = normalizers.Sequence([normalizers.NFKD(), normalizers.StripAccents(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    return tok


def _wrap(tok: Tokenizer, max_length: int) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        model_max_length=max_length,
        padding_side="right",
    )


def build_clip_tokenizer(max_length: int = 77) -> PreTrainedTokenizerFast:
    tok = _base_tokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A {EOS}", special_tokens=[(BOS, SPECIAL_TOKENS.index(BOS)), (EOS, SPECIAL_TOKENS.index(EOS))]
    )
    return _wrap(tok, max_length)


def build_t5_tokenizer(max_length: int) -> PreTrainedTokenizerFast:
    tok = _base_tokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single=f"$A {EOS}", special_tokens=[(EOS, SPECIAL_TOKENS.index(EOS))]
    )
    return _wrap(tok, max_length)


def vocab_size() -> int:
    return len(_vocab())
