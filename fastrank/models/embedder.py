"""Embedders on Hugging Face backbones: a BGE-style bi-encoder and LLARA, both pooled by ``fastrank.pool``.

The backbone runs for its last hidden state only: no LM head, no list of every layer's hidden states.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch

import fastrank.functional as F
from fastrank.data.packing import PackedBatch, is_packed_features
from fastrank.engine import packed_forward
from fastrank.engine.fusion import maybe_fuse
from fastrank.models.reranker import backbone_of, enable_checkpointing, unwrap_model
from fastrank.utils import positive_int

BIENCODER_POOLING = ("cls", "mean", "last")
FASTRANK_CONFIG = "fastrank_embedder.json"


@dataclass
class EncoderOutput:
    """What ``forward(query=..., passage=...)`` returns (the seeds' ``EncoderOutput``)."""

    q_reps: Optional[torch.Tensor] = None
    p_reps: Optional[torch.Tensor] = None
    loss: Optional[torch.Tensor] = None
    scores: Optional[torch.Tensor] = None


def is_causal(model) -> bool:
    """True when the model's self-attention is causal (a decoder: Qwen, Llama, Gemma, Mistral, ...), read from
    its attention modules' ``is_causal``; False for bidirectional encoders (BERT, XLM-R)."""
    return any(getattr(m, "is_causal", None) is True for m in unwrap_model(model).modules())


def encoder_of(model):
    """The module whose ``last_hidden_state`` is embedded: the decoder of a causal LM (its LM head is never
    run), or the model itself for an ``AutoModel`` (BERT, XLM-R, a bare decoder)."""
    inner = unwrap_model(model)
    get_head = getattr(inner, "get_output_embeddings", None)
    if callable(get_head) and get_head() is not None:
        return backbone_of(inner)
    return model


class _EmbedderBase(torch.nn.Module):
    """What the bi-encoder and LLARA share: encoding (with sub-batches), similarity, and the training
    forward of the seeds' ``BiEncoderModel`` on fastrank's fused contrastive loss."""

    def __init__(
        self,
        model,
        tokenizer,
        normalize: bool,
        temperature: float,
        negatives_cross_device: bool = False,
        sub_batch_size: int = -1,
        use_inbatch_neg: bool = True,
    ):
        super().__init__()
        if not isinstance(normalize, bool):
            raise ValueError(f"normalize: must be True or False, got {normalize!r}")
        if not (isinstance(temperature, (int, float)) and temperature > 0):
            raise ValueError(f"temperature: must be a positive number, got {temperature!r}")
        if not normalize and temperature != 1.0:
            # The research code scores unnormalised embeddings by their raw inner product.
            warnings.warn(
                f"temperature={temperature} is ignored without normalisation (inner-product scores use 1.0), "
                "as the reference training code does",
                stacklevel=3,
            )
            temperature = 1.0
        if negatives_cross_device and not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            raise ValueError(
                "negatives_cross_device: needs torch.distributed to be initialised (torchrun, or the HF Trainer "
                "launched with several processes)"
            )
        if not isinstance(sub_batch_size, int) or sub_batch_size == 0:
            raise ValueError(
                f"sub_batch_size: must be a positive int, or -1 for no sub-batches, got {sub_batch_size!r}"
            )
        self.model = model
        maybe_fuse(model)  # decoder embedders (LLARA): norms, RoPE and gated activation through fused ops
        self.tokenizer = tokenizer
        self.normalize = normalize
        self.temperature = float(temperature)
        self.negatives_cross_device = bool(negatives_cross_device)
        self.sub_batch_size = sub_batch_size
        self.use_inbatch_neg = bool(use_inbatch_neg)

    @property
    def backbone(self):
        return encoder_of(self.model)

    def packed_features(self, features) -> Optional[PackedBatch]:
        """The packed batch in ``features`` (a ``PackedBatch``, or the dict a packed collator made), else None."""
        if isinstance(features, PackedBatch):
            return features
        return PackedBatch.from_features(features) if is_packed_features(features) else None

    def hidden_and_layout(self, features) -> Tuple[torch.Tensor, dict]:
        """The last hidden state and how pool must read it: ``[N, T, H]`` with the attention mask, or, for a
        packed batch (the engine enabled on the model), ``[M, H]`` with the items' ``cu_seqlens``."""
        batch = self.packed_features(features)
        if batch is None:
            return self.hidden_states(features), {"attention_mask": features.get("attention_mask")}
        if batch.item_cu_seqlens is None:
            raise ValueError("features: a packed embedder batch must hold whole texts in order, without prefixes")
        return packed_forward(self.backbone, batch), {"cu_seqlens": batch.item_cu_seqlens}

    def hidden_states(self, features: dict) -> torch.Tensor:
        keys = ("input_ids", "attention_mask", "token_type_ids", "position_ids", "inputs_embeds")
        kwargs = {k: features[k] for k in keys if features.get(k) is not None}
        # No cache: an encoding pass never decodes, and a cache object disables packed-sequence detection.
        return self.backbone(**kwargs, use_cache=False).last_hidden_state

    def encode(self, features, normalize: Optional[bool] = None) -> torch.Tensor:
        """fp32 ``[N, H]`` embeddings of tokenised ``features`` (a dict of ``input_ids``, ``attention_mask``,
        ...; or a list of such dicts, concatenated), in chunks of ``sub_batch_size`` rows when set."""
        if features is None:
            return None
        if isinstance(features, (list, tuple)):
            return torch.cat([self.encode(f, normalize) for f in features], dim=0)
        if self.packed_features(features) is not None:
            return self._embed(features, normalize)
        n = (
            features["input_ids"].shape[0]
            if features.get("input_ids") is not None
            else features["inputs_embeds"].shape[0]
        )
        if self.sub_batch_size > 0 and n > self.sub_batch_size:
            return torch.cat(
                [
                    self._embed(
                        {k: v[i : i + self.sub_batch_size] if torch.is_tensor(v) else v for k, v in features.items()},
                        normalize,
                    )
                    for i in range(0, n, self.sub_batch_size)
                ],
                dim=0,
            )
        return self._embed(features, normalize)

    def compute_similarity(self, q_reps: torch.Tensor, p_reps: torch.Tensor) -> torch.Tensor:
        """Inner products ``q @ p.T`` (cosine similarities when normalised)."""
        return q_reps @ p_reps.t()

    def forward(self, query=None, passage=None, teacher_score=None) -> EncoderOutput:
        """The seeds' ``BiEncoderModel.forward``.

        ``query`` holds B queries and ``passage`` their groups of G passages (positive first), contiguous.
        In training mode (``model.train()``) with both, returns the contrastive loss of
        ``q @ p.T / temperature`` (in-batch negatives unless ``use_inbatch_neg=False``; passages gathered
        from every process, with gradient, when ``negatives_cross_device``), plus FlagEmbedding's
        distillation term when ``teacher_score`` (``[B, G]`` or flat, raw teacher scores) is given. The
        loss is fastrank's fused one: the ``[B, P]`` score matrix is never built. ``scores`` is each
        query's own group ``[B, G]`` (not the full matrix; use ``compute_similarity`` for that).
        """
        from fastrank.functional import contrastive_loss

        q = self.encode(query)
        p = self.encode(passage)
        if q is None or p is None:
            return EncoderOutput(q_reps=q, p_reps=p)
        b = q.shape[0]
        if p.shape[0] % b:
            raise ValueError(
                f"passage: holds {p.shape[0]} passages for {b} queries; it must hold B * G (each query's group "
                "of G passages, positive first, contiguous)"
            )
        g = p.shape[0] // b
        scores = (q.detach()[:, None, :] * p.detach().view(b, g, -1)).sum(-1) / self.temperature
        if not self.training:
            return EncoderOutput(q_reps=q, p_reps=p, scores=scores)
        if teacher_score is not None and not torch.is_tensor(teacher_score):
            teacher_score = torch.tensor(teacher_score, dtype=torch.float32, device=q.device)
        if teacher_score is not None:
            teacher_score = teacher_score.to(q.device).float().view(b, g)
        targets = None
        candidates = p
        if self.use_inbatch_neg and self.negatives_cross_device:
            import torch.distributed.nn.functional as dist_fn

            # Every process's passages, with gradient flowing back to their owners; this process's
            # queries are rows rank * B .. of the global batch.
            candidates = torch.cat(dist_fn.all_gather(p.contiguous()), dim=0)
            rank = torch.distributed.get_rank()
            targets = (torch.arange(b, device=q.device) + rank * b) * g
        loss = contrastive_loss(
            q,
            candidates.to(q.dtype),
            temperature=self.temperature,
            group_size=g,
            in_batch=self.use_inbatch_neg,
            targets=targets,
            teacher_scores=teacher_score,
        )
        return EncoderOutput(loss=loss, scores=scores, q_reps=q, p_reps=p)

    def activation_checkpointing_enable(self, **kwargs):
        """Checkpointing in the backbone (the HF Trainer calls this for ``activation_checkpointing=True``)."""
        enable_checkpointing(self.model, **kwargs)

    gradient_checkpointing_enable = activation_checkpointing_enable  # the name before transformers 5.23

    def enable_input_require_grads(self):
        """Delegates to the backbone (LoRA with gradient checkpointing needs it)."""
        unwrap_model(self.model).enable_input_require_grads()

    def _common_config(self) -> dict:
        return {"normalize": self.normalize, "temperature": self.temperature}


class BiEncoder(_EmbedderBase):
    """BGE's bi-encoder: pooled (``cls``, ``mean`` or ``last`` real token) and optionally L2-normalised last
    hidden state of any Hugging Face ``AutoModel`` (or causal LM, run without its LM head).

    ``pooling`` defaults to ``cls`` for a bidirectional encoder and to ``last`` for a causal LM, whose first
    token sees only itself: ``cls`` on a causal LM is refused (every text starting with the same token would
    get the same embedding). ``temperature`` scales similarities in training and is forced to 1.0 without
    normalisation.
    ``query_instruction`` / ``passage_instruction`` are prepended to the texts by ``encode_queries`` /
    ``encode_corpus`` of ``fastrank.Embedder``.
    """

    kind = "bi"

    def __init__(
        self,
        model,
        tokenizer=None,
        *,
        pooling: Optional[str] = None,
        normalize: bool = True,
        temperature: float = 0.02,
        query_instruction: Optional[str] = None,
        passage_instruction: Optional[str] = None,
        max_length: int = 512,
        negatives_cross_device: bool = False,
        sub_batch_size: int = -1,
        use_inbatch_neg: bool = True,
    ):
        causal = is_causal(model)
        if pooling is None:
            pooling = "last" if causal else "cls"
        if pooling not in BIENCODER_POOLING:
            raise ValueError(f"pooling: {pooling!r} is not one of {', '.join(BIENCODER_POOLING)}")
        if pooling == "cls" and causal:
            raise ValueError(
                f"pooling: 'cls' on {type(unwrap_model(model)).__name__}, a causal LM, pools the first token, which "
                "attends only to itself, so texts that start alike get the same embedding; use pooling='last' "
                "(the default for causal LMs) or kind='llara'"
            )
        positive_int("max_length", max_length)
        super().__init__(
            model, tokenizer, normalize, temperature, negatives_cross_device, sub_batch_size, use_inbatch_neg
        )
        self.pooling = pooling
        self.query_instruction = query_instruction
        self.passage_instruction = passage_instruction
        self.max_length = int(max_length)

    def _embed(self, features: dict, normalize: Optional[bool] = None) -> torch.Tensor:
        hidden, layout = self.hidden_and_layout(features)
        norm = self.normalize if normalize is None else normalize
        return F.pool(hidden, mode=self.pooling, normalize=norm, **layout)

    def tokenize(
        self, texts: Sequence[str], kind: str = "passage", max_length: Optional[int] = None
    ) -> List[List[int]]:
        """Token ids of each text with the tokenizer's own special tokens, truncated to ``max_length``."""
        return self.tokenizer(
            list(texts), add_special_tokens=True, truncation=True, max_length=max_length or self.max_length
        )["input_ids"]

    def instruction(self, kind: str) -> Optional[str]:
        return self.query_instruction if kind == "query" else self.passage_instruction

    def save(self, path: str, state_dict: Optional[dict] = None) -> None:
        """Write the model, its tokenizer, fastrank's settings and a sentence-transformers layout
        (``modules.json``, ``1_Pooling``, ``2_Normalize``) so ``SentenceTransformer(path)`` loads it.
        A PEFT-wrapped model writes its adapter instead of the full weights (merge it to get a folder
        sentence-transformers loads alone). ``state_dict`` (keyed as ``self.model.state_dict()``) gives the
        weights to write when the parameters hold only this process's shard (FSDP)."""
        os.makedirs(path, exist_ok=True)
        self.model.save_pretrained(path, state_dict=state_dict)  # a PEFT model writes its adapter
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(path)
        dim = unwrap_model(self.model).config.hidden_size
        modules = [
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        ]
        if self.normalize:
            modules.append(
                {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}
            )
            os.makedirs(os.path.join(path, "2_Normalize"), exist_ok=True)
        os.makedirs(os.path.join(path, "1_Pooling"), exist_ok=True)
        pooling = {
            "word_embedding_dimension": dim,
            "pooling_mode_cls_token": self.pooling == "cls",
            "pooling_mode_mean_tokens": self.pooling == "mean",
            "pooling_mode_max_tokens": False,
            "pooling_mode_mean_sqrt_len_tokens": False,
            "pooling_mode_weightedmean_tokens": False,
            "pooling_mode_lasttoken": self.pooling == "last",
            "include_prompt": True,
        }
        prompts = {}
        if self.query_instruction:
            prompts["query"] = self.query_instruction
        if self.passage_instruction:
            prompts["document"] = self.passage_instruction
        files = {
            "modules.json": modules,
            os.path.join("1_Pooling", "config.json"): pooling,
            "sentence_bert_config.json": {"max_seq_length": self.max_length, "do_lower_case": False},
            "config_sentence_transformers.json": {
                "prompts": prompts,
                "default_prompt_name": None,
                "similarity_fn_name": "cosine" if self.normalize else "dot",
            },
            FASTRANK_CONFIG: dict(
                self._common_config(),
                kind=self.kind,
                pooling=self.pooling,
                max_length=self.max_length,
                query_instruction=self.query_instruction,
                passage_instruction=self.passage_instruction,
            ),
        }
        for name, content in files.items():
            with open(os.path.join(path, name), "w") as f:
                json.dump(content, f, indent=2)

    @classmethod
    def from_pretrained(cls, path: str, *, dtype="auto", **overrides) -> "BiEncoder":
        """Load a folder written by ``save`` or any sentence-transformers / Hugging Face encoder folder.

        Pooling, normalisation, max length and instructions are read from fastrank's settings, else from the
        sentence-transformers files (``1_Pooling``, ``Normalize`` module, ``sentence_bert_config.json``,
        prompts); keyword arguments override both.
        """
        from transformers import AutoModel, AutoTokenizer

        settings = read_embedder_settings(path)
        settings.pop("kind", None)
        settings.update({k: v for k, v in overrides.items() if v is not None})
        model = AutoModel.from_pretrained(path, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(path)
        return cls(model, tokenizer, **settings)


def read_embedder_settings(path: str) -> dict:
    """Pooling, normalisation, length and instructions of an embedder folder (fastrank's or
    sentence-transformers' files); empty when the folder has neither."""
    settings = {}
    st_modules = os.path.join(path, "modules.json")
    if os.path.exists(st_modules):
        with open(st_modules) as f:
            modules = json.load(f)
        settings["normalize"] = any(m.get("type", "").endswith("Normalize") for m in modules)
        for m in modules:
            if m.get("type", "").endswith("Pooling"):
                with open(os.path.join(path, m["path"], "config.json")) as f:
                    pool = json.load(f)
                if pool.get("pooling_mode_cls_token"):
                    settings["pooling"] = "cls"
                elif pool.get("pooling_mode_mean_tokens"):
                    settings["pooling"] = "mean"
                elif pool.get("pooling_mode_lasttoken"):
                    settings["pooling"] = "last"
                else:
                    raise ValueError(
                        f"path: {path}'s pooling config ({m['path']}/config.json) uses a mode fastrank does not "
                        "implement (cls, mean and last token are supported)"
                    )
        bert_config = os.path.join(path, "sentence_bert_config.json")
        if os.path.exists(bert_config):
            with open(bert_config) as f:
                settings["max_length"] = json.load(f).get("max_seq_length", 512)
        st_config = os.path.join(path, "config_sentence_transformers.json")
        if os.path.exists(st_config):
            with open(st_config) as f:
                prompts = json.load(f).get("prompts") or {}
            if prompts.get("query"):
                settings["query_instruction"] = prompts["query"]
            if prompts.get("document") or prompts.get("passage"):
                settings["passage_instruction"] = prompts.get("document") or prompts.get("passage")
        if not settings["normalize"]:
            settings["temperature"] = 1.0
    own = os.path.join(path, FASTRANK_CONFIG)
    if os.path.exists(own):
        with open(own) as f:
            saved = json.load(f)
        # LLARA folders written by fastrank 0.2 name the budgets as the inference templates do.
        for old, new in (("query_max_length", "query_max_len"), ("passage_max_length", "passage_max_len")):
            if old in saved:
                saved[new] = saved.pop(old)
        settings.update(saved)
    return settings


LLARA_PASSAGE_TOKENS = tuple(f"<s{i}>" for i in range(1, 9))
LLARA_QUERY_TOKENS = tuple(f"<s{i}>" for i in range(9, 17))
# The suffix's leading '"' closes the quote that the prefix opens (FlagEmbedding research/LLARA/finetune/data.py).
LLARA_PASSAGE_SUFFIX = '", summarize the above passage within eight words: ' + "".join(LLARA_PASSAGE_TOKENS)
LLARA_QUERY_SUFFIX = '", predict the following passage within eight words: ' + "".join(LLARA_QUERY_TOKENS)


class LlaraEncoder(_EmbedderBase):
    """LLARA (FlagEmbedding research/LLARA): a causal LM embeds a text as the mean of its final, normed
    hidden state at eight appended special tokens.

    Ids: ``tokenizer('"')`` with special tokens (BOS + ``"``), the text tokenised alone and truncated so the
    whole fits ``max_length``, then the passage suffix ``'", summarize the above passage within eight words:
    <s1>..<s8>'`` or the query suffix ``'", predict the following passage within eight words: <s9>..<s16>'``
    (its ``"`` closes the prefix's; no special tokens, no EOS). ``<s1>..<s16>`` are added to the tokenizer,
    and rows to the embeddings, when missing. The eight positions are the last eight real tokens, found from
    the attention mask, so either padding side works (the reference code's ``[:, -8:]`` is right for left
    padding only).
    """

    kind = "llara"

    def __init__(
        self,
        model,
        tokenizer,
        *,
        normalize: bool = True,
        temperature: float = 0.02,
        query_max_len: int = 64,
        passage_max_len: int = 160,
        negatives_cross_device: bool = False,
        sub_batch_size: int = -1,
        use_inbatch_neg: bool = True,
    ):
        super().__init__(
            model, tokenizer, normalize, temperature, negatives_cross_device, sub_batch_size, use_inbatch_neg
        )
        self.query_max_len = int(query_max_len)
        self.passage_max_len = int(passage_max_len)
        self._add_special_tokens()
        self._prefix = tokenizer('"')["input_ids"]
        self._suffix = {
            "passage": tokenizer(LLARA_PASSAGE_SUFFIX, add_special_tokens=False)["input_ids"],
            "query": tokenizer(LLARA_QUERY_SUFFIX, add_special_tokens=False)["input_ids"],
        }
        for kind, tokens in (("passage", LLARA_PASSAGE_TOKENS), ("query", LLARA_QUERY_TOKENS)):
            wanted = tokenizer.convert_tokens_to_ids(list(tokens))
            if self._suffix[kind][-8:] != wanted:
                raise ValueError(f"tokenizer: the LLARA {kind} suffix does not end in the eight ids of {tokens}")

    def _add_special_tokens(self):
        vocab = self.tokenizer.get_vocab()
        missing = [t for t in LLARA_PASSAGE_TOKENS + LLARA_QUERY_TOKENS if t not in vocab]
        if missing:
            self.tokenizer.add_special_tokens(
                {"additional_special_tokens": missing}, replace_extra_special_tokens=False
            )
        rows = unwrap_model(self.model).get_input_embeddings().weight.shape[0]
        if len(self.tokenizer) > rows:
            unwrap_model(self.model).resize_token_embeddings(len(self.tokenizer))

    def tokenize(
        self, texts: Sequence[str], kind: str = "passage", max_length: Optional[int] = None
    ) -> List[List[int]]:
        if kind not in ("query", "passage"):
            raise ValueError(f"kind: must be 'query' or 'passage', got {kind!r}")
        limit = max_length or (self.query_max_len if kind == "query" else self.passage_max_len)
        suffix = self._suffix[kind]
        budget = limit - len(self._prefix) - len(suffix)
        if budget < 1:
            raise ValueError(f"max_length: {limit} leaves no room for text after the LLARA prefix and suffix")
        bodies = self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]
        return [self._prefix + body[:budget] + suffix for body in bodies]

    def instruction(self, kind: str) -> Optional[str]:
        return None

    def _embed(self, features: dict, normalize: Optional[bool] = None) -> torch.Tensor:
        hidden, layout = self.hidden_and_layout(features)
        norm = self.normalize if normalize is None else normalize
        return F.pool(hidden, mode="special", last_k=8, normalize=norm, **layout)

    def save(self, path: str, state_dict: Optional[dict] = None) -> None:
        """As ``BiEncoder.save``: the model (or adapter), the tokenizer and fastrank's settings."""
        os.makedirs(path, exist_ok=True)
        self.model.save_pretrained(path, state_dict=state_dict)  # a PEFT model writes its adapter
        self.tokenizer.save_pretrained(path)
        with open(os.path.join(path, FASTRANK_CONFIG), "w") as f:
            json.dump(
                dict(
                    self._common_config(),
                    kind=self.kind,
                    query_max_len=self.query_max_len,
                    passage_max_len=self.passage_max_len,
                ),
                f,
                indent=2,
            )

    @classmethod
    def from_pretrained(cls, path: str, *, dtype="auto", **overrides) -> "LlaraEncoder":
        from transformers import AutoModelForCausalLM, AutoTokenizer

        settings = read_embedder_settings(path)
        settings.pop("kind", None)
        settings.update({k: v for k, v in overrides.items() if v is not None})
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        return cls(model, AutoTokenizer.from_pretrained(path), **settings)
