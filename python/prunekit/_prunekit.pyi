"""Type stubs of the compiled module (python/src/*.rs)."""

from os import PathLike
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import numpy.typing as npt

_Path = Union[str, PathLike[str]]
_Weights = Union[_Path, Dict[str, np.ndarray]]

def version() -> str: ...
def _panic_for_tests(released: bool = True) -> None: ...
def verify(
    reference: _Path, device: str = "cpu", precision: str = "f32", bn_fusion: str = "none"
) -> Tuple[str, bool, List[str]]: ...

class PruneResult:
    def state(self) -> Dict[str, np.ndarray]: ...
    def keep(self) -> Dict[str, npt.NDArray[np.int64]]: ...
    def groups(self) -> List[Tuple[str, int, int, List[str]]]: ...
    def counts(self, size: int = 224) -> Dict[str, float]: ...
    def table(self, size: int = 224) -> str: ...
    def settings(self) -> Tuple[str, str, int, str]: ...
    def save(self, path: _Path) -> None: ...
    def file_state(self) -> Tuple[Dict[str, np.ndarray], Dict[str, str]]: ...

def prune(
    weights: _Weights,
    mode: str = "filters",
    sparsity: Union[float, str, None] = None,
    round_to: int = 8,
    criterion: str = "l1",
    device: str = "cpu",
) -> PruneResult: ...
def flops(weights: _Weights, size: int = 224) -> Dict[str, Any]: ...
def init_weights(
    layers: Sequence[int] = ..., width: int = 64, classes: int = 1000, seed: int = 0
) -> Dict[str, np.ndarray]: ...
def logits(
    weights: _Weights,
    images: npt.NDArray[np.float32],
    train: bool = False,
    device: str = "cpu",
    precision: Optional[str] = None,
) -> npt.NDArray[np.float32]: ...
def conv2d(
    x: npt.NDArray[np.float32],
    w: npt.NDArray[np.float32],
    stride: int = 1,
    padding: int = 0,
    out: Optional[npt.NDArray[np.float32]] = None,
) -> npt.NDArray[np.float32]: ...
def conv2d_backward_input(
    dy: npt.NDArray[np.float32],
    w: npt.NDArray[np.float32],
    input_size: Tuple[int, int],
    stride: int = 1,
    padding: int = 0,
    out: Optional[npt.NDArray[np.float32]] = None,
) -> npt.NDArray[np.float32]: ...
def conv2d_backward_weight(
    x: npt.NDArray[np.float32],
    dy: npt.NDArray[np.float32],
    kernel_size: Tuple[int, int],
    stride: int = 1,
    padding: int = 0,
    out: Optional[npt.NDArray[np.float32]] = None,
) -> npt.NDArray[np.float32]: ...
def conv2d_backward(
    x: npt.NDArray[np.float32],
    w: npt.NDArray[np.float32],
    dy: npt.NDArray[np.float32],
    stride: int = 1,
    padding: int = 0,
    input: bool = True,
    weight: bool = True,
) -> Tuple[Optional[npt.NDArray[np.float32]], Optional[npt.NDArray[np.float32]]]: ...
def empty(shape: List[int]) -> npt.NDArray[np.float32]: ...
def device_stream(device: str) -> Optional[int]: ...
def conv2d_dlpack(
    pass_: str,
    a: Any,
    b: Any,
    out: Any,
    stride: int,
    padding: int,
    device: str,
    stream: Optional[int] = None,
) -> None: ...
def buffer_cache() -> Tuple[int, int, int, int]: ...
def empty_buffer_cache() -> None: ...

class Data:
    def __init__(
        self,
        data: Union[str, Tuple[np.ndarray, np.ndarray]],
        val: Union[str, Tuple[np.ndarray, np.ndarray], None] = None,
        classes: Optional[str] = None,
        per_class: Optional[int] = None,
        val_fraction: float = 0.1,
        normalize: str = "imagenet",
        skip_bad: bool = False,
        seed: int = 0,
    ) -> None: ...
    def summary(self) -> str: ...
    def classes(self) -> List[str]: ...
    def sizes(self) -> Tuple[int, int]: ...

class Batches(Iterator[Tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]]):
    def __init__(
        self,
        data: Data,
        batch: int = 32,
        size: int = 32,
        seed: int = 0,
        augment: str = "crop-flip",
        steps: Optional[int] = None,
        split: str = "train",
    ) -> None: ...
    def __iter__(self) -> "Batches": ...
    def __next__(self) -> Tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]: ...

class Job:
    def poll(self, timeout: float = 0.05) -> List[Tuple[str, str]]: ...
    def interrupt(self) -> None: ...
    def finished(self) -> bool: ...
    def result(self) -> str: ...

def train_start(data: Data, recipe: Dict[str, Any], **kwargs: Any) -> Tuple[Job, int, List[str]]: ...
def transfer_start(data: Data, recipe: Dict[str, Any], **kwargs: Any) -> Job: ...
def evaluate(
    weights: _Weights,
    data: Data,
    batch: int = 64,
    size: int = 32,
    device: str = "cpu",
    precision: Optional[str] = None,
    seed: int = 0,
) -> Tuple[float, float, int]: ...
