"""prunekit from Python: prune a bottleneck ResNet zero-shot by weight magnitude, train
and evaluate it, run the compute-optimal transfer sweep, and call the convolution kernels.

Glue only: every computation is the ``prunekit`` Rust crate's library code (the compiled
module ``prunekit._prunekit``), run with the GIL released. Keyword arguments are named as
the CLI's options (``--round-to`` is ``round_to``). Errors are ``ValueError`` (bad
arguments, files or data), ``FileNotFoundError``/``OSError`` (files) or ``RuntimeError``
(devices, internal failures), each with the crate's message.

Weights are a state dict with torchvision's names (torch tensors or numpy arrays), a path
to a ``.safetensors`` file, or a torchvision ResNet ``nn.Module`` of the bottleneck family
(resnet50 and its kin). PyTorch is optional: without it, numpy arrays work everywhere.

    import prunekit, torchvision
    pruned = prunekit.prune(torchvision.models.resnet50(), mode="filters", sparsity=0.5)
    model = pruned.weights          # a new nn.Module with the kept widths
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

from . import _prunekit
from ._prunekit import Batches, Data

__all__ = [
    "Data",
    "Batches",
    "Pruned",
    "Run",
    "VerifyReport",
    "prune",
    "flops",
    "init_weights",
    "logits",
    "batches",
    "train",
    "evaluate",
    "transfer",
    "verify",
    "conv2d",
    "conv2d_backward_input",
    "conv2d_backward_weight",
    "__version__",
]

__version__: str = _prunekit.version()


def _torch():
    """The torch module, or None when PyTorch is not installed."""
    try:
        import torch
    except ImportError:  # pragma: no cover - PyTorch is optional
        return None
    return torch


def _is_path(x: Any) -> bool:
    return isinstance(x, (str, os.PathLike))


def _is_module(x: Any) -> bool:
    torch = _torch()
    return torch is not None and isinstance(x, torch.nn.Module)


def _to_numpy_state(weights: Any) -> Union[str, os.PathLike, Dict[str, np.ndarray]]:
    """Weights as the compiled module takes them: a path, or a dict of numpy arrays (CPU
    tensors are viewed without a copy where they are contiguous)."""
    if _is_path(weights):
        return weights
    if _is_module(weights):
        weights = weights.state_dict()
    if not isinstance(weights, dict):
        raise ValueError(
            "weights: expected a state dict, a path to a .safetensors file or a torchvision ResNet module, "
            f"got {type(weights).__name__}"
        )
    torch = _torch()
    out: Dict[str, np.ndarray] = {}
    for k, v in weights.items():
        if torch is not None and isinstance(v, torch.Tensor):
            v = v.detach()
            if v.device.type != "cpu":
                v = v.cpu()
            out[k] = v.contiguous().numpy()
        elif isinstance(v, np.ndarray):
            out[k] = v
        else:
            raise ValueError(f"weights: tensor {k} is a {type(v).__name__}, not a tensor or numpy array")
    return out


def _like(state: Dict[str, np.ndarray], template: Any) -> Dict[str, Any]:
    """A numpy state dict in the kind of ``template``: torch tensors when it held torch
    tensors (or was a module), else numpy arrays."""
    torch = _torch()
    as_torch = _is_module(template) or (
        isinstance(template, dict) and torch is not None and any(isinstance(v, torch.Tensor) for v in template.values())
    )
    if as_torch:
        return {k: torch.from_numpy(np.asarray(v, order="C")) for k, v in state.items()}
    return dict(state)


def _model_tensors(state: Dict[str, Any]) -> Dict[str, Any]:
    return {k: v for k, v in state.items() if not k.startswith("keep.")}


@dataclass
class Pruned:
    """The result of :func:`prune`.

    Attributes:
        weights: the compacted model in the kind given: a new ``nn.Module`` with the kept
            widths (for a module), a dict of torch tensors (for torch tensors), or a dict of
            numpy arrays (for numpy arrays or a path).
        state_dict: the compacted tensors (torchvision's names) as torch tensors or numpy
            arrays, as ``weights`` holds them (for a module, its tensors: they share memory
            with its parameters and buffers, as ``module.state_dict()`` does).
        keep: the kept indices of the dense model per group (``layer1.0.conv1``, ...).
        widths: per group, ``(width before, width kept)``.
        flops: forward FLOPs per 224x224 image (2 x multiply-adds of convs and fc),
            ``{"before": ..., "after": ...}``.
        params: trainable parameters, ``{"before": ..., "after": ...}``.
    """

    weights: Any
    state_dict: Dict[str, Any]
    keep: Dict[str, np.ndarray]
    widths: Dict[str, Tuple[int, int]]
    flops: Dict[str, float]
    params: Dict[str, int]
    _result: Any = field(repr=False, default=None)

    def table(self, size: int = 224) -> str:
        """The plan's table (what ``prunekit prune`` prints) for ``size`` x ``size`` images."""
        return self._result.table(size)

    def counts(self, size: int = 224) -> Dict[str, float]:
        """FLOPs (forward and train) and parameters before and after, for ``size`` x ``size``."""
        return dict(self._result.counts(size))

    def save(self, path: Union[str, os.PathLike]) -> None:
        """Writes the file ``prunekit prune --out`` writes (model, ``keep.*``, settings)."""
        self._result.save(os.fspath(path))


def prune(
    weights: Any,
    mode: str = "filters",
    sparsity: Union[float, str] = 0.5,
    round_to: int = 8,
    criterion: str = "l1",
    device: str = "cpu",
) -> Pruned:
    """Prunes a bottleneck ResNet zero-shot by weight magnitude (``prunekit prune``).

    Args:
        weights: a state dict (torch tensors or numpy arrays, torchvision names), a path to
            a ``.safetensors`` file, or a torchvision ResNet ``nn.Module`` (bottleneck).
        mode: ``"filters"`` (each block's conv1/conv2 outputs) or ``"channels"`` (also the
            residual streams and the stem).
        sparsity: the fraction of each pruned width to remove, in [0, 1) (a float is read as
            its shortest decimal form, exactly as the CLI reads ``--sparsity``).
        round_to: kept widths are rounded up to a multiple of this.
        criterion: ``"l1"`` or ``"l2"`` filter norms.
        device: where the pipeline runs (``cpu`` by default; ``emu``, ``cuda``).

    Returns:
        a :class:`Pruned` with the compacted weights in the kind given.
    """
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float, str)):
        raise ValueError(f"sparsity must be a number in [0, 1), got {sparsity!r}")
    if isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1:
        raise ValueError(f"round_to must be an integer of at least 1, got {round_to!r}")
    if _is_module(weights):
        from .torch import check_bottleneck_resnet

        check_bottleneck_resnet(weights)
    r = _prunekit.prune(_to_numpy_state(weights), mode, sparsity, round_to, criterion, device)
    state = r.state()
    keep = dict(r.keep())
    widths = {name: (width, kept) for name, width, kept, _ in r.groups()}
    c = r.counts(224)
    flops_ = {"before": c["flops_before"], "after": c["flops_after"]}
    params = {"before": c["params_before"], "after": c["params_after"]}
    sd = _like(state, weights)
    if _is_module(weights):
        from .torch import resize_like

        out: Any = resize_like(weights, _model_tensors(sd), copy_tensors=False)  # new tensors: shared, not copied
    else:
        out = sd
    return Pruned(out, sd, keep, widths, flops_, params, r)


