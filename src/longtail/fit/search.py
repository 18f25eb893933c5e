"""Which stage-1 recipes ``longtail fit`` tries, and how it chooses among them by measurement.

The recipe knobs a small long-tailed folder is most sensitive to are searched, each only when
the user did not set it: the mixup strength (``loss.mixup_alpha`` in :data:`MIXUP_GRID`, 0.2
first: the one rung-1 candidate that always runs, even when the budget leaves room for no other) and
the schedule length (``optim.epochs``). Everything else follows :func:`longtail.fit.plan.recipe`.

Successive halving within a time budget (:class:`SearchPlan`):

1. **rung 1**: every mixup strength trains the short schedule, ``E1 = clamp(ceil(40,000 / N),
   20, 100)`` epochs for ``N`` training images (about 40k images seen), then stage 2; a
   candidate that would leave no room for rung 2 is skipped when rung 2 fits without it
   (:func:`rung1_crowds_out_rung2`: on a slow CPU the schedule length is worth more than
   another mixup strength). The strongest mixup (the grid's last) skips rung 1 when a rung 2
   fits: step 2 would send it there whatever its short run scored, so that run would only
   take time from the long schedule;
2. **rung 2**, the long schedule ``E2``, trains the strongest mixup (the search's default)
   alone, and with it rung 1's best only when the budget gives both the same capped schedule
   (:func:`rung2_plan`; :func:`survivors` when the strongest mixup ran in rung 1). ``E2`` is
   sized from what rung 1 *measured* on this machine (seconds per epoch, seconds of
   stage 2) so that rung 2 and the final re-fit on every labelled image fit in what is left of
   the budget; at most ``8 E1`` and at most 200 epochs; no rung 2 when fewer than ``1.5 E1``
   epochs fit;
3. the search's default, rung 2's strongest mixup (:func:`search_default`), is chosen unless
   the candidate with the best hold-out score leads it by more than two bootstrap sds of
   their gap (:func:`overturns`): the best of three or four noisy scores is biased upwards,
   and on a development folder every smaller lead of docs/RESULTS.md's benchmark fits was
   wrong. Without a rung 2 the best hold-out score wins (:func:`choose_candidate`).

A candidate's score is the balanced accuracy (mean of per-class accuracies) of its chosen
stage-2 method on the hold-out images that choose: the validation split, or the validation and
internal test splits together when the bundle is re-fitted on everything
(:mod:`longtail.fit.select`, "Which images decide"). How much of a difference those images
can resolve is measured by a stratified paired bootstrap over them
(:func:`longtail.evaluate.bootstrap.bootstrap_gaps`):
each candidate's (or method's) gap to the best on all of them, and the standard deviation of
that gap over its resamples. Methods use the spread to prefer the simpler one
(:func:`longtail.fit.select.choose`); the recipe table reports it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

MIXUP_GRID = (0.2, 0.0, 1.0)  # the plan's small-data default first: it runs even on a tight budget
SURVIVORS = 2
SHORT_IMAGES = 40_000  # rung 1 sees about this many images
SHORT_MIN, SHORT_MAX = 20, 100  # rung 1's epochs at least / at most
LONG_FACTOR = 8  # rung 2 trains at most this many times rung 1's epochs (docs/METHODS.md: why)
LONG_MAX = 200  # and at most this many epochs: the published stage-1 length (long_epochs: why)
MIN_GAIN_FACTOR = 1.5  # no rung 2 unless it can train this many times rung 1's epochs
OVERRUN = 0.05  # a rung-2 candidate is skipped when the fit would end this fraction past the budget
OVERTURN_SD = 2.0  # the hold-out's best replaces the search's default only by more (overturns)


def short_epochs(n_train: int) -> int:
    """Rung 1's epochs for ``n_train`` training images: ``clamp(ceil(40,000 / N), 20, 100)``."""
    return int(min(max(math.ceil(SHORT_IMAGES / max(n_train, 1)), SHORT_MIN), SHORT_MAX))


