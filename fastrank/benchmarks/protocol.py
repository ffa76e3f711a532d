"""What every op's benchmark module provides: one :class:`Benchmark`, named ``BENCHMARK``.

``fastrank bench`` (:mod:`fastrank.benchmarks.runner`) and the pytest-benchmark view (``bench/test_bench.py``)
reach an op only through its ``Benchmark``: the cases to run, the closures to time on each, how to save a
case as JSON and how to label a saved one in the table and the figure.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable, Dict, Generic, Mapping, Optional, Protocol, Sequence, Tuple, TypeVar, Union

import torch

from fastrank.benchmarks.harness import Unavailable


class Case(Protocol):
    """A benchmark case: a frozen dataclass whose fields are its shape (saved in the results as JSON)."""

    def label(self) -> str:
        """The case in full, for progress lines and pytest-benchmark's groups (which name the op before it)."""


C = TypeVar("C", bound=Case)
# A closure doing all the work of one call (backward included), or why a baseline could not be built.
Provider = Union[Callable[[], object], Unavailable]


@dataclass(frozen=True)
class Benchmark(Generic[C]):
    """One op's benchmark.

    ``providers(case, device)`` returns name -> :data:`Provider`, the same inputs for all, ``"fastrank"``
    among them; it raises :class:`~fastrank.benchmarks.harness.MissingInput` when no provider of the case can
    run. ``provider_names`` lists every name it can return, in order (a case may leave some out: score_head's
    ``lse`` modes have no ``torch_sliced``). ``table_label`` turns a saved case (``case_dict``'s output,
    or a file saved before the fields were renamed, through :meth:`current_keys`) into the few words the
    table and the figure show.
    """

    name: str
    case_type: type  # the op's Case dataclass
    quick_cases: Callable[[torch.device], Sequence[C]]  # what `fastrank bench` runs
    full_cases: Callable[[torch.device], Sequence[C]]  # `fastrank bench --full`
    providers: Callable[[C, torch.device], Dict[str, Provider]]
    provider_names: Tuple[str, ...]
    table_label: Callable[[dict], str]
    # The case as saved in the results; its fields by default.
    case_dict: Callable[[C], dict] = dataclasses.asdict
    # For whole jobs: what one call processes (pairs, texts, ...), reported per second in ``unit``s.
    items_per_call: Optional[Callable[[C], int]] = None
    unit: Optional[str] = None
    # For model forwards: the real tokens one call processes and the model FLOPs they cost (what any provider
    # must compute: the unshared, unpadded forward), as {"tokens": int, "flops": float}; the runner reports
    # tokens/s, TFLOP/s and the fraction of the GPU's dense bf16 peak from it.
    work_per_call: Optional[Callable[[C], Dict[str, float]]] = None
    # Whole jobs (seconds per call, host work included) rather than kernels: device type -> the warm-up and
    # timed runs (``measure``'s ``warmup`` and ``repeats``); kernel timing on a device type not listed.
    end_to_end: Mapping[str, Mapping[str, int]] = field(default_factory=dict)
    # Keys of results saved before the Case fields were renamed -> today's field names.
    legacy_keys: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self):
        if not dataclasses.is_dataclass(self.case_type):
            raise TypeError(f"{self.name}: case_type must be a dataclass, got {self.case_type!r}")
        if "fastrank" not in self.provider_names:
            raise ValueError(f"{self.name}: provider_names {self.provider_names} must include 'fastrank'")
        if (self.items_per_call is None) != (self.unit is None):
            raise ValueError(f"{self.name}: items_per_call and unit go together (what is counted, and its name)")
        fields = {f.name for f in dataclasses.fields(self.case_type)}
        for old, new in self.legacy_keys.items():
            if old in fields or new not in fields:
                raise ValueError(
                    f"{self.name}: legacy_keys maps {old!r} -> {new!r}, but {self.case_type.__name__}'s "
                    f"fields are {sorted(fields)}: an old key must be gone and its new name a field"
                )

    def providers_of(self, case: C, device: torch.device) -> Dict[str, Provider]:
        """``providers(case, device)``, checked against ``provider_names``."""
        fns = self.providers(case, device)
        undeclared = [name for name in fns if name not in self.provider_names]
        if undeclared or "fastrank" not in fns:
            raise ValueError(
                f"{self.name}: providers() returned {list(fns)}; it must return 'fastrank' and only "
                f"names in provider_names {self.provider_names} (undeclared: {undeclared})"
            )
        return fns

    def current_keys(self, case: dict) -> dict:
        """A saved case with its keys under today's names (files saved before the rename use the old ones)."""
        return {self.legacy_keys.get(key, key): value for key, value in case.items()}