def flops(weights: Any, size: int = 224) -> Dict[str, Any]:
    """FLOPs and parameters of a bottleneck ResNet given by its weights.

    Returns a dict: ``forward`` (FLOPs per ``size`` x ``size`` image: 2 x multiply-adds of
    the convolutions and the classifier; BN, ReLU, pooling and additions are not counted),
    ``train`` (forward, and backward at twice the forward, less the stem's input gradient),
    ``params``, ``layers``, ``classes``, ``fc_in``, and ``convs`` (per convolution: name,
    in, out, kernel, stride, padding, input height, input width, FLOPs).
    """
    return dict(_prunekit.flops(_to_numpy_state(weights), size))


def init_weights(
    layers: Sequence[int] = (3, 4, 6, 3), width: int = 64, classes: int = 1000, seed: int = 0
) -> Dict[str, np.ndarray]:
    """Fresh weights of a bottleneck ResNet (blocks per stage; base width, 64 being
    torchvision's) with torchvision's initialisation, seeded: a dict of numpy arrays."""
    return dict(_prunekit.init_weights(list(layers), width, classes, seed))


def logits(weights: Any, images: Any, train: bool = False, device: str = "cpu", precision: Optional[str] = None):
    """prunekit's forward pass: the logits ``[N, classes]`` for NCHW float32 ``images``
    (eval-mode batch norm unless ``train``). Returns the kind of ``images`` (tensor or
    numpy array)."""
    torch = _torch()
    is_tensor = torch is not None and isinstance(images, torch.Tensor)
    x = images.detach().cpu().contiguous().numpy() if is_tensor else images
    out = _prunekit.logits(_to_numpy_state(weights), x, train, device, precision)
    return torch.from_numpy(out) if is_tensor else out