def long_epochs(
    *,
    short: int,
    seconds_per_epoch: float,
    stage2_seconds: float,
    seconds_left: float,
    survivors: int,
    refit_ratio: float,
) -> int | None:
    """Rung 2's epochs: the most that fit in ``seconds_left``, or ``None`` (no rung 2).

    Args:
        short: rung 1's epochs ``E1``.
        seconds_per_epoch: measured stage-1 seconds per epoch on the search's training split.
        stage2_seconds: measured seconds of one stage 2 (features, every method).
        seconds_left: budget left for rung 2 and the final re-fit.
        survivors: candidates in rung 2.
        refit_ratio: (images of the re-fit) / (images of the search's training split), or 0
            without a re-fit.

    Returns:
        ``E2 = floor((seconds_left - R stage2_seconds) / (seconds_per_epoch (survivors +
        refit_ratio)))`` with ``R = survivors + 1`` stage-2 runs (``survivors`` without a
        re-fit), capped at ``8 E1`` and at :data:`LONG_MAX` (200) epochs; ``None`` when
        ``E2 < 1.5 E1`` or the budget is not finite.

    Why 200 epochs at most: it is the stage-1 length of the published decoupled recipes on
    CIFAR-LT, whose folders are the size ``fit`` is for (Kang et al. 2020; MiSLAS trains mixup
    1 for 200; ../shared/docs/METHOD.md). Past it a small folder is re-seen so often that its
    training set is memorised, where re-trained heads lose (docs/RESULTS.md, issue 18). On the
    IF 100 benchmark folder (1,236 images, 895 in the search's training split) one rung-2 run
    of 213-264 epochs lost 2.8 points of re-fit accuracy on the mean of three seeds to two runs
    of 168-193; at IF 50 (2,795 images) 106-118 epochs gained on 70-77 (docs/RESULTS.md, "One
    long run, not adopted"); capped, IF 100 trained 199-200 and IF 50 95-134 ("Rung 2 alone,
    capped at 200 epochs").
    """
    if not math.isfinite(seconds_left):
        return None
    runs = survivors + refit_ratio
    room = seconds_left - (survivors + (1 if refit_ratio else 0)) * stage2_seconds
    if runs <= 0 or seconds_per_epoch <= 0 or room <= 0:
        return None
    e2 = min(int(room / (seconds_per_epoch * runs)), LONG_FACTOR * short, LONG_MAX)
    return e2 if e2 >= MIN_GAIN_FACTOR * short else None


def rung2_plan(
    *,
    candidates: int,
    short: int,
    seconds_per_epoch: float,
    stage2_seconds: float,
    seconds_left: float,
    refit_ratio: float,
) -> tuple[int, int] | None:
    """How many rung-1 candidates go on to rung 2, and for how many epochs, or ``None``.

    The longest schedule one survivor can train (:func:`long_epochs`), with as many survivors
    (at most :data:`SURVIVORS`, at most ``candidates``) as still train that same schedule: a
    second rung-2 run is trained only when it costs the first no epochs (both at the cap,
    ``min(8 E1, 200)``). Why: with the search's default kept unless overturned by more than two sds
    (:func:`overturns`), the second run was the better network on a development folder of
    unused training images on 1 of 17 benchmark fits (by 0.27 points) and never overturned the
    default, while its seconds cost the default about a third of its epochs, and the default's
    epochs are what its accuracy followed (docs/RESULTS.md, "One long run").

    Args:
        candidates: rung-1 candidates trained so far, counting the strongest mixup when it
            goes straight to rung 2.
        short, seconds_per_epoch, stage2_seconds, seconds_left, refit_ratio: as in
            :func:`long_epochs` (seconds of wall time, epochs).

    Returns:
        ``(survivors, E2)``, or ``None`` when not even one survivor's long schedule fits.
    """
    speed = dict(
        short=short,
        seconds_per_epoch=seconds_per_epoch,
        stage2_seconds=stage2_seconds,
        seconds_left=seconds_left,
        refit_ratio=refit_ratio,
    )
    e2 = long_epochs(survivors=1, **speed) if candidates >= 1 else None
    if e2 is None:
        return None
    most = min(SURVIVORS, candidates)
    k = max(k for k in range(1, most + 1) if long_epochs(survivors=k, **speed) == e2)
    return k, e2


def rung2_next_fits(
    *,
    candidate_seconds: float,
    candidate_stage1_seconds: float,
    seconds_left: float,
    refit_ratio: float,
    budget_seconds: float,
) -> bool:
    """Whether another rung-2 candidate and the re-fit still end within the budget.

    Rung 2 was sized from rung 1's speed (:func:`rung2_plan`); the machine can slow down after
    that (a shared or throttled CPU: 12 % between rung 1 and rung 2 on one fit of
    docs/RESULTS.md, which ended 72 s past 15 minutes). Before each rung-2 candidate after the
    first, the one just trained measures the speed again: the next one takes as long as it did,
    and the re-fit its stage 1 times ``refit_ratio`` plus one stage 2 (the re-fit may repeat a
    rung-1 candidate instead, which only ends sooner).

    Args:
        candidate_seconds: wall seconds of the rung-2 candidate just trained (stage 1 + 2).
        candidate_stage1_seconds: of its stage 1 alone.
        seconds_left: seconds until the budget's end.
        refit_ratio: (re-fit images) / (search training images), or 0 without a re-fit.
        budget_seconds: the whole budget, seconds.

    Returns:
        False when the predicted end lies more than :data:`OVERRUN` of the budget past it
        (the prediction is within a few per cent on the fits of docs/RESULTS.md: a tighter
        rule would skip candidates that fit).
    """
    stage2 = candidate_seconds - candidate_stage1_seconds
    refit = candidate_stage1_seconds * refit_ratio + stage2 if refit_ratio else 0.0
    return candidate_seconds + refit <= seconds_left + OVERRUN * budget_seconds


