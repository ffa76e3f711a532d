"""Models, tokenizers and (query, passage) data built in code: no download, deterministic.

Used by the end-to-end benchmarks (the main job's built-in default) and by the tests. The tokenizer is a
real byte-level BPE trained on a generated English-like corpus, with the special tokens and chat
template of the model families fastrank serves, so prompt layouts, truncation and padding behave as
they do with a real checkpoint.
"""

from __future__ import annotations

import random
from typing import List, Optional, Tuple

import torch

QWEN25_05B = dict(
    hidden_size=896,
    intermediate_size=4864,
    num_hidden_layers=24,
    num_attention_heads=14,
    num_key_value_heads=2,
    vocab_size=151936,
    max_position_embeddings=32768,
    rope_theta=1000000.0,
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
)

# A Qwen2.5-style ChatML template (system message optional; default system prompt when none given).
CHATML_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if not (message['role'] == 'system' and loop.first) %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

_WORDS = (
    "the of and to in is was for on that with as by at from it his an were are which this be or has had "
    "not but first one their its new after who they have her she two been other when there all during into "
    "school time may years more most only over city some world would where later up such used many can "
    "state about national out known university united then made what query passage document answer "
    "relevant question search retrieve model score rank text water energy history river music science "
    "protein market language computer network health climate village league season film album species "
    "Yes No yes no Query Context Instruct Document Judge whether meets requirements based provided Note "
    "Given determine contains prediction either Predict summarize predict following within eight words "
    "relevance expert evaluates how well documents match queries carefully analyze semantic relationship "
    "between them provide binary judgment relevant Relevance piece output related least means most "
    "You Qwen created Alibaba Cloud helpful assistant system user think"
).split()


def _corpus(seed: int = 0, lines: int = 4000) -> List[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(lines):
        n = rng.randint(3, 30)
        words = [rng.choice(_WORDS) for _ in range(n)]
        if rng.random() < 0.3:
            words.insert(rng.randint(0, n), str(rng.randint(0, 2025)))
        out.append(" ".join(words) + rng.choice([".", "?", "!", ",", ":", "\n", "\n\n"]))
    # the scoring tokens must be whole tokens, at the start of a text and after a space
    out += ["Yes", "No", "yes", "no", " Yes", " No", " yes", " no"] * 200
    return out


def build_tokenizer(bos_token: Optional[str] = None, vocab_size: int = 1000, padding_side: str = "left", seed: int = 0):
    """A byte-level BPE ``PreTrainedTokenizerFast`` with ChatML special tokens and chat template.

    ``bos_token=None`` gives a Qwen-style tokenizer (no BOS; pad is ``<|endoftext|>``); a string such as
    ``"<s>"`` gives a Llama/Gemma-style one whose BOS differs from pad.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + ([bos_token] if bos_token else [])
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(seed), trainer=trainer)
    if bos_token:
        from tokenizers import processors

        # Llama/Gemma style: add_special_tokens=True prepends BOS.
        bos_id = tok.token_to_id(bos_token)
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos_token} $A", pair=f"{bos_token} $A {bos_token} $B", special_tokens=[(bos_token, bos_id)]
        )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        bos_token=bos_token,
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
        padding_side=padding_side,
        model_max_length=32768,
    )
    fast.chat_template = CHATML_TEMPLATE
    return fast


def build_xlmr_tokenizer(vocab_size: int = 1000, seed: int = 0):
    """An XLM-R-style ``XLMRobertaTokenizer``: a SentencePiece-style Unigram model (Metaspace ``▁`` pieces) trained
    on the generated corpus, with XLM-R's special tokens and ids (``<s>`` 0, ``<pad>`` 1, ``</s>`` 2, ``<unk>``
    3, ``<mask>`` 4) and pair layout ``<s> A </s></s> B </s>``."""
    import json

    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import XLMRobertaTokenizer

    specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    trainer = trainers.UnigramTrainer(
        vocab_size=vocab_size, special_tokens=specials, unk_token="<unk>", show_progress=False
    )
    tok.train_from_iterator(_corpus(seed), trainer=trainer)
    vocab = [(piece, float(score)) for piece, score in json.loads(tok.to_str())["model"]["vocab"]]
    if [piece for piece, _ in vocab[: len(specials)]] != specials:
        raise RuntimeError("build_xlmr_tokenizer: the trained vocabulary does not start with XLM-R's special tokens")
    return XLMRobertaTokenizer(vocab=vocab, model_max_length=512)


def qwen25_config(num_layers: int = 24, **overrides):
    from transformers import Qwen2Config

    kw = dict(QWEN25_05B)
    kw["num_hidden_layers"] = num_layers
    kw.update(overrides)
    return Qwen2Config(**kw)


def build_causal_lm(config, dtype=torch.float32, device="cpu", attn_implementation="sdpa", seed: int = 0):
    """An ``AutoModelForCausalLM`` with random weights from ``config``, in eval mode."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation, dtype=dtype)
    return model.to(device).eval()


def synthetic_pairs(n: int, seed: int = 0, query_words=(4, 24), passage_words=(16, 360)) -> List[Tuple[str, str]]:
    """``n`` (query, passage) pairs of mixed length: short queries, passages from a few words to a few
    hundred (log-uniform), like a retrieval candidate list."""
    rng = random.Random(seed)
    pairs = []
    for _ in range(n):
        q = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(*query_words))) + "?"
        lo, hi = passage_words
        length = int(round(lo * (hi / lo) ** rng.random()))
        p = " ".join(rng.choice(_WORDS) for _ in range(length)) + "."
        pairs.append((q, p))
    return pairs


def synthetic_rankings(
    queries: int, docs: int, doc_words=(20, 200), seed: int = 0, query_words=(4, 24)
) -> List[Tuple[str, List[str]]]:
    """``queries`` (query, documents) lists of ``docs`` documents each, every document ``doc_words[0]`` to
    ``doc_words[1]`` words long (uniform): what ``Reranker.rank`` is given, once per query."""
    rng = random.Random(seed)

    def text(lo, hi):
        return " ".join(rng.choice(_WORDS) for _ in range(rng.randint(lo, hi)))

    return [(text(*query_words) + "?", [text(*doc_words) + "." for _ in range(docs)]) for _ in range(queries)]