def _data(data: Any, seed: int = 0, val: Any = None, **kw: Any) -> Data:
    """``data`` as a :class:`Data` (a path or ``idx:`` spec, or ``(images, labels)``);
    ``seed`` seeds the validation split and the per-class sample, as the CLI's ``--seed``."""
    if isinstance(data, Data):
        if val is not None or any(v is not None for v in kw.values()):
            raise ValueError("data is a prunekit.Data already: give val, classes, ... when making it")
        return data
    if isinstance(data, os.PathLike):
        data = os.fspath(data)
    if isinstance(val, os.PathLike):
        val = os.fspath(val)
    kw = {k: v for k, v in kw.items() if v is not None}
    return Data(data, val, seed=seed, **kw)


def batches(
    data: Any,
    batch: int = 32,
    size: int = 32,
    seed: int = 0,
    augment: str = "crop-flip",
    steps: Optional[int] = None,
    split: str = "train",
    **data_options: Any,
) -> Iterator[Tuple[Any, Any]]:
    """The batches ``train`` takes with the same ``data``, ``batch``, ``size``, ``seed`` and
    ``augment``: ``(images, targets)`` pairs, images NCHW float32 normalized, int64
    targets, as torch tensors when PyTorch is installed. ``steps`` limits how many;
    ``split="val"`` gives the evaluation batches."""
    torch = _torch()
    it = Batches(_data(data, seed, **data_options), batch, size, seed, augment, steps, split)
    for x, y in it:
        yield (torch.from_numpy(x), torch.from_numpy(y)) if torch is not None else (x, y)


def _recipe(
    batch: int = 32,
    eval_batch: Optional[int] = None,
    size: int = 32,
    momentum: float = 0.9,
    wd: float = 5e-4,
    schedule: str = "cosine",
    warmup: int = 0,
    label_smoothing: float = 0.0,
    augment: str = "crop-flip",
    device: str = "cpu",
    precision: Optional[str] = None,
    seed: int = 0,
    threads: int = 0,
) -> Dict[str, Any]:
    return dict(locals())


_RECIPE_KEYS = set(_recipe.__code__.co_varnames[: _recipe.__code__.co_argcount])
_DATA_KEYS = {"val", "classes", "per_class", "val_fraction", "normalize", "skip_bad"}


def _split_options(kw: Dict[str, Any]) -> Tuple[Dict[str, Any], Dict[str, Any], Dict[str, Any]]:
    recipe = {k: kw.pop(k) for k in list(kw) if k in _RECIPE_KEYS}
    data = {k: kw.pop(k) for k in list(kw) if k in _DATA_KEYS}
    return _recipe(**recipe), data, kw


