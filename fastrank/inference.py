"""High-level inference: ``Reranker`` scores and ranks (query, passage) pairs with a causal-LM reranker."""

from __future__ import annotations

import warnings
from typing import List, Optional, Sequence, Union

import torch

from fastrank.data.batching import collate, pad_token_id_of, token_budget_batches
from fastrank.data.packing import pack_planned, plan_packed_batches, position_offset, shared_groups
from fastrank.data.templates import shared_prefix_lengths
from fastrank.engine import enable_packing, sliding_window, warn_once
from fastrank.models.loading import check_model_source, resolve_device, resolve_dtype
from fastrank.models.reranker import CausalLMScorer, unwrap_model
from fastrank.presets import Preset, detect_preset, get_preset
from fastrank.utils import positive_int, value_checks

DEFAULT_BATCH_SIZE = 64
DEFAULT_MAX_TOKENS = 32768  # tokens per batch (padded, or real when packed): 64 pairs of 512, or 4 of 8192


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


def sort_window(batch_size: int, device: torch.device) -> int:
    """How many inputs are tokenised, sorted by length and batched together.

    On CUDA the loop never waits for the device, so the next window is tokenised while the device runs
    this one; small windows keep that overlap from the start (on an H100, 1024 beat 256 by packing
    better). A CPU runs each batch as it is launched, so there is nothing to overlap and a larger window
    only packs better: on the encode benchmark's texts, padding is 12.6% of the tokens with windows of
    1024 and 3.7% with windows of 4096.
    """
    return max(16 * batch_size, 1024 if device.type == "cuda" else 4096)


def _check_nonempty(lengths, offset: int) -> None:
    empty = [i for i, n in enumerate(lengths) if n == 0]
    if empty:
        raise ValueError(f"sequences: {len(empty)} are empty (first at index {offset + empty[0]})")


def _write_rows(out: torch.Tensor, idx, offset: int, values: torch.Tensor) -> None:
    """``out[offset + idx] = values`` with the row indices sent up through pinned memory (no host sync)."""
    rows = torch.tensor(idx) + offset
    out[rows.pin_memory().to(out.device, non_blocking=True) if out.device.type == "cuda" else rows] = values.float()


def run_batches(sequences, offset, out, batch_size, max_tokens, pad_id, padding_side, bar, compute):
    """Launch length-sorted, token-budget batches of ``sequences`` and write ``compute(batch)`` row by row
    into ``out[offset:]`` on the device.

    No host sync: results stay on the device, batches go up through pinned memory, and score_head's and
    pool's value checks are off because these batches are built here (no empty rows).
    """
    lengths = [len(s) for s in sequences]
    _check_nonempty(lengths, offset)
    device = out.device
    # Widths rounded up to a multiple of 8 keep GPU matmul and attention tiles aligned; on a CPU those
    # columns are plain extra work (17% of MiniLM's encode time on texts of ~54 tokens), so none there.
    multiple = 8 if device.type == "cuda" else 1
    with value_checks(False):
        for idx in token_budget_batches(lengths, batch_size, max_tokens, multiple):
            batch = collate([sequences[i] for i in idx], pad_id, padding_side, multiple, device=device, indices=idx)
            _write_rows(out, idx, offset, compute(batch))
            bar.update(len(idx))


