"""``Reranker``: scores and ranks (query, passage) pairs with a causal-LM reranker."""

from __future__ import annotations

import json
import warnings
from typing import Iterator, List, Optional, Sequence, Union

import torch

from fastrank.data.batching import pad_token_id_of
from fastrank.data.packing import stream_tokens
from fastrank.data.templates import shared_prefix_lengths
from fastrank.engine import enable_packing
from fastrank.engine.compile import maybe_compile
from fastrank.engine.graphs import attach_graphs
from fastrank.inference.batches import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_MAX_TOKENS,
    PlannedBatch,
    plan_batches,
    run_planned,
    sort_window,
    write_rows,
)
from fastrank.models.cross_encoder import CrossEncoderScorer
from fastrank.models.loading import check_model_source, model_skeleton, resolve_device, resolve_dtype
from fastrank.models.reranker import CausalLMScorer, unwrap_model
from fastrank.presets import Preset, detect_preset, get_preset, is_cross_encoder_config
from fastrank.utils import positive_int


def document_texts(documents) -> List[str]:
    """The text of each document (a string or a ``{"text": ...}`` dict), checked: a non-empty list."""
    if isinstance(documents, str):
        raise ValueError(
            "documents: got one string; pass a list of documents (e.g. [text]), not a string, "
            "whose characters would each be ranked"
        )
    if not isinstance(documents, list) or not documents:
        raise ValueError("documents: must be a non-empty list; give at least one document to rank")
    texts = []
    for i, doc in enumerate(documents):
        text = doc.get("text") if isinstance(doc, dict) else doc
        if not isinstance(text, str):
            raise ValueError(f"documents[{i}]: expected a string or a {{'text': ...}} dict, got {type(doc).__name__}")
        texts.append(text)
    return texts


def parse_rerank_line(text: str):
    """One line of ``fastrank rerank``'s JSONL (``{"query", "document"}`` or ``{"query", "documents": [...]}``) ->
    ``(record, [(query, passage), ...], kind)`` with ``kind`` ``"pair"`` or ``"documents"``; a ValueError says what
    is wrong with a bad line."""
    if not text.strip():
        raise ValueError("empty line: nothing to score (remove it, or put a JSON object on it)")
    try:
        record = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
    query = record.get("query")
    if not isinstance(query, str):
        raise ValueError("'query' must be a string")
    if "documents" in record:
        return record, [(query, t) for t in document_texts(record["documents"])], "documents"
    if isinstance(record.get("document"), str):
        return record, [(query, record["document"])], "pair"
    raise ValueError("needs 'documents' (a list) or 'document' (a string) next to 'query'")