@dataclass
class Run:
    """What :func:`train` did.

    Attributes:
        rows: the JSON-lines log as a list of dicts (step, images, train_gflops, wall_s, lr,
            loss; val_error and val_loss at evaluation points).
        summary: the outcome (steps, images, train_gflops, gflops_per_image, wall_s,
            last_loss, eval) as a dict.
        notes: what was done to the model first (pruning, a replaced classifier).
        lines: the messages the run printed.
    """

    rows: List[Dict[str, Any]]
    summary: Dict[str, Any]
    notes: List[str]
    lines: List[str]


def _progress_bar(total: Optional[int], desc: str):
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=desc, unit="step")


def _drive(job: Any, total: Optional[int], progress: Optional[Callable[[Dict[str, Any]], Any]], desc: str):
    """Polls a job to its end, feeding ``progress`` and tqdm. Ctrl-C (or any exception in
    ``progress``) interrupts the job, waits for it to stop (training writes its
    checkpoint), and raises."""
    rows: List[Dict[str, Any]] = []
    lines: List[str] = []
    bar = _progress_bar(total, desc) if progress is None else None
    pending: Optional[BaseException] = None
    try:
        while True:
            try:
                events = job.poll(0.05)
                for kind, text in events:
                    if kind == "step":
                        row = json.loads(text)
                        rows.append(row)
                        if bar is not None:
                            bar.update(1)
                            bar.set_postfix(loss=f"{row['loss']:.4f}")
                        if progress is not None and pending is None:
                            progress(row)
                    elif kind == "line":
                        lines.append(text)
                        if progress is not None and pending is None:
                            progress({"line": text})
                        elif bar is not None:
                            bar.write(text)
                if job.finished():
                    break
            except BaseException as e:  # KeyboardInterrupt included: stop the job first
                if pending is None:
                    pending = e
                job.interrupt()
    finally:
        if bar is not None:
            bar.close()
    if pending is not None:
        try:
            job.result()
        except Exception:
            pass
        raise pending
    return json.loads(job.result()), rows, lines


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
    out: Optional[Union[str, os.PathLike]] = None,
    log: Optional[Union[str, os.PathLike]] = None,
    checkpoint: Optional[Union[str, os.PathLike]] = None,
    checkpoint_every: Optional[int] = None,
    resume: Optional[Union[str, os.PathLike]] = None,
    progress: Optional[Callable[[Dict[str, Any]], Any]] = None,
    **options: Any,
) -> Run:
    """``prunekit train`` in-process: fine-tunes ``weights`` (pruned first with ``mode`` and
    ``sparsity``) or a fresh network (``layers``, ``width``) on ``data`` for ``steps``,
    ``epochs`` or a ``budget`` in GFLOPs.

    ``data`` is a :class:`Data`, a path or ``idx:IMAGES,LABELS`` spec, or ``(images,
    labels)`` numpy arrays (uint8 images ``[N, H, W]`` or ``[N, H, W, C]``); ``val``,
    ``classes``, ``per_class``, ``val_fraction``, ``normalize``, ``skip_bad`` are taken as
    keyword options. The recipe options are those of the CLI: ``batch``, ``eval_batch``,
    ``size``, ``momentum``, ``wd``, ``schedule``, ``warmup``, ``label_smoothing``,
    ``augment``, ``device`` (default ``cpu``), ``precision``, ``seed``, ``threads``.

    Writes the same files as the CLI (``out``, ``log``, ``checkpoint``). ``progress`` is
    called with every log row (a dict) and every message (``{"line": text}``); without it a
    tqdm bar shows when tqdm is installed. Ctrl-C stops the run after the current step,
    leaves the checkpoint (when ``checkpoint`` is given; continue with ``resume=``), and
    raises ``KeyboardInterrupt``.

    Returns:
        a :class:`Run` with the log rows, the summary, the notes and the messages.
    """
    recipe, data_opts, rest = _split_options(options)
    stop_after = rest.pop("stop_after", None)
    if rest:
        raise TypeError(f"train() got unexpected keyword arguments: {', '.join(sorted(rest))}")
    d = _data(data, recipe["seed"], **data_opts)
    tmp = None
    if log is None:
        tmp = tempfile.TemporaryDirectory(prefix="prunekit-train-")
        log = os.path.join(tmp.name, "log.jsonl")
    try:
        job, total, notes = _prunekit.train_start(
            d,
            recipe,
            weights=None if weights is None else _to_numpy_state(weights),
            layers=None if layers is None else list(layers),
            width=width,
            mode=mode,
            sparsity=sparsity,
            round_to=round_to,
            criterion=criterion,
            fresh_head=fresh_head,
            steps=steps,
            epochs=epochs,
            budget=budget,
            lr=lr,
            eval_every=eval_every,
            out=None if out is None else os.fspath(out),
            log=os.fspath(log),
            checkpoint=None if checkpoint is None else os.fspath(checkpoint),
            checkpoint_every=checkpoint_every,
            resume=None if resume is None else os.fspath(resume),
            stop_after=stop_after,
        )
        summary, rows, lines = _drive(job, total, progress, "prunekit train")
    finally:
        if tmp is not None:
            tmp.cleanup()
    return Run(rows, summary, list(notes), lines)


