"""Offline tokenizers for tiny demo/test models: small WordLevel vocabularies, no hub download."""

from __future__ import annotations

from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

CORPUS = [
    "a cat walks on the grass realistic",
    "a dog runs along the beach at sunset",
    "a red car drives through a city street at night",
    "the camera pans slowly over a mountain lake",
    "a person slowly turns their head and smiles",
    "a blue green orange yellow purple square circle moves left right up down over a gradient",
    "dark bright soft glow ball stripes waves pattern animation in style of vidlora",
]


def _word_level(specials: list[str], extra: list[str] | None = None) -> Tokenizer:
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(CORPUS + (extra or []), trainers.WordLevelTrainer(special_tokens=specials, vocab_size=1000))
    return tok


def t5_like_tokenizer() -> PreTrainedTokenizerFast:
    """umT5-like: `$A </s>`, pad id 0, right padding (what UMT5EncoderModel expects)."""
    tok = _word_level(["<pad>", "</s>", "<unk>"])
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", special_tokens=[("</s>", tok.token_to_id("</s>"))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>", padding_side="right"
    )
