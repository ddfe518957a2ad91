"""A tiny random Llama and a word-level tokenizer, built offline, for the perplexity and ``sparsecc eval`` tests."""

import random

import torch

# A fixed word list: the tokenizer's vocabulary (after [UNK]) and the source of the test text.
WORDS = ("the a an of to in is it that for on with as by at from this be are was or not function value "
         "return class module object list string number file name type error call method data default "
         "argument python code line set time key new use first").split()


def tokenizer():
    """A whitespace word-level fast tokenizer over WORDS (id 0 is [UNK])."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


def model(seed: int = 0):
    """A 2-layer Llama (hidden 32, 4 heads, 2 KV heads, FFN 64) with random weights, in eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(WORDS) + 1, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         attn_implementation="sdpa")
    return LlamaForCausalLM(config).eval()


def build():
    """``sparsecc eval`` factory: (tiny Llama, its tokenizer)."""
    return model(), tokenizer()


def text(words: int = 600, seed: int = 0) -> str:
    """Deterministic text of ``words`` words from WORDS, with line breaks."""
    rng = random.Random(seed)
    picked = [rng.choice(WORDS) for _ in range(words)]
    return "\n".join(" ".join(picked[i:i + 12]) for i in range(0, words, 12))


def save(directory) -> None:
    """Save the tiny model and tokenizer with save_pretrained (a local model directory)."""
    model().save_pretrained(directory)
    tokenizer().save_pretrained(directory)
