"""What a stage-2 method is: :class:`Stage2Method`, and the :class:`Stage2Context` it fits from.

A method is a description plus one function, ``fit(ctx) -> head``: the head maps its input (the
frozen backbone's features ``(N, d)``, or the SWAG feature banks ``(M, N, d)``) to logits
``(N, C)``. The description says what the method needs (a validation split, a SWAG posterior,
augmented feature views, other methods' heads) and whether its head can be deployed;
``longtail classify``, ``sweep``, ``report`` and ``fit`` read nothing else about it. The
methods are listed in :mod:`longtail.classify.registry`.

This module imports no torch: the tensor types are annotations only.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from longtail.core.errors import LongtailError

if TYPE_CHECKING:  # annotations only: importing this module loads no torch
    import torch
    from omegaconf import DictConfig

__all__ = ["INPUTS", "Stage2Context", "Stage2Method"]

# What a head takes: the frozen backbone's features (N, d), or the SWAG feature banks (M, N, d)
INPUTS = ("features", "swag")


@dataclass
class Stage2Context:
    """Everything a stage-2 method may use to fit its head; tensors on the CPU, float32.

    Attributes:
        train_features: ``(N, d)`` training features of the frozen backbone.
        train_labels: ``(N,)`` int64 labels of the training split.
        num_classes: ``C``.
        joint_weight: ``(C, d)`` weights of the stage-1 (joint) classifier.
        joint_bias: ``(C,)`` its bias, or ``None``.
        config: the run's resolved config (``config.stage2`` holds the stage-2 keys).
        seed: the run's seed; seed every random choice from it.
        val_features, val_labels: ``(N_v, d)`` and ``(N_v,)`` of the validation split, or
            ``None`` when the run has none (a method with ``needs_val`` is never called then).
        heads: the heads fitted earlier in this run, by method name (a method lists those it
            reads in ``requires``).
        info: what the method chose and wants recorded (e.g. ``{"tau": 0.6}``); the method
            fills it, ``results.json`` stores it under ``methods.<name>.info``.
        log: where progress notes go.
        views: ``(V, N, d)`` augmented training views when ``stage2.aug_views > 0``, else
            ``None``; only given to methods with ``uses_views``.
        swag_loader: returns the SWAG feature banks ``{split: (bank (M, N_split, d), labels)}``
            (computed on first use and cached); only set when the run has a SWAG posterior.
    """

    train_features: torch.Tensor
    train_labels: torch.Tensor
    num_classes: int
    joint_weight: torch.Tensor
    joint_bias: torch.Tensor | None
    config: DictConfig
    seed: int = 0
    val_features: torch.Tensor | None = None
    val_labels: torch.Tensor | None = None
    heads: dict[str, torch.nn.Module] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    log: Callable[[str], None] = print
    views: torch.Tensor | None = None
    swag_loader: Callable[[], dict] | None = None

    def train_inputs(self) -> torch.Tensor:
        """What to train on: the augmented views ``(V, N, d)`` when the method ``uses_views``
        and ``stage2.aug_views > 0``, else the training features ``(N, d)``
        (:func:`longtail.classify.heads.pick_view` takes either)."""
        return self.views if self.views is not None else self.train_features

    def val(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(val_features (N_v, d), val_labels (N_v,))``.

        Raises:
            LongtailError: the run has no validation split.
        """
        if self.val_features is None or self.val_labels is None:
            raise LongtailError(
                "this method chooses on a validation split and the run has none: set "
                "data.val_per_class > 0 in stage 1 (and declare needs_val=True)"
            )
        return self.val_features, self.val_labels

    def swag(self) -> dict:
        """The SWAG feature banks ``{split: (bank (M, N_split, d), labels (N_split,))}``.

        Raises:
            LongtailError: the run has no SWAG posterior.
        """
        if self.swag_loader is None:
            raise LongtailError(
                "this method needs a SWAG posterior and the run has none: train stage 1 with "
                "swa.enabled=true and swa.swag_rank >= 2 (and declare needs_swag=True)"
            )
        return self.swag_loader()


@dataclass(frozen=True)
class Stage2Method:
    """One stage-2 method, as every part of longtail sees it.

    Attributes:
        name: what ``--method`` and ``stage2.methods`` take, and the row name in every table
            and in ``results.json`` (letters, digits, ``_`` and ``-``; not ``all``).
        fit: ``fit(ctx: Stage2Context) -> head``; the head (an ``nn.Module``) maps its input
            (see ``inputs``) to logits ``(N, C)``. What the method chose goes in ``ctx.info``.
        label: its name in prose (the report's "chosen on the validation split" lines).
        needs_val: chooses something on the validation split (an error without one).
        needs_swag: reads the SWAG feature banks (``ctx.swag()``): skipped with a note on a
            run without a SWAG posterior, and left out of stage 2 on the final SGD model's
            features (``longtail sweep``).
        uses_views: trains on the augmented feature views (``stage2.aug_views``) when there
            are any (``ctx.train_inputs()``).
        inputs: what its head takes at test time: ``"features"`` (``(N, d)``, one backbone
            pass) or ``"swag"`` (the SWAG banks ``(M, N, d)``, M backbone passes).
        deployable: the head can be bundled by ``longtail fit``: it takes ``"features"`` and
            is a :class:`longtail.classify.heads.Head` (it knows how to be saved and rebuilt).
        requires: methods whose heads ``fit`` reads from ``ctx.heads``; they run first.
        implies: methods that always run with this one, right after it (SRepr's ablations).
        plot_weight_norms: its per-class weight norms belong in the report's weight-norm
            figure (Kang et al.'s comparison of linear classifiers).
        describe: the report's line on what it chose, from each run's ``info`` (first run
            first; ``{}`` for a run without the method), or ``None`` for no line; the report
            prefixes ``label: ``.
        color: its colour in the report's figures (a matplotlib colour), or ``None``.
        pins: what it chooses on validation, as ``(info key, config key)`` pairs: setting the
            config key (a grid) to ``[info[key]]`` makes it choose the same again without
            validation deciding anything (``longtail fit``'s re-fit on every labelled image).
    """

    name: str
    fit: Callable[[Stage2Context], torch.nn.Module]
    label: str = ""
    needs_val: bool = False
    needs_swag: bool = False
    uses_views: bool = False
    inputs: str = "features"
    deployable: bool = True
    requires: tuple[str, ...] = ()
    implies: tuple[str, ...] = ()
    plot_weight_norms: bool = False
    describe: Callable[[list[dict]], str | None] | None = None
    color: str | None = None
    pins: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        ok = self.name.replace("_", "").replace("-", "").isalnum() and self.name.isascii()
        if not ok or self.name == "all":
            raise LongtailError(
                f"stage-2 method name {self.name!r} is not usable: give letters, digits, _ or "
                "- (and not 'all', which means every method)"
            )
        if self.inputs not in INPUTS:
            raise LongtailError(
                f"stage-2 method {self.name!r}: inputs={self.inputs!r}; choose one of "
                f"{', '.join(INPUTS)}"
            )
        if self.inputs == "swag" and not self.needs_swag:
            raise LongtailError(
                f"stage-2 method {self.name!r}: its head takes the SWAG banks; set needs_swag=True"
            )
        if self.deployable and self.inputs != "features":
            raise LongtailError(
                f"stage-2 method {self.name!r}: a head that takes {self.inputs!r} cannot be "
                "deployed (the bundle runs one backbone pass); set deployable=False"
            )
        if not self.label:
            object.__setattr__(self, "label", self.name)
