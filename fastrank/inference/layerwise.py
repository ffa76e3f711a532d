"""``LayerwiseReranker``: FlagEmbedding's layer-wise rerankers with early exit: bge-reranker-v2-minicpm-layerwise
(``LayerwiseMiniCPM``) and bge-reranker-v2.5-gemma2-lightweight (``LightweightGemma2``, with passage compression).

``fastrank.Reranker.from_pretrained`` returns one for the ``"bge-reranker-v2-minicpm-layerwise"`` and
``"bge-reranker-v2.5-gemma2-lightweight"`` presets (given, or recognised from the folder's ``config.json`` or the
checkpoint's name), so the entry point is the same as for every other reranker; ``cutoff_layers=`` picks the
layers, ``compress_layers=``/``compress_ratio=`` the lightweight model's compression (FlagEmbedding's arguments
and defaults).
"""

from __future__ import annotations

import os
import warnings
from typing import List, Optional, Sequence, Union

import torch

from fastrank.data.batching import pad_token_id_of
from fastrank.inference.batches import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_MAX_TOKENS,
    PlannedBatch,
    plan_batches,
    run_planned,
    sort_window,
    write_rows,
)
from fastrank.inference.reranker import Reranker, best_first, document_texts
from fastrank.models.layerwise import LayerwiseMiniCPM, is_layerwise_config, read_config
from fastrank.models.lightweight import ARCHITECTURE as LIGHTWEIGHT_ARCHITECTURE
from fastrank.models.lightweight import LightweightGemma2
from fastrank.models.loading import resolve_device
from fastrank.presets import Preset, detect_preset, get_preset
from fastrank.utils import positive_int

PRESET = "bge-reranker-v2-minicpm-layerwise"
LIGHTWEIGHT_PRESET = "bge-reranker-v2.5-gemma2-lightweight"
MODELS = (LayerwiseMiniCPM, LightweightGemma2)


def layerwise_preset(path_or_model, preset) -> Optional[Preset]:
    """The layer-wise preset when ``path_or_model``/``preset`` name one (given, a ``LayerwiseMiniCPM``, or
    detected from the checkpoint), else None (detection errors are left for the caller's own path)."""
    if isinstance(path_or_model, MODELS) and preset is None:
        return get_preset(LIGHTWEIGHT_PRESET if isinstance(path_or_model, LightweightGemma2) else PRESET)
    if preset is not None:
        found = get_preset(preset)
    elif isinstance(path_or_model, str):
        try:
            found = detect_preset(path_or_model)
        except ValueError:
            return None
    else:
        return None
    return found if found.convention.kind == "layerwise" else None