def evaluate(
    weights: Any,
    data: Any,
    batch: int = 64,
    size: int = 32,
    device: str = "cpu",
    precision: Optional[str] = None,
    seed: int = 0,
    **data_options: Any,
) -> Dict[str, Any]:
    """``prunekit eval`` in-process: top-1 error and mean loss on the validation split of
    ``data`` (eval-mode batch norm). Returns ``{"error", "loss", "images"}``."""
    d = _data(data, seed, **data_options)
    error, loss, images = _prunekit.evaluate(_to_numpy_state(weights), d, batch, size, device, precision, seed)
    return {"error": error, "loss": loss, "images": images}


def transfer(
    data: Any,
    *,
    weights: Any,
    budgets: Sequence[float],
    models: str = "dense,filters:0.25,filters:0.5,filters:0.75,channels:0.5",
    seeds: int = 1,
    lr: float = 0.1,
    lrs: Optional[Sequence[float]] = None,
    search_fraction: float = 0.2,
    round_to: int = 8,
    criterion: str = "l1",
    json_path: Optional[Union[str, os.PathLike]] = None,
    plot: Optional[Union[str, os.PathLike]] = None,
    shard: Optional[str] = None,
    runs: Optional[Union[str, os.PathLike]] = None,
    keep_head: bool = False,
    progress: Optional[Callable[[Dict[str, Any]], Any]] = None,
    **options: Any,
) -> Dict[str, Any]:
    """``prunekit transfer`` in-process: for each model (``dense``, ``filters:S``,
    ``channels:S``) and each training-compute budget (GFLOPs), fine-tune ``weights`` on
    ``data`` and evaluate; the compute-optimal model per budget.

    Data and recipe options as in :func:`train`. ``json_path`` (the CLI's ``--json``),
    ``plot`` and ``runs`` are written as the CLI writes them. Ctrl-C stops after the current
    step (finished runs stay in ``runs``) and raises ``KeyboardInterrupt``.

    Returns:
        the report: ``rows`` (a list of dicts: model, budget_gflops, val_error, ...),
        ``optima``, ``runs``, ``settings``, and ``table`` (the text the CLI prints).
    """
    recipe, data_opts, rest = _split_options(options)
    if rest:
        raise TypeError(f"transfer() got unexpected keyword arguments: {', '.join(sorted(rest))}")
    d = _data(data, recipe["seed"], **data_opts)
    job = _prunekit.transfer_start(
        d,
        recipe,
        weights=_to_numpy_state(weights),
        budgets=[float(b) for b in budgets],
        models=models,
        seeds=seeds,
        lrs=[float(x) for x in lrs] if lrs is not None else [float(lr)],
        search_fraction=search_fraction,
        round_to=round_to,
        criterion=criterion,
        json=None if json_path is None else os.fspath(json_path),
        plot=None if plot is None else os.fspath(plot),
        shard=shard,
        runs=None if runs is None else os.fspath(runs),
        keep_head=keep_head,
    )
    report, _, lines = _drive(job, None, progress, "prunekit transfer")
    report["lines"] = lines
    return report