def run_packed_batches(
    sequences, prefix_lengths, offset, out, batch_size, max_tokens, model, bar, compute, padded_compute, pad_id
):
    """Launch packed batches of ``sequences`` (no pad tokens; a shared prefix, where ``prefix_lengths`` gives
    one, in the stream once per batch) under a budget of real tokens, writing ``compute(packed_batch)`` into
    ``out[offset:]`` in input order. A batch whose longest context exceeds the model's sliding window runs
    padded through ``padded_compute(batch)`` instead, with a one-time warning."""
    positive_int("batch_size", batch_size)
    positive_int("max_tokens", max_tokens)
    items, keys, head_lengths = shared_groups(sequences, prefix_lengths)
    lengths = [len(x) for x in items]
    _check_nonempty(lengths, offset)
    device = out.device
    window = sliding_window(model)
    start = position_offset(model)
    with value_checks(False):
        for idx in plan_packed_batches(lengths, keys, head_lengths, max_tokens, batch_size):
            batch = pack_planned(items, keys, idx, start, device)
            if window is not None and batch.segments.max_context > window:
                warn_once(
                    "sliding-window",
                    f"fastrank: a batch has sequences longer than the model's sliding window ({window} tokens), "
                    "which the packed engine does not implement; those batches run padded",
                )
                result = padded_compute(
                    collate([sequences[i] for i in idx], pad_id, "left", 8 if device.type == "cuda" else 1, device)
                )
            else:
                result = compute(batch)
            _write_rows(out, idx, offset, result)
            bar.update(len(idx))


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
    """

    def __init__(self, model, tokenizer, preset: Union[str, Preset], *, packed: bool = True, share_prefix: bool = True):
        self.preset = get_preset(preset)
        self.tokenizer = tokenizer
        self.model = model.eval()
        self.pad_token_id = pad_token_id_of(tokenizer)
        self.scorer = CausalLMScorer(model, self.preset.convention, self.preset.convention.token_ids(tokenizer))
        self.packed = bool(packed) and enable_packing(model)
        self.share_prefix = bool(share_prefix)

    @classmethod
    def from_pretrained(
        cls,
        path_or_model,
        preset: Union[str, Preset, None] = None,
        *,
        tokenizer=None,
        dtype="auto",
        device=None,
        attn_implementation=None,
        packed: bool = True,
        share_prefix: bool = True,
        **model_kwargs,
    ):
        """Load a reranker from a local path or hub name, or wrap an already loaded causal LM.

        Args:
            path_or_model: a path/name for ``AutoModelForCausalLM.from_pretrained``, or a model instance
                (PEFT-wrapped models work; their adapters stay active).
            preset: a name from ``fastrank.presets()`` or a ``fastrank.Preset``. None picks it from the
                checkpoint: the preset a fastrank training run saved in the folder, else a public reranker
                recognised by name (Qwen3-Reranker, mxbai-rerank-*-v2, lb-reranker, bge-reranker-v2-gemma);
                any other checkpoint needs it given (a ``ValueError`` says so).
            tokenizer: the tokenizer (loaded from the path, or from ``model.name_or_path``, when omitted).
            dtype: ``"auto"`` (the checkpoint's), or e.g. ``"bfloat16"``, ``torch.float16``.
            device: where to run (default: CUDA when available, else CPU).
            attn_implementation: passed to ``from_pretrained`` (``"sdpa"``, ``"flash_attention_2"``, ...);
                with packing on, this is what the model's padded calls use.
            packed, share_prefix: packed batches and shared query prefixes (see the class); True by default.
        """
        from transformers import AutoModelForCausalLM, AutoTokenizer

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
        preset = get_preset(preset) if preset is not None else detect_preset(source)
        if isinstance(path_or_model, str):
            kwargs = dict(model_kwargs)
            if attn_implementation is not None:
                kwargs["attn_implementation"] = attn_implementation
            model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **kwargs)
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

    def tokenize(self, pairs: Sequence, max_length: Optional[int] = None):
        """Token ids of each pair under the preset's layout (``TokenizedPair`` list)."""
        positive_int("max_length", max_length, none_ok=True)
        return self.preset.template.tokenize(
            self.tokenizer, pairs, self.preset.max_length if max_length is None else max_length
        )

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
        """
        if isinstance(pairs, tuple) and len(pairs) == 2 and all(isinstance(x, str) for x in pairs):
            pairs = [pairs]
        if isinstance(pairs, (str, bytes)) or not isinstance(pairs, Sequence):
            raise ValueError(f"pairs: expected a list of (query, passage) pairs, got {type(pairs).__name__}")
        positive_int("batch_size", batch_size)
        positive_int("max_tokens", max_tokens)
        positive_int("max_length", max_length, none_ok=True)
        pairs = list(pairs)
        if not pairs:
            return []
        scores = torch.empty(len(pairs), dtype=torch.float32, device=self.device)
        # Tokenise a chunk while the device scores the previous one: the loop below never waits for the
        # device, so tokenisation (host) and the forward passes (device) overlap. Within a chunk, pairs
        # are sorted by length and batched under the token budget.
        chunk = sort_window(batch_size, self.device)
        show = show_progress if show_progress is not None else len(pairs) > 4 * batch_size
        n_cut = 0
        from tqdm.auto import tqdm

        with tqdm(total=len(pairs), unit="pair", desc="scoring", disable=not show) as bar:
            for start in range(0, len(pairs), chunk):
                window = pairs[start : start + chunk]
                encoded = self.tokenize(window, max_length)
                n_cut += sum(e.truncated for e in encoded)
                sequences = [e.input_ids for e in encoded]
                if self.packed:
                    limit = self.preset.max_length if max_length is None else max_length
                    heads = (
                        shared_prefix_lengths(self.preset.template, self.tokenizer, window, encoded, limit)
                        if self.share_prefix
                        else [None] * len(encoded)
                    )
                    self._enqueue_packed(sequences, heads, start, scores, batch_size, max_tokens, normalize, bar)
                else:
                    self._enqueue(sequences, start, scores, batch_size, max_tokens, normalize, bar)
        if n_cut:
            warnings.warn(
                f"{n_cut} of {len(pairs)} pairs exceeded max_length={max_length or self.preset.max_length} "
                f"tokens and were truncated by the {self.preset.name!r} preset's rule",
                stacklevel=3,  # past the inference_mode wrapper, to the caller
            )
        return scores.cpu().tolist()

    def _enqueue(self, sequences, offset, scores, batch_size, max_tokens, normalize, bar):
        side = getattr(self.tokenizer, "padding_side", "right")
        run_batches(
            sequences,
            offset,
            scores,
            batch_size,
            max_tokens,
            self.pad_token_id,
            side,
            bar,
            lambda b: self.scorer(
                input_ids=b.input_ids, attention_mask=b.attention_mask, position_ids=b.position_ids, normalize=normalize
            ),
        )

    def _enqueue_packed(self, sequences, heads, offset, scores, batch_size, max_tokens, normalize, bar):
        run_packed_batches(
            sequences,
            heads,
            offset,
            scores,
            batch_size,
            max_tokens,
            self.model,
            bar,
            lambda b: self.scorer.packed_scores(b, normalize=normalize),
            lambda b: self.scorer(
                input_ids=b.input_ids, attention_mask=b.attention_mask, position_ids=b.position_ids, normalize=normalize
            ),
            self.pad_token_id,
        )

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


class Embedder:
    """Encode texts with a ``BiEncoder`` (BGE, sentence-transformers models) or a ``LlaraEncoder``.

    Texts are tokenised, sorted by length within windows (``sort_window``: 1024 texts on CUDA, 4096 on a
    CPU), batched under a token budget, encoded (backbone once per batch, then the fused pool), and
    returned in input order; on CUDA the next window is tokenised while the device encodes the current one.
    Packed by default where the model supports it (BERT, XLM-R and the decoder families): a batch is one
    stream of real tokens with no padding; ``packed=False`` runs padded batches.
    """

    def __init__(self, encoder, *, packed: bool = True):
        from fastrank.models.embedder import BiEncoder, LlaraEncoder

        if not isinstance(encoder, (BiEncoder, LlaraEncoder)):
            raise ValueError(f"encoder: expected a fastrank BiEncoder or LlaraEncoder, got {type(encoder).__name__}")
        self.encoder = encoder.eval()
        self.tokenizer = encoder.tokenizer
        self.pad_token_id = pad_token_id_of(self.tokenizer)
        self.packed = bool(packed) and enable_packing(encoder.model)

    @classmethod
    def from_pretrained(
        cls,
        path_or_model,
        *,
        kind: str = "auto",
        tokenizer=None,
        pooling: Optional[str] = None,
        normalize: Optional[bool] = None,
        query_instruction: Optional[str] = None,
        passage_instruction: Optional[str] = None,
        max_length: Optional[int] = None,
        dtype="auto",
        device=None,
        attn_implementation=None,
        packed: bool = True,
    ) -> "Embedder":
        """Load an embedder from a folder (a sentence-transformers or fastrank folder, or any HF model), or
        wrap a loaded model.

        Args:
            path_or_model: a local path / hub name, or a model instance (``AutoModel`` or causal LM).
            kind: ``"bi"`` (pooled last hidden state), ``"llara"`` (LLARA's special-token mean) or ``"auto"``
                (the folder's fastrank settings, else ``"bi"``).
            pooling, normalize, query_instruction, passage_instruction, max_length: override what the folder
                says (sentence-transformers' pooling config, Normalize module, prompts and max_seq_length;
                defaults ``cls``, normalised, no instructions, 512).
            dtype, device, attn_implementation, packed: as for ``Reranker.from_pretrained``.
        """
        from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

        from fastrank.models.embedder import BiEncoder, LlaraEncoder, read_embedder_settings

        if kind not in ("auto", "bi", "llara"):
            raise ValueError(f"kind: must be 'auto', 'bi' or 'llara', got {kind!r}")
        positive_int("max_length", max_length, none_ok=True)
        dtype = resolve_dtype(dtype)
        device = resolve_device(device)
        if isinstance(path_or_model, str):
            path_or_model = check_model_source(path_or_model)
        settings = read_embedder_settings(path_or_model) if isinstance(path_or_model, str) else {}
        if kind == "auto":
            kind = settings.get("kind", "bi")
        settings.pop("kind", None)
        if isinstance(path_or_model, str):
            kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
            loader = AutoModelForCausalLM if kind == "llara" else AutoModel
            model = loader.from_pretrained(path_or_model, dtype=dtype, **kwargs)
            tokenizer = tokenizer or AutoTokenizer.from_pretrained(path_or_model)
        elif isinstance(path_or_model, torch.nn.Module):
            model = path_or_model if dtype in (None, "auto") else path_or_model.to(dtype)
            if tokenizer is None:
                source = getattr(unwrap_model(model), "name_or_path", None)
                if not source:
                    raise ValueError("tokenizer: none given and the model has no name_or_path to load one from")
                tokenizer = AutoTokenizer.from_pretrained(source)
        else:
            raise ValueError(
                f"path_or_model: expected a path, a hub name or a model, got {type(path_or_model).__name__}"
            )
        if kind == "llara":
            keep = {
                k: settings[k]
                for k in ("normalize", "temperature", "query_max_len", "passage_max_len")
                if k in settings
            }
            if normalize is not None:
                keep["normalize"] = normalize
            if max_length is not None:
                keep["query_max_len"] = keep["passage_max_len"] = max_length
            encoder = LlaraEncoder(model, tokenizer, **keep)
        else:
            overrides = dict(
                pooling=pooling,
                normalize=normalize,
                query_instruction=query_instruction,
                passage_instruction=passage_instruction,
                max_length=max_length,
            )
            settings.update({k: v for k, v in overrides.items() if v is not None})
            if not settings.get("normalize", True):
                settings["temperature"] = 1.0
            encoder = BiEncoder(model, tokenizer, **settings)
        return cls(encoder.to(device), packed=packed)

    @property
    def device(self) -> torch.device:
        return next(self.encoder.parameters()).device

    @property
    def dim(self) -> int:
        return unwrap_model(self.encoder.model).config.hidden_size

    @torch.inference_mode()
    def encode(
        self,
        texts,
        *,
        kind: str = "passage",
        batch_size: int = DEFAULT_BATCH_SIZE,
        max_length: Optional[int] = None,
        max_tokens: int = DEFAULT_MAX_TOKENS,
        normalize: Optional[bool] = None,
        prompt: Optional[str] = None,
        convert_to: str = "numpy",
        show_progress: Optional[bool] = None,
        normalize_embeddings: Optional[bool] = None,
        convert_to_tensor: Optional[bool] = None,
        convert_to_numpy: Optional[bool] = None,
        show_progress_bar: Optional[bool] = None,
    ):
        """Embeddings of ``texts`` in input order: ``[N, H]`` fp32 (a single string gives ``[H]``).

        Args:
            texts: a string or a list of strings.
            kind: ``"query"`` or ``"passage"`` (LLARA uses a different suffix for each).
            batch_size / max_tokens: at most this many texts and tokens (real when packed, else padded) per
                forward pass.
            max_length: tokens per text (default: the encoder's); longer texts are truncated, as
                sentence-transformers does.
            normalize: override the encoder's L2 normalisation.
            prompt: a string prepended to every text (an instruction).
            convert_to: ``"numpy"`` (an ``np.ndarray`` on the host) or ``"torch"`` (a tensor on the device).
            show_progress: a progress bar; default on for more than ``4 * batch_size`` texts.
            normalize_embeddings, convert_to_tensor, convert_to_numpy, show_progress_bar:
                sentence-transformers' names for ``normalize``, ``convert_to="torch"``, ``convert_to="numpy"``
                and ``show_progress``, so code written for ``SentenceTransformer.encode`` runs unchanged.
        """
        normalize = _same_option("normalize", normalize, "normalize_embeddings", normalize_embeddings)
        show_progress = _same_option("show_progress", show_progress, "show_progress_bar", show_progress_bar)
        if convert_to_tensor:
            convert_to = "torch"
        elif convert_to_numpy is False and convert_to_tensor is None:
            convert_to = "torch"
        if kind not in ("query", "passage"):
            raise ValueError(f"kind: must be 'query' or 'passage', got {kind!r}")
        positive_int("max_length", max_length, none_ok=True)
        single = isinstance(texts, str)
        if not single and (texts is None or isinstance(texts, (bytes, dict)) or not hasattr(texts, "__iter__")):
            raise ValueError(f"texts: expected a string or a list of strings, got {type(texts).__name__}")
        texts = [texts] if single else list(texts)
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise ValueError(f"texts[{i}]: expected a string, got {type(t).__name__}")
        if convert_to not in ("numpy", "torch"):
            raise ValueError(f"convert_to: must be 'numpy' or 'torch', got {convert_to!r}")
        if prompt:
            texts = [prompt + t for t in texts]
        out = torch.empty((len(texts), self.dim), dtype=torch.float32, device=self.device)
        window = sort_window(batch_size, self.device)
        show = show_progress if show_progress is not None else len(texts) > 4 * batch_size
        side = getattr(self.tokenizer, "padding_side", "right")
        from tqdm.auto import tqdm

        def compute(batch):
            return self.encoder.encode(
                {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}, normalize
            )

        with tqdm(total=len(texts), unit="text", desc="encoding", disable=not show) as bar:
            for start in range(0, len(texts), window):
                sequences = self.encoder.tokenize(texts[start : start + window], kind, max_length)
                if self.packed:
                    run_packed_batches(
                        sequences,
                        [None] * len(sequences),
                        start,
                        out,
                        batch_size,
                        max_tokens,
                        self.encoder.model,
                        bar,
                        lambda b: self.encoder.encode(b, normalize),
                        compute,
                        self.pad_token_id,
                    )
                else:
                    run_batches(sequences, start, out, batch_size, max_tokens, self.pad_token_id, side, bar, compute)
        if single:
            out = out[0]
        return out.cpu().numpy() if convert_to == "numpy" else out

    def similarity(self, a, b) -> torch.Tensor:
        """sentence-transformers' ``similarity``: ``[N, M]`` fp32 similarities between two sets of embeddings
        (arrays or tensors, ``[N, H]`` and ``[M, H]``, or single ``[H]`` vectors): the one this embedder is
        trained with, cosine when it L2-normalises, else the inner product."""
        a, b = (torch.as_tensor(x, dtype=torch.float32) for x in (a, b))
        a, b = (x[None] if x.dim() == 1 else x for x in (a, b))
        if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1]:
            raise ValueError(f"a, b: expected [N, H] and [M, H] embeddings, got {list(a.shape)} and {list(b.shape)}")
        if self.encoder.normalize:
            a, b = torch.nn.functional.normalize(a, dim=-1), torch.nn.functional.normalize(b.to(a.device), dim=-1)
        return a @ b.to(a.device).T

    def encode_queries(self, queries, **kwargs):
        """``encode(kind="query")`` with the encoder's query instruction prepended (unless ``prompt`` is given)."""
        kwargs.setdefault("prompt", self.encoder.instruction("query"))
        return self.encode(queries, kind="query", **kwargs)

    def encode_corpus(self, corpus, **kwargs):
        """``encode(kind="passage")`` with the encoder's passage instruction prepended (unless ``prompt`` is given)."""
        kwargs.setdefault("prompt", self.encoder.instruction("passage"))
        return self.encode(corpus, kind="passage", **kwargs)


def _same_option(name: str, value, alias: str, alias_value):
    """One option given under fastrank's name or its sentence-transformers alias (not both, differently)."""
    if alias_value is None:
        return value
    if value is not None and value != alias_value:
        raise ValueError(f"{name}, {alias}: two names for one option, given different values; give one")
    return alias_value