class LayerwiseReranker(Reranker):
    """A layer-wise reranker: the preset's layout (FlagEmbedding's LLM layout, BOS always first), the decoder run
    only to the deepest cutoff layer, each cutoff layer scored by its own head at each pair's last real token.

    ``score`` returns one score per pair when one layer is asked for, and one list per layer (in the order
    asked) for several, as FlagEmbedding's ``compute_score`` does. Batches are padded (length-sorted, right
    padding); the packed engine does not drive these models.

    The lightweight model (``LightweightGemma2``) also takes ``compress_layers`` (default ``[8]``) and
    ``compress_ratio`` (1, 2, 4 or 8; default 1: no compression), at load or per ``score`` call.
    """

    def __init__(
        self,
        model,
        tokenizer,
        preset: Union[str, Preset, None] = None,
        *,
        cutoff_layers: Union[int, Sequence[int], None] = None,
        compress_layers: Optional[Sequence[int]] = None,
        compress_ratio: Optional[int] = None,
    ):
        if not isinstance(model, MODELS):
            raise ValueError(
                "model: expected a fastrank.models.layerwise.LayerwiseMiniCPM or "
                f"fastrank.models.lightweight.LightweightGemma2, got {type(model).__name__}"
            )
        self.lightweight = isinstance(model, LightweightGemma2)
        self.preset = get_preset(preset if preset is not None else (LIGHTWEIGHT_PRESET if self.lightweight else PRESET))
        if self.preset.convention.kind != "layerwise":
            raise ValueError(f"preset: {self.preset.name!r} is not a layer-wise preset; use fastrank.Reranker")
        other = PRESET if self.lightweight else LIGHTWEIGHT_PRESET
        if self.preset.name == other:
            raise ValueError(
                f"preset: {other!r} is the preset of the other model ({type(model).__name__} is scored with "
                f"{LIGHTWEIGHT_PRESET if self.lightweight else PRESET!r})"
            )
        self.tokenizer = tokenizer
        self.model = model.eval()
        self.scorer = model
        self.pad_token_id = pad_token_id_of(tokenizer)
        self.cutoff_layers = model.check_cutoff_layers(cutoff_layers)
        if self.lightweight:
            self.compress_layers, self.compress_ratio = model.check_compression(
                [8] if compress_layers is None else compress_layers, 1 if compress_ratio is None else compress_ratio
            )
            template = self.preset.template
            self._prompt_length = sum(
                len(tokenizer(text, add_special_tokens=False)["input_ids"]) for text in (template.sep, template.prompt)
            )
        elif compress_layers is not None or compress_ratio is not None:
            raise ValueError("compress_layers, compress_ratio: only the lightweight (Gemma 2) reranker compresses")
        self.packed = False
        self.share_prefix = False

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
        cutoff_layers: Union[int, Sequence[int], None] = None,
        compress_layers: Optional[Sequence[int]] = None,
        compress_ratio: Optional[int] = None,
        packed: bool = True,
        share_prefix: bool = True,
        **model_kwargs,
    ) -> "LayerwiseReranker":
        """Load a ``LayerWiseMiniCPMForCausalLM`` or ``CostWiseGemmaForCausalLM`` checkpoint (a local folder, or a
        hub name fetched with ``huggingface_hub``), or wrap a loaded ``LayerwiseMiniCPM``/``LightweightGemma2``.

        ``cutoff_layers``: an int or a list of layers with a head (MiniCPM: ``[start_layer,
        num_hidden_layers]``, 8..40 for the released model, whose card uses ``[28]``); None is the last layer.
        ``compress_layers``/``compress_ratio``: the lightweight model's compression (FlagEmbedding's defaults
        ``[8]`` and 1). ``packed``/``share_prefix`` are accepted for ``Reranker.from_pretrained``'s sake and
        change nothing (these models run padded).
        """
        del packed, share_prefix
        if model_kwargs:
            raise ValueError(
                f"{', '.join(sorted(model_kwargs))}: not options of the layer-wise reranker (its loader takes "
                "dtype, device, attn_implementation, cutoff_layers, compress_layers and compress_ratio)"
            )
        if devices is not None:
            from fastrank.inference.pool import LayerwiseRerankerPool

            return LayerwiseRerankerPool.start(
                path_or_model,
                preset,
                devices,
                device=device,
                tokenizer=tokenizer,
                dtype=dtype,
                attn_implementation=attn_implementation,
                cutoff_layers=cutoff_layers,
                compress_layers=compress_layers,
                compress_ratio=compress_ratio,
            )
        device = resolve_device(device)
        if isinstance(path_or_model, MODELS):
            model = path_or_model
            if dtype not in (None, "auto"):
                model = model.to(getattr(torch, dtype) if isinstance(dtype, str) else dtype)
            source = None
        elif isinstance(path_or_model, str):
            source = _local_folder(path_or_model)
            loader = LightweightGemma2 if _architecture(source) == LIGHTWEIGHT_ARCHITECTURE else LayerwiseMiniCPM
            if device.type == "meta":  # no weights: what a device pool's parent plans with
                config = read_config(source) if loader is LayerwiseMiniCPM else _config_json(source)
                model = loader.empty(config, device="meta", attn_implementation=attn_implementation)
            else:
                model = loader.from_pretrained(
                    source, dtype=dtype, device=device, attn_implementation=attn_implementation
                )
        else:
            raise ValueError(
                f"path_or_model: expected a path, a hub name or a LayerwiseMiniCPM, got {type(path_or_model).__name__}"
            )
        if tokenizer is None:
            if source is None:
                raise ValueError("tokenizer: none given and the model has no folder to load one from")
            from transformers import AutoTokenizer, PreTrainedConfig

            # An empty config: transformers 5 knows no "minicpm" (or "cost_wise_gemma") model type and would warn
            # while reading config.json, which the tokenizer does not need (tokenizer_config.json names its class).
            tokenizer = AutoTokenizer.from_pretrained(source, config=PreTrainedConfig())
        return cls(
            model.to(device),
            tokenizer,
            preset,
            cutoff_layers=cutoff_layers,
            compress_layers=compress_layers,
            compress_ratio=compress_ratio,
        )

    @property
    def device(self) -> torch.device:
        return self.model.device

    @torch.inference_mode()
    def score(
        self,
        pairs: Sequence,
        *,
        cutoff_layers: Union[int, Sequence[int], None] = None,
        compress_layers: Optional[Sequence[int]] = None,
        compress_ratio: Optional[int] = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
        max_length: Optional[int] = None,
        max_tokens: int = DEFAULT_MAX_TOKENS,
        normalize: bool = False,
        show_progress: Optional[bool] = None,
        tokenized: Optional[Sequence] = None,
    ) -> Union[List[float], List[List[float]]]:
        """Scores of ``pairs`` (in input order) at ``cutoff_layers`` (default: the reranker's, set at load).

        One layer: a list with one score per pair. Several: one such list per layer, in the order given.
        ``normalize`` applies a sigmoid. ``compress_layers``/``compress_ratio``: the lightweight model's
        compression for this call (default: the reranker's). The other arguments are ``Reranker.score``'s.
        """
        layers = self.cutoff_layers if cutoff_layers is None else self.model.check_cutoff_layers(cutoff_layers)
        compression = self._compression(compress_layers, compress_ratio)
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
            return [] if len(layers) == 1 else [[] for _ in layers]
        scores = torch.empty(len(pairs), len(layers), dtype=torch.float32, device=self._results_device)
        show = show_progress if show_progress is not None else len(pairs) > 4 * batch_size
        truncated = [0]
        from tqdm.auto import tqdm

        with tqdm(total=len(pairs), unit="pair", desc="scoring", disable=not show) as bar:
            batches = self._plan(pairs, batch_size, max_length, max_tokens, truncated, tokenized)
            for batch, values in self._execute_layers(batches, layers, normalize, compression):
                write_rows(scores, batch.indices, values)
                bar.update(len(batch.indices))
        if truncated[0]:
            warnings.warn(
                f"{truncated[0]} of {len(pairs)} pairs exceeded max_length={max_length or self.preset.max_length} "
                f"tokens and were truncated by the {self.preset.name!r} preset's rule",
                stacklevel=3,
            )
        columns = scores.t().cpu().tolist()
        return columns[0] if len(layers) == 1 else columns

    def _compression(self, compress_layers, compress_ratio):
        if not self.lightweight:
            if compress_layers is not None or compress_ratio is not None:
                raise ValueError("compress_layers, compress_ratio: only the lightweight (Gemma 2) reranker compresses")
            return None
        return self.model.check_compression(
            self.compress_layers if compress_layers is None else compress_layers,
            self.compress_ratio if compress_ratio is None else compress_ratio,
        )

    def _plan(self, pairs, batch_size, max_length, max_tokens, truncated, tokenized=None):
        """Padded, length-sorted batches; for the lightweight model each sequence carries the length of its
        ``[BOS] + query + sep`` head (in ``PlannedBatch.segment_a``), which compression keeps apart from the
        passage."""
        if not self.lightweight:
            yield from super()._plan(pairs, batch_size, max_length, max_tokens, truncated, tokenized)
            return
        chunk = sort_window(batch_size, self._plan_device)
        limit = self.preset.max_length if max_length is None else max_length
        template = self.preset.template
        for start in range(0, len(pairs), chunk):
            window = pairs[start : start + chunk]
            encoded = self.tokenize(window, max_length) if tokenized is None else tokenized[start : start + chunk]
            truncated[0] += sum(e.truncated for e in encoded)
            heads = [len(template.shared_prefix(self.tokenizer, q, limit)) for q, _ in window]
            sequences = [e.input_ids for e in encoded]
            yield from plan_batches(sequences, start, batch_size, max_tokens, self._plan_device, None, heads)

    def _execute_layers(self, batches, layers, normalize, compression):
        """``(batch, [n, len(layers)] scores)`` for each planned batch; here, one after the other on this device."""
        for batch in batches:
            yield batch, self._run_layers(batch, layers, normalize, compression)

    @torch.inference_mode()
    def _run_layers_remote(self, batch: PlannedBatch, layers, normalize, compression):
        """What a pool worker runs: one planned batch's scores at ``layers``, as a host array."""
        return self._run_layers(batch, layers, normalize, compression).float().cpu().numpy()

    def _run_layers(self, batch: PlannedBatch, layers: List[int], normalize: bool, compression=None) -> torch.Tensor:
        if self.device.type == "meta":
            raise ValueError("device: this reranker has no weights (device='meta'); load it on 'cpu' or 'cuda'")

        def padded(b):
            if not self.lightweight:
                return self.model(
                    b.input_ids, b.attention_mask, layers, position_ids=b.position_ids, normalize=normalize
                )
            compress_layers, compress_ratio = compression
            return self.model(
                b.input_ids,
                b.attention_mask,
                batch.segment_a,
                [self._prompt_length] * len(batch.segment_a),
                layers,
                compress_layers,
                compress_ratio,
                normalize=normalize,
            )

        return run_planned(batch, self.model, self.device, padded, padded, self.pad_token_id, "right")

    def _run(self, batch: PlannedBatch, normalize: bool) -> torch.Tensor:
        if len(self.cutoff_layers) != 1:
            raise ValueError(f"cutoff_layers: {self.cutoff_layers} gives several scores per pair; give one layer")
        return self._run_layers(batch, self.cutoff_layers, normalize, self._compression(None, None))[:, 0]

    def rank(
        self,
        query: str,
        documents: Sequence,
        *,
        top_k: Optional[int] = None,
        normalize: bool = False,
        cutoff_layers: Union[int, Sequence[int], None] = None,
        **score_kwargs,
    ) -> List[dict]:
        """``Reranker.rank`` at one cutoff layer (the reranker's, or ``cutoff_layers`` naming one layer)."""
        layers = self.cutoff_layers if cutoff_layers is None else self.model.check_cutoff_layers(cutoff_layers)
        if len(layers) != 1:
            raise ValueError(f"cutoff_layers: rank orders by one score; give one layer, not {layers}")
        if not isinstance(query, str):
            raise ValueError(f"query: must be a string, got {type(query).__name__}")
        documents = documents if isinstance(documents, str) else list(documents)
        texts = document_texts(documents)
        positive_int("top_k", top_k, none_ok=True)
        scores = self.score([(query, t) for t in texts], cutoff_layers=layers, normalize=normalize, **score_kwargs)
        return [{"index": i, "relevance_score": scores[i], "document": documents[i]} for i in best_first(scores, top_k)]

    def compute_score(
        self,
        sentence_pairs,
        *,
        cutoff_layers: Union[int, Sequence[int], None] = None,
        compress_layers: Optional[Sequence[int]] = None,
        compress_ratio: Optional[int] = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
        max_length: Optional[int] = None,
        normalize: bool = False,
        **kwargs,
    ):
        """FlagEmbedding's ``LayerWiseFlagLLMReranker.compute_score``: a list of scores for one cutoff layer, a
        list of lists (one per layer) for several. Unlike the package, each list belongs to the layer at the same
        place in ``cutoff_layers`` whatever their order (the package pairs an unsorted list's hidden states
        with the wrong heads), and a layer without a head is an error, not a warning."""
        single = (
            isinstance(sentence_pairs, (list, tuple))
            and len(sentence_pairs) == 2
            and all(isinstance(x, str) for x in sentence_pairs)
        )
        pairs = [tuple(sentence_pairs)] if single else sentence_pairs
        return self.score(
            pairs,
            cutoff_layers=cutoff_layers,
            compress_layers=compress_layers,
            compress_ratio=compress_ratio,
            batch_size=batch_size,
            max_length=max_length,
            normalize=normalize,
            **kwargs,
        )