@dataclass
class VerifyReport:
    """The result of :func:`verify`: the report's text, whether every check passed, and
    the groups of tensors that failed."""

    text: str
    ok: bool
    failed: List[str]

    def __str__(self) -> str:
        return self.text

    def __bool__(self) -> bool:
        return self.ok


def verify(
    reference: Union[str, os.PathLike], device: str = "cpu", precision: str = "f32", bn_fusion: str = "none"
) -> VerifyReport:
    """``prunekit verify``: checks the training stack on ``device`` against a reference
    file written by PyTorch (see tests/data/README.md of the project). ``bn_fusion`` is
    ``prunekit verify --bn-fusion``: all, load, dgrad or none (the default)."""
    text, ok, failed = _prunekit.verify(os.fspath(reference), device, precision, bn_fusion)
    return VerifyReport(text, ok, list(failed))


def _as_numpy(x: Any, what: str) -> Tuple[Any, bool]:
    torch = _torch()
    if torch is not None and isinstance(x, torch.Tensor):
        if x.device.type != "cpu":
            raise ValueError(f"{what}: a {x.device.type} tensor; prunekit's kernels here take CPU tensors")
        return x.detach().numpy(), True
    return x, False


def _back(y: np.ndarray, as_tensor: bool):
    return _torch().from_numpy(y) if as_tensor else y


def _out(out: Any) -> Any:
    return None if out is None else _as_numpy(out, "out")[0]


def conv2d(x: Any, w: Any, stride: int = 1, padding: int = 0, out: Any = None):
    """``y = conv2d(x, w)`` on the CPU kernels: x ``[N, H, W, C]`` (NHWC), w
    ``[K, R, S, C]`` (KRSC), float32, C-contiguous (read in place, never copied); returns
    y ``[N, P, Q, K]`` of the kind of ``x`` (numpy array or CPU tensor). ``out``, a
    C-contiguous float32 array or tensor of y's shape, receives y instead of a new array."""
    xa, t = _as_numpy(x, "x")
    wa, _ = _as_numpy(w, "w")
    return _back(_prunekit.conv2d(xa, wa, stride, padding, _out(out)), t)


def conv2d_backward_input(
    dy: Any, w: Any, input_size: Tuple[int, int], stride: int = 1, padding: int = 0, out: Any = None
):
    """The gradient of :func:`conv2d` with respect to x: dx ``[N, H, W, C]`` from dy
    ``[N, P, Q, K]`` and w ``[K, R, S, C]``; ``input_size`` is ``(H, W)``; ``out`` as in
    :func:`conv2d`."""
    da, t = _as_numpy(dy, "dy")
    wa, _ = _as_numpy(w, "w")
    return _back(_prunekit.conv2d_backward_input(da, wa, tuple(input_size), stride, padding, _out(out)), t)


def conv2d_backward_weight(
    x: Any, dy: Any, kernel_size: Tuple[int, int], stride: int = 1, padding: int = 0, out: Any = None
):
    """The gradient of :func:`conv2d` with respect to w: dw ``[K, R, S, C]`` from x
    ``[N, H, W, C]`` and dy ``[N, P, Q, K]``; ``kernel_size`` is ``(R, S)``; ``out`` as in
    :func:`conv2d`."""
    xa, t = _as_numpy(x, "x")
    da, _ = _as_numpy(dy, "dy")
    return _back(_prunekit.conv2d_backward_weight(xa, da, tuple(kernel_size), stride, padding, _out(out)), t)
