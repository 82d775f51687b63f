"""Type stubs of the prunekit package (see __init__.py for the documentation)."""

from dataclasses import dataclass
from os import PathLike
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

from ._prunekit import Batches as Batches
from ._prunekit import Data as Data

__version__: str

_Path = Union[str, PathLike[str]]

@dataclass
class Pruned:
    weights: Any
    state_dict: Dict[str, Any]
    keep: Dict[str, np.ndarray]
    widths: Dict[str, Tuple[int, int]]
    flops: Dict[str, float]
    params: Dict[str, int]
    def table(self, size: int = 224) -> str: ...
    def counts(self, size: int = 224) -> Dict[str, float]: ...
    def save(self, path: _Path) -> None: ...

@dataclass
class Run:
    rows: List[Dict[str, Any]]
    summary: Dict[str, Any]
    notes: List[str]
    lines: List[str]

@dataclass
class VerifyReport:
    text: str
    ok: bool
    failed: List[str]
    def __bool__(self) -> bool: ...

def prune(
    weights: Any,
    mode: str = "filters",
    sparsity: Union[float, str] = 0.5,
    round_to: int = 8,
    criterion: str = "l1",
    device: str = "cpu",
) -> Pruned: ...
def flops(weights: Any, size: int = 224) -> Dict[str, Any]: ...
def init_weights(
    layers: Sequence[int] = (3, 4, 6, 3), width: int = 64, classes: int = 1000, seed: int = 0
) -> Dict[str, np.ndarray]: ...
def logits(
    weights: Any, images: Any, train: bool = False, device: str = "cpu", precision: Optional[str] = None
) -> Any: ...
def batches(
    data: Any,
    batch: int = 32,
    size: int = 32,
    seed: int = 0,
    augment: str = "crop-flip",
    steps: Optional[int] = None,
    split: str = "train",
    **data_options: Any,
) -> Iterator[Tuple[Any, Any]]: ...
def train(
    data: Any,
    *,
    weights: Any = None,
    layers: Optional[Sequence[int]] = None,
    width: Optional[int] = None,
    mode: Optional[str] = None,
    sparsity: Optional[Union[float, str]] = None,
    round_to: int = 8,
    criterion: str = "l1",
    fresh_head: bool = False,
    steps: Optional[int] = None,
    epochs: Optional[int] = None,
    budget: Optional[float] = None,
    lr: float = 0.1,
    eval_every: Optional[float] = None,
    out: Optional[_Path] = None,
    log: Optional[_Path] = None,
    checkpoint: Optional[_Path] = None,
    checkpoint_every: Optional[int] = None,
    resume: Optional[_Path] = None,
    progress: Optional[Callable[[Dict[str, Any]], Any]] = None,
    **options: Any,
) -> Run: ...
def evaluate(
    weights: Any,
    data: Any,
    batch: int = 64,
    size: int = 32,
    device: str = "cpu",
    precision: Optional[str] = None,
    seed: int = 0,
    **data_options: Any,
) -> Dict[str, Any]: ...
def transfer(
    data: Any,
    *,
    weights: Any,
    budgets: Sequence[float],
    models: str = ...,
    seeds: int = 1,
    lr: float = 0.1,
    lrs: Optional[Sequence[float]] = None,
    search_fraction: float = 0.2,
    round_to: int = 8,
    criterion: str = "l1",
    json_path: Optional[_Path] = None,
    plot: Optional[_Path] = None,
    shard: Optional[str] = None,
    runs: Optional[_Path] = None,
    keep_head: bool = False,
    progress: Optional[Callable[[Dict[str, Any]], Any]] = None,
    **options: Any,
) -> Dict[str, Any]: ...
def verify(reference: _Path, device: str = "cpu", precision: str = "f32", bn_fusion: str = "none") -> VerifyReport: ...
def conv2d(x: Any, w: Any, stride: int = 1, padding: int = 0, out: Any = None) -> Any: ...
def conv2d_backward_input(
    dy: Any, w: Any, input_size: Tuple[int, int], stride: int = 1, padding: int = 0, out: Any = None
) -> Any: ...
def conv2d_backward_weight(
    x: Any, dy: Any, kernel_size: Tuple[int, int], stride: int = 1, padding: int = 0, out: Any = None
) -> Any: ...
