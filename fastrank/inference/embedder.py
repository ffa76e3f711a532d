"""``Embedder``: encodes texts with a bi-encoder or LLARA through fastrank's fused pooling."""

from __future__ import annotations

from typing import Iterator, Optional, Sequence

import torch

from fastrank.data.batching import pad_token_id_of
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
from fastrank.models.loading import check_model_source, model_skeleton, resolve_device, resolve_dtype
from fastrank.models.reranker import unwrap_model
from fastrank.utils import positive_int


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
        if self.packed:
            attach_graphs(encoder.backbone)  # CUDA graphs per token bucket on CUDA (FASTRANK_CUDA_GRAPHS=0: off)
        maybe_compile(encoder.model)  # the layers through torch.compile when FASTRANK_COMPILE asks (off by default)

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
        devices: Optional[Sequence[str]] = None,
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
            dtype, device, devices, attn_implementation, packed: as for ``Reranker.from_pretrained``
                (``devices`` gives an ``EmbedderPool``, one worker process per device).
        """
        from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

        from fastrank.models.embedder import BiEncoder, LlaraEncoder, read_embedder_settings

        if devices is not None:
            from fastrank.inference.pool import EmbedderPool

            return EmbedderPool.start(
                path_or_model,
                devices,
                device=device,
                kind=kind,
                tokenizer=tokenizer,
                pooling=pooling,
                normalize=normalize,
                query_instruction=query_instruction,
                passage_instruction=passage_instruction,
                max_length=max_length,
                dtype=dtype,
                attn_implementation=attn_implementation,
                packed=packed,
            )

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
            if device.type == "meta":
                model = model_skeleton(loader, path_or_model, dtype=dtype, **kwargs)
            else:
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
        tokenized: Optional[Sequence[Sequence[int]]] = None,
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
            tokenized: the texts' token ids as ``encoder.tokenize(texts, kind, max_length)`` gives them, when the
                caller already has them (the server counts tokens with them), so they are not tokenised twice.
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
        if tokenized is not None and (prompt or len(tokenized) != len(texts)):
            raise ValueError(
                f"tokenized: give one token-id list per text ({len(tokenized)} for {len(texts)}), and no prompt"
            )
        if prompt:
            texts = [prompt + t for t in texts]
        out = torch.empty((len(texts), self.dim), dtype=torch.float32, device=self._results_device)
        show = show_progress if show_progress is not None else len(texts) > 4 * batch_size
        from tqdm.auto import tqdm

        with tqdm(total=len(texts), unit="text", desc="encoding", disable=not show) as bar:
            batches = self._plan(texts, kind, batch_size, max_length, max_tokens, tokenized)
            for batch, values in self._execute(batches, normalize):
                write_rows(out, batch.indices, values)
                bar.update(len(batch.indices))
        if single:
            out = out[0]
        return out.cpu().numpy() if convert_to == "numpy" else out

    @property
    def _plan_device(self) -> torch.device:
        """The device the batches are planned for (window size, padded widths)."""
        return self.device

    @property
    def _results_device(self) -> torch.device:
        return self.device

    def _plan(self, texts, kind, batch_size, max_length, max_tokens, tokenized=None) -> Iterator[PlannedBatch]:
        """The batches of ``texts``, window by window (tokenised, sorted by length, cut under the budget); a
        generator, so on CUDA the next window is tokenised while the device encodes this one."""
        window = sort_window(batch_size, self._plan_device)
        for start in range(0, len(texts), window):
            if tokenized is None:
                sequences = self.encoder.tokenize(texts[start : start + window], kind, max_length)
            else:
                sequences = tokenized[start : start + window]
            heads = [None] * len(sequences) if self.packed else None
            yield from plan_batches(sequences, start, batch_size, max_tokens, self._plan_device, heads)

    def _execute(self, batches, normalize):
        """``(batch, embeddings)`` for each planned batch; here, one after the other on this embedder's device."""
        for batch in batches:
            yield batch, self._run(batch, normalize)

    def _run(self, batch: PlannedBatch, normalize: Optional[bool]) -> torch.Tensor:
        if self.device.type == "meta":
            raise ValueError(
                "device: this embedder was loaded with device='meta' (no weights): it tokenizes and plans "
                "batches but cannot encode; load it on 'cpu' or 'cuda'"
            )
        return run_planned(
            batch,
            self.encoder.model,
            self.device,
            lambda b: self.encoder.encode(b, normalize),
            lambda b: self.encoder.encode({"input_ids": b.input_ids, "attention_mask": b.attention_mask}, normalize),
            self.pad_token_id,
            getattr(self.tokenizer, "padding_side", "right"),
        )

    @torch.inference_mode()
    def _run_remote(self, batch: PlannedBatch, normalize: Optional[bool]):
        """What a pool worker runs: one planned batch's embeddings, as a host array."""
        return self._run(batch, normalize).float().cpu().numpy()

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