def _local_folder(source: str) -> str:
    """``source`` as a local checkpoint folder: itself, or the hub snapshot of that name (config, tokenizer and
    safetensors weights only)."""
    if os.path.isdir(source):
        return source
    if os.path.exists(source):
        raise ValueError(f"path_or_model: {source} is a file; give the checkpoint's folder")
    from huggingface_hub import snapshot_download

    try:
        folder = snapshot_download(source, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"])
    except Exception as e:  # noqa: BLE001 - any hub failure becomes one clear message
        raise ValueError(
            f"path_or_model: {source!r} is not a local folder and could not be fetched from the hub ({e})"
        ) from None
    if _architecture(folder) not in ("LayerWiseMiniCPMForCausalLM", LIGHTWEIGHT_ARCHITECTURE):
        raise ValueError(
            f"path_or_model: {source} is neither a LayerWiseMiniCPMForCausalLM nor a {LIGHTWEIGHT_ARCHITECTURE} "
            "checkpoint"
        )
    return folder


def _config_json(folder: str) -> dict:
    import json

    with open(os.path.join(folder, "config.json")) as f:
        return json.load(f)


def _architecture(folder: str) -> Optional[str]:
    """``LayerWiseMiniCPMForCausalLM``, ``CostWiseGemmaForCausalLM`` or None, from the folder's config.json."""
    import json

    path = os.path.join(folder, "config.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        config = json.load(f)
    if LIGHTWEIGHT_ARCHITECTURE in (config.get("architectures") or []):
        return LIGHTWEIGHT_ARCHITECTURE
    return "LayerWiseMiniCPMForCausalLM" if is_layerwise_config(config) else None