class Reranker:
    """A causal-LM reranker that scores pairs through fastrank's score head.

    Pairs are tokenised with the preset's layout, cut into batches under a token budget, scored (the
    backbone once per batch, then only the preset's vocabulary rows at each pair's last real token: no
    full-vocabulary logits), and returned in input order.

    Packed (the default where the model supports it: Qwen2/3, Llama, Mistral, Gemma, Gemma 2): a batch is
    one stream of real tokens, no padding, and the pairs of one query share their prefix (the preset's
    template head and the query, ``preset.template.shared_prefix``), computed once per batch; each
    document attends to it and continues at the position after it, so scores equal the unshared ones.
    ``packed=False`` runs the padded path (length-sorted batches with an attention mask);
    ``share_prefix=False`` packs without sharing. Other models run padded, with a warning that says why.

    Cross-encoders (the ``"cross-encoder"`` presets): a sequence-classification encoder (BERT, XLM-R, ...)
    scored by its own classification head on each pair's first token (``fastrank.models.cross_encoder``),
    packed for BERT and XLM-R; no prefix is ever shared (the query attends to the passage).
    """

    def __init__(self, model, tokenizer, preset: Union[str, Preset], *, packed: bool = True, share_prefix: bool = True):
        self.preset = get_preset(preset)
        self.tokenizer = tokenizer
        self.model = model.eval()
        self.pad_token_id = pad_token_id_of(tokenizer)
        if self.is_cross_encoder:
            self.scorer = CrossEncoderScorer(model)
        else:
            self.scorer = CausalLMScorer(model, self.preset.convention, self.preset.convention.token_ids(tokenizer))
        self.packed = bool(packed) and enable_packing(model)
        self.share_prefix = bool(share_prefix)
        if self.packed and not self.is_cross_encoder:
            # Inference batches on CUDA replay CUDA graphs per token bucket (FASTRANK_CUDA_GRAPHS=0: off).
            attach_graphs(self.scorer.backbone)
        maybe_compile(model)  # the layers through torch.compile when FASTRANK_COMPILE asks (off by default)

    @classmethod
    def from_pretrained(
        cls,
        path_or_model,
        preset: Union[str, Preset, None] = None,
        *,
        tokenizer=None,
        dtype="auto",
        device=None,
        devices: Optional[Sequence[str]] = None,
        attn_implementation=None,
        packed: bool = True,
        share_prefix: bool = True,
        **model_kwargs,
    ):
        """Load a reranker from a local path or hub name, or wrap an already loaded causal LM (or, for a
        cross-encoder, sequence-classification model).

        Args:
            path_or_model: a path/name for ``AutoModelForCausalLM.from_pretrained`` (cross-encoder presets:
                ``AutoModelForSequenceClassification``), or a model instance (PEFT-wrapped models work; their
                adapters stay active).
            preset: a name from ``fastrank.presets()`` or a ``fastrank.Preset``. None picks it from the
                checkpoint: the preset a fastrank training run saved in the folder, else ``"cross-encoder"``
                for a folder whose config is an encoder's ``*ForSequenceClassification``, else a public
                reranker recognised by name (Qwen3-Reranker, mxbai-rerank-*-v2, lb-reranker,
                bge-reranker-v2-gemma, bge-reranker-base/large/v2-m3); any other checkpoint needs it given
                (a ``ValueError`` says so).
            tokenizer: the tokenizer (loaded from the path, or from ``model.name_or_path``, when omitted).
            dtype: ``"auto"`` (the checkpoint's), or e.g. ``"bfloat16"``, ``torch.float16``.
            device: where to run (default: CUDA when available, else CPU). ``"meta"`` loads no weights: the
                reranker tokenizes and plans batches but cannot score (what a device pool's parent holds).
            devices: several devices, e.g. ``["cuda:0", "cuda:1"]`` (one may repeat: ``["cpu", "cpu"]``): a
                ``RerankerPool`` with one worker process per device, each loading the model once, that
                scores as this class does (same methods, same scores to the bit), the batches shared out
                among the devices as they free up. Needs a path or hub name; call ``close()`` (or use it in a
                ``with`` block) to stop the workers.
            attn_implementation: passed to ``from_pretrained`` (``"sdpa"``, ``"flash_attention_2"``, ...);
                with packing on, this is what the model's padded calls use.
            packed, share_prefix: packed batches and shared query prefixes (see the class); True by default.
            cutoff_layers: for the layer-wise preset (``"bge-reranker-v2-minicpm-layerwise"``, also detected from a
                ``LayerWiseMiniCPMForCausalLM`` folder) only, which is loaded as a
                ``fastrank.inference.layerwise.LayerwiseReranker``: the layers to score at (an int or a list; default
                the last layer); the decoder runs only to the deepest.
        """
        from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

        from fastrank.inference.layerwise import LayerwiseReranker, layerwise_preset

        if cls is Reranker and layerwise_preset(path_or_model, preset) is not None:
            # FlagEmbedding's layer-wise reranker is its own model (MiniCPM with per-layer heads): its class
            # runs the decoder only to the deepest of cutoff_layers= (a keyword of model_kwargs here).
            return LayerwiseReranker.from_pretrained(
                path_or_model,
                preset,
                tokenizer=tokenizer,
                dtype=dtype,
                device=device,
                devices=devices,
                attn_implementation=attn_implementation,
                packed=packed,
                share_prefix=share_prefix,
                **model_kwargs,
            )
        if "cutoff_layers" in model_kwargs:
            raise ValueError(
                "cutoff_layers: only the layer-wise reranker (preset 'bge-reranker-v2-minicpm-layerwise') has cutoff "
                "layers; this checkpoint is scored at its last layer"
            )
        if devices is not None:
            from fastrank.inference.pool import RerankerPool

            return RerankerPool.start(
                path_or_model,
                preset,
                devices,
                device=device,
                tokenizer=tokenizer,
                dtype=dtype,
                attn_implementation=attn_implementation,
                packed=packed,
                share_prefix=share_prefix,
                **model_kwargs,
            )
        dtype = resolve_dtype(dtype)
        device = resolve_device(device)
        if isinstance(path_or_model, str):
            source = check_model_source(path_or_model)
        elif isinstance(path_or_model, torch.nn.Module):
            source = getattr(unwrap_model(path_or_model), "name_or_path", None)
        else:
            raise ValueError(
                f"path_or_model: expected a path, a hub name or a model, got {type(path_or_model).__name__}"
            )
        # The preset before any weights: an unknown checkpoint fails at once, not after loading it.
        if preset is None and isinstance(path_or_model, torch.nn.Module):
            inner = unwrap_model(path_or_model)
            if is_cross_encoder_config({**inner.config.to_dict(), "architectures": [type(inner).__name__]}):
                preset = "cross-encoder"
        preset = get_preset(preset) if preset is not None else detect_preset(source)
        if isinstance(path_or_model, str):
            kwargs = dict(model_kwargs)
            if attn_implementation is not None:
                kwargs["attn_implementation"] = attn_implementation
            # A cross-encoder is a sequence-classification model; every other preset reads a causal LM's head.
            cross = preset.convention.kind == "classifier"
            loader = AutoModelForSequenceClassification if cross else AutoModelForCausalLM
            if device.type == "meta":
                model = model_skeleton(loader, source, dtype=dtype, **kwargs)
            else:
                model = loader.from_pretrained(source, dtype=dtype, **kwargs)
        else:
            model = path_or_model
            if dtype not in (None, "auto"):
                model = model.to(dtype)
            if attn_implementation is not None:
                unwrap_model(model).set_attn_implementation(attn_implementation)
        if tokenizer is None:
            if not source:
                raise ValueError("tokenizer: none given and the model has no name_or_path to load one from")
            tokenizer = AutoTokenizer.from_pretrained(source)
        return cls(model.to(device), tokenizer, preset, packed=packed, share_prefix=share_prefix)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def is_cross_encoder(self) -> bool:
        """Whether the preset scores a sequence-classification model (``"cross-encoder"``) rather than an LM head."""
        return self.preset.convention.kind == "classifier"

    def tokenize(self, pairs: Sequence, max_length: Optional[int] = None):
        """Token ids of each pair under the preset's layout (``TokenizedPair`` list)."""
        positive_int("max_length", max_length, none_ok=True)
        return self.preset.template.tokenize(
            self.tokenizer, pairs, self.preset.max_length if max_length is None else max_length
        )

    def computed_tokens(self, pairs: Sequence, tokenized: Sequence) -> int:
        """How many tokens the model computes for ``pairs`` (with their ``tokenize(pairs)`` output): packed with
        shared prefixes, each distinct query prefix once plus the rest of every pair; otherwise every token. What
        ``score``'s ``max_tokens`` counts when packed, and what ``fastrank serve`` batches and queues by."""
        heads = None
        if self.packed and self.share_prefix:
            template, limit = self.preset.template, self.preset.max_length
            heads = shared_prefix_lengths(template, self.tokenizer, pairs, tokenized, limit)
        return stream_tokens([e.input_ids for e in tokenized], heads)

    @torch.inference_mode()
    def score(
        self,
        pairs: Sequence,
        *,
        batch_size: int = DEFAULT_BATCH_SIZE,
        max_length: Optional[int] = None,
        max_tokens: int = DEFAULT_MAX_TOKENS,
        normalize: bool = False,
        show_progress: Optional[bool] = None,
        tokenized: Optional[Sequence] = None,
    ) -> List[float]:
        """One score per (query, passage) pair, in input order.

        Args:
            pairs: a list of ``(query, passage)`` pairs (a single pair is accepted too).
            batch_size: at most this many pairs per forward pass.
            max_length: the preset's token budget per pair (default: the preset's own); longer pairs
                are truncated by the preset's rule (passage first, never the template) with a warning.
            max_tokens: at most this many tokens per forward pass (real tokens when packed, a shared prefix
                counted once; padded tokens otherwise).
            normalize: map scores to [0, 1] as the convention defines (sigmoid for logit conventions).
            show_progress: a progress bar over pairs; default on for more than ``4 * batch_size`` pairs.
            tokenized: the pairs' ``tokenize(pairs, max_length)`` when the caller already has it (the server
                counts tokens with it), so they are not tokenised twice.
        """
        if isinstance(pairs, tuple) and len(pairs) == 2 and all(isinstance(x, str) for x in pairs):
            pairs = [pairs]
        if isinstance(pairs, (str, bytes)) or not isinstance(pairs, Sequence):
            raise ValueError(f"pairs: expected a list of (query, passage) pairs, got {type(pairs).__name__}")
        positive_int("batch_size", batch_size)
        positive_int("max_tokens", max_tokens)
        positive_int("max_length", max_length, none_ok=True)
        pairs = list(pairs)
        if tokenized is not None and len(tokenized) != len(pairs):
            raise ValueError(f"tokenized: {len(tokenized)} encodings for {len(pairs)} pairs; give one per pair")
        if not pairs:
            return []
        scores = torch.empty(len(pairs), dtype=torch.float32, device=self._results_device)
        show = show_progress if show_progress is not None else len(pairs) > 4 * batch_size
        truncated = [0]
        from tqdm.auto import tqdm

        with tqdm(total=len(pairs), unit="pair", desc="scoring", disable=not show) as bar:
            batches = self._plan(pairs, batch_size, max_length, max_tokens, truncated, tokenized)
            for batch, values in self._execute(batches, normalize):
                write_rows(scores, batch.indices, values)
                bar.update(len(batch.indices))
        if truncated[0]:
            warnings.warn(
                f"{truncated[0]} of {len(pairs)} pairs exceeded max_length={max_length or self.preset.max_length} "
                f"tokens and were truncated by the {self.preset.name!r} preset's rule",
                stacklevel=3,  # past the inference_mode wrapper, to the caller
            )
        return scores.cpu().tolist()

    @property
    def _plan_device(self) -> torch.device:
        """The device the batches are planned for (window size, padded widths)."""
        return self.device

    @property
    def _results_device(self) -> torch.device:
        return self.device

    def _plan(self, pairs, batch_size, max_length, max_tokens, truncated, tokenized=None) -> Iterator[PlannedBatch]:
        """The batches of ``pairs``, window by window: each window is tokenised (or taken from ``tokenized``),
        split at each pair's shared prefix (packed) and cut into batches. A generator, so on CUDA the next
        window is tokenised while the device runs this one (nothing here waits for the device).
        ``truncated[0]`` counts the pairs cut to ``max_length``."""
        chunk = sort_window(batch_size, self._plan_device)
        limit = self.preset.max_length if max_length is None else max_length
        for start in range(0, len(pairs), chunk):
            window = pairs[start : start + chunk]
            encoded = self.tokenize(window, max_length) if tokenized is None else tokenized[start : start + chunk]
            truncated[0] += sum(e.truncated for e in encoded)
            heads = None
            if self.packed:
                heads = (
                    shared_prefix_lengths(self.preset.template, self.tokenizer, window, encoded, limit)
                    if self.share_prefix
                    else [None] * len(encoded)
                )
            sequences = [e.input_ids for e in encoded]
            types = [e.segment_a for e in encoded] if any(e.segment_a is not None for e in encoded) else None
            if types is not None:  # a cross-encoder's token types (segment A's length; None: all type 0)
                types = [len(seq) if a is None else a for seq, a in zip(sequences, types)]
            yield from plan_batches(sequences, start, batch_size, max_tokens, self._plan_device, heads, types)

    def _execute(self, batches, normalize: bool):
        """``(batch, scores)`` for each planned batch; here, one after the other on this reranker's device."""
        for batch in batches:
            yield batch, self._run(batch, normalize)

    def _run(self, batch: PlannedBatch, normalize: bool) -> torch.Tensor:
        if self.device.type == "meta":
            raise ValueError(
                "device: this reranker was loaded with device='meta' (no weights): it tokenizes and plans "
                "batches but cannot score; load it on 'cpu' or 'cuda'"
            )

        # A cross-encoder's token types travel with the batch (segment A's length per pair).
        types = {} if batch.segment_a is None else {"segment_a": batch.segment_a}

        def padded(b):
            return self.scorer(
                input_ids=b.input_ids,
                attention_mask=b.attention_mask,
                position_ids=b.position_ids,
                normalize=normalize,
                **types,
            )

        return run_planned(
            batch,
            self.model,
            self.device,
            lambda b: self.scorer.packed_scores(b, normalize=normalize, **types),
            padded,
            self.pad_token_id,
            getattr(self.tokenizer, "padding_side", "right"),
        )

    @torch.inference_mode()
    def _run_remote(self, batch: PlannedBatch, normalize: bool):
        """What a pool worker runs: one planned batch's scores, as a host array."""
        return self._run(batch, normalize).float().cpu().numpy()

    def rank(
        self, query: str, documents: Sequence, *, top_k: Optional[int] = None, normalize: bool = False, **score_kwargs
    ) -> List[dict]:
        """Documents for ``query``, best first: ``[{"index", "relevance_score", "document"}, ...]``.

        ``documents`` are strings or ``{"text": ...}`` dicts (returned as given); ``top_k`` keeps the best k.
        """
        if not isinstance(query, str):
            raise ValueError(f"query: must be a string, got {type(query).__name__}")
        documents = documents if isinstance(documents, str) else list(documents)
        texts = document_texts(documents)
        positive_int("top_k", top_k, none_ok=True)
        scores = self.score([(query, t) for t in texts], normalize=normalize, **score_kwargs)
        return [{"index": i, "relevance_score": scores[i], "document": documents[i]} for i in best_first(scores, top_k)]

    def compute_score(
        self,
        sentence_pairs,
        *,
        batch_size: int = DEFAULT_BATCH_SIZE,
        max_length: Optional[int] = None,
        normalize: bool = False,
        **kwargs,
    ):
        """FlagEmbedding's ``compute_score``: the list of scores of ``sentence_pairs`` (a list of ``[query,
        passage]``, or one such pair, which gives a one-element list as FlagEmbedding 1.4 does); ``normalize=True``
        applies the preset's mapping to [0, 1] (a sigmoid for the logit conventions, as FlagEmbedding does).
        Other keywords go to ``score``."""
        single = (
            isinstance(sentence_pairs, (list, tuple))
            and len(sentence_pairs) == 2
            and all(isinstance(x, str) for x in sentence_pairs)
        )
        pairs = [tuple(sentence_pairs)] if single else sentence_pairs
        return self.score(pairs, batch_size=batch_size, max_length=max_length, normalize=normalize, **kwargs)


def best_first(scores: Sequence[float], top_k: Optional[int] = None) -> List[int]:
    """Indices of ``scores`` from the highest score down (ties keep input order), the first ``top_k`` of them."""
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    return order if top_k is None else order[:top_k]
