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


def llama_like_tokenizer(template: str) -> PreTrainedTokenizerFast:
    """Llama-3-like: `<|begin_of_text|>` prepended, no EOS, right padding, no model_max_length; the chat
    header tokens are special and the words of `template` are in the vocabulary, so HunyuanVideo's own prompt
    template tokenises as it does with the real llava-llama-3 tokenizer."""
    specials = [
        "<|begin_of_text|>",
        "<|end_of_text|>",
        "<|start_header_id|>",
        "<|end_header_id|>",
        "<|eot_id|>",
        "<pad>",
        "<unk>",
    ]
    tok = _word_level(specials, [template])
    bos = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A $B", special_tokens=[("<|begin_of_text|>", bos)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|begin_of_text|>",
        eos_token="<|end_of_text|>",
        pad_token="<pad>",
        unk_token="<unk>",
        padding_side="right",
    )


def clip_like_tokenizer() -> PreTrainedTokenizerFast:
    """CLIP-like: `<|startoftext|> $A <|endoftext|>`, padded with the EOS token to 77 (as openai CLIP-L)."""
    tok = _word_level(["<|startoftext|>", "<|endoftext|>", "<unk>"])
    bos, eos = tok.token_to_id("<|startoftext|>"), tok.token_to_id("<|endoftext|>")
    tok.post_processor = processors.TemplateProcessing(
        single="<|startoftext|> $A <|endoftext|>", special_tokens=[("<|startoftext|>", bos), ("<|endoftext|>", eos)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|startoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        unk_token="<unk>",
        padding_side="right",
        model_max_length=77,
    )