def rung1_crowds_out_rung2(
    *,
    candidates: int,
    candidate_seconds: float,
    short: int,
    seconds_per_epoch: float,
    stage2_seconds: float,
    seconds_left: float,
    refit_ratio: float,
) -> bool:
    """Whether one more rung-1 candidate would take the time a long schedule needs.

    True when a rung 2 fits now (:func:`rung2_plan` with the ``candidates`` trained so far) but
    no longer after another candidate of ``candidate_seconds``: the search then stops rung 1
    and trains the long schedule instead of another mixup strength at the short one. A slow
    CPU gets fewer mixup strengths and a schedule that is still chosen by measurement (short
    against long), rather than three short candidates and a short re-fit (docs/METHODS.md,
    "Search", gives the measurement this rests on).
    """
    speed = dict(
        short=short,
        seconds_per_epoch=seconds_per_epoch,
        stage2_seconds=stage2_seconds,
        refit_ratio=refit_ratio,
    )
    now = rung2_plan(candidates=candidates, seconds_left=seconds_left, **speed)
    after = rung2_plan(
        candidates=candidates + 1, seconds_left=seconds_left - candidate_seconds, **speed
    )
    return now is not None and after is None


@dataclass
class Candidate:
    """One stage-1 recipe tried by the search, and what it measured.

    Attributes:
        name: ``mixup<alpha>-e<epochs>``; ``mixup_alpha``, ``epochs``: the searched knobs.
        rung: 1 or 2; ``run_dir``: its run directory.
        method: its chosen stage-2 method; ``val``: that method's validation figures
            (``balanced_accuracy``, ``nll_ts``, ...; fractions, NLL in nats);
            ``test``: the same on the test split.
        seconds: wall time of its stage 1 + stage 2; ``stage1_seconds``: of stage 1 alone.
        gap: (gap, std): the best candidate's hold-out balanced accuracy minus this one's on
            the images that choose, and its sd over the bootstrap (fractions).
        pooled: the figures on validation and test together when both choose, else ``None``.
    """

    name: str
    mixup_alpha: float
    epochs: int
    rung: int
    run_dir: str = ""
    method: str = ""
    val: dict = field(default_factory=dict)
    test: dict = field(default_factory=dict)
    seconds: float = 0.0
    stage1_seconds: float = 0.0
    gap: tuple[float, float] = (0.0, 0.0)
    pooled: dict | None = None

    @property
    def choice(self) -> dict:
        """The figures that choose: ``pooled`` when validation and test choose, else ``val``."""
        return self.pooled if self.pooled is not None else self.val

    @property
    def score(self) -> float:
        """Hold-out balanced accuracy of the chosen method (a fraction; :attr:`choice`)."""
        return float(self.choice.get("balanced_accuracy", float("nan")))

    def to_json(self) -> dict:
        """A JSON-ready dict."""
        return {
            "name": self.name,
            "mixup_alpha": self.mixup_alpha,
            "epochs": self.epochs,
            "rung": self.rung,
            "run_dir": self.run_dir,
            "method": self.method,
            "val": self.val,
            "test": self.test,
            "seconds": self.seconds,
            "stage1_seconds": self.stage1_seconds,
            "gap_to_best": {"gap": self.gap[0], "std": self.gap[1]},
            **({"val_and_test": self.pooled} if self.pooled is not None else {}),
        }


def measured_speed(candidates: list[Candidate]) -> dict[str, float]:
    """What the trained candidates measured on this machine: the median stage-1 seconds per
    epoch (``seconds_per_epoch``) and the median seconds of one stage 2 (``stage2_seconds``),
    ready to pass to :func:`rung2_plan`."""
    per_epoch = sorted(c.stage1_seconds / c.epochs for c in candidates)
    stage2 = sorted(c.seconds - c.stage1_seconds for c in candidates)
    mid = len(candidates) // 2
    return {"seconds_per_epoch": per_epoch[mid], "stage2_seconds": stage2[mid]}


def candidate_name(mixup_alpha: float, epochs: int) -> str:
    """``mixup<alpha>-e<epochs>``, e.g. ``mixup0.2-e24``."""
    return f"mixup{mixup_alpha:g}-e{epochs}"


def ranked(candidates: list[Candidate]) -> list[Candidate]:
    """Best hold-out score first (ties: lower calibrated hold-out NLL)."""
    return sorted(candidates, key=lambda c: (-round(c.score, 9), c.choice.get("nll_ts", 0.0)))


