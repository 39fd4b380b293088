"""Offline tokenizers for tiny demo/test models: small WordLevel vocabularies, no hub download."""

from __future__ import annotations

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
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


# Qwen2's pre-tokenizer: its split regex, then byte-level (GPT-2) characters. With a word-level vocabulary of whole
# pre-tokens, text tokenises into exactly as many tokens as the real BPE gives for words it has merged whole.
QWEN_SPLIT = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
# Qwen2.5-VL's chat template for text-only messages.
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}<|im_start|>system\n"
    "You are a helpful assistant.<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def qwen_like_tokenizer(system_message: str) -> PreTrainedTokenizerFast:
    """Qwen2.5-VL-like: its pre-tokenizer, special tokens and chat template, right padding, with the words of
    `system_message` in the vocabulary, so a chat prompt's prefix has as many tokens as with the real tokenizer
    (HunyuanVideo 1.5 crops a fixed 108 after its system message)."""
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>"]
    texts = [*CORPUS, system_message, "system\n", "user\n", "assistant\n", 'Text "hello". A sign "hello world"']
    tok.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=specials, vocab_size=1000))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<unk>",
        padding_side="right",
        chat_template=QWEN_CHAT_TEMPLATE,
    )