def survivors(candidates: list[Candidate], k: int = SURVIVORS) -> list[Candidate]:
    """Rung 2's candidates: the ``k`` best by hold-out score (ties: lower calibrated hold-out
    NLL), best first, except that with ``k >= 2`` the last place goes to the strongest mixup
    when rung 1 ranked it out.

    Why: a short schedule ranks mixup strengths by how fast they fit, not by where they end
    (mixup's gain needs a long schedule: Zhang et al. 2018 train 200 epochs, MiSLAS stage 1 as
    long). On the IF 50 folder of docs/RESULTS.md mixup 1 ranked last of three in rung 1 on 4 of
    6 fits, while at 80 epochs it beat mixup 0.2 on the test folder on all three seeds (+0.8 to
    +1.7 points; "The short schedule cannot rank mixup"). The hold-out still chooses between
    the two at the long schedule.
    """
    keep = ranked(candidates)[:k]
    strongest = max(candidates, key=lambda c: c.mixup_alpha, default=None)
    if k >= 2 and strongest is not None and strongest not in keep:
        keep[-1] = strongest
    return keep


def choose_candidate(candidates: list[Candidate]) -> Candidate:
    """The best hold-out score; ties (to 1e-9) go to fewer epochs, then lower NLL."""
    return min(
        candidates, key=lambda c: (-round(c.score, 9), c.epochs, c.choice.get("nll_ts", 0.0))
    )


def search_default(candidates: list[Candidate]) -> Candidate | None:
    """The recipe the search keeps unless the hold-out clearly prefers another: rung 2's
    strongest mixup (the long schedule with the most regularisation, as the published
    decoupled recipes train stage 1: MiSLAS, mixup alpha 1 for 200 epochs), or ``None`` without
    a rung 2 (a short schedule cannot rank mixup, :func:`survivors`; then the best hold-out
    score decides alone)."""
    long = [c for c in candidates if c.rung == 2]
    return max(long, key=lambda c: c.mixup_alpha) if long else None


def overturns(challenger: Candidate) -> bool:
    """Whether ``challenger``, the best hold-out score, replaces the search's default
    (:func:`search_default`): its lead over the default is more than :data:`OVERTURN_SD`
    bootstrap sds. ``challenger.gap`` must hold the default's balanced accuracy minus the
    challenger's and its sd (fractions; :func:`longtail.evaluate.bootstrap.bootstrap_gaps` with
    the default as the reference), so a lead is a negative gap.

    Why two sds: the hold-out's best is the maximum of three or four noisy scores (the winner's
    curse), and the rare classes that decide hold 4-10 hold-out images each. On a development
    folder of Fashion-MNIST training images that no benchmark fit trains on (docs/RESULTS.md,
    "The search's default stands within two sds"), the hold-out's best differed from the
    default on 7 of 26 benchmark fits, by 0.05 to 1.6 sds, and on all 7 the default scored
    higher (+0.7 to +2.0 points); the development folder, not the test folder, set this rule.
    """
    gap, sd = challenger.gap
    return -gap > OVERTURN_SD * sd


def search_table(candidates: list[Candidate], chosen: str, why: str = "") -> str:
    """One line per candidate: rung, method, validation, test and choosing figures, seconds;
    ``why`` the choice (default: the best hold-out balanced accuracy)."""
    pooled = all(c.pooled is not None for c in candidates)
    on = "validation + internal test (v+t)" if pooled else "validation"
    lines = [
        f"recipe search: chosen on {on}"
        + ("" if pooled else ", test reported only")
        + f"; % and nats; gap: best - this over the {'v+t' if pooled else 'validation'} bootstrap",
        f"{'candidate':<18} rung  {'method':<13} val bal  test bal"
        + ("  v+t bal" if pooled else "")
        + "   gap (± sd)      NLL  seconds",
    ]
    for c in candidates:
        star = "*" if c.name == chosen else " "
        vb = c.val.get("balanced_accuracy", float("nan"))
        tb = c.test.get("balanced_accuracy", float("nan"))
        nll = c.choice.get("nll_ts", float("nan"))
        lines.append(
            f"{c.name + star:<18} {c.rung:>4}  {c.method:<13} {100 * vb:7.2f}  {100 * tb:8.2f}"
            + (f"  {100 * c.score:7.2f}" if pooled else "")
            + f"  {100 * c.gap[0]:5.2f} ± {100 * c.gap[1]:4.2f}  {nll:7.3f}  {c.seconds:7.0f}"
        )
    lines.append(f"* chosen: {chosen} ({why or f'best {on} balanced accuracy'})")
    return "\n".join(lines)
