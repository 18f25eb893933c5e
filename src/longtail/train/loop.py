"""Stage 1: train backbone + linear classifier jointly, with SWA and a SWAG posterior.

Read top to bottom: set up the run directory, data, model and optimiser; resume if asked; loop
over epochs (sample, augment, forward, backward, step, average); then re-estimate BatchNorm for
the SWA weights and save the models the second stage needs.
"""

from __future__ import annotations

import copy
import csv
import io
import math
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from omegaconf import DictConfig
from torch.optim.swa_utils import AveragedModel

from longtail.config import diff_configs, load_config, to_yaml
from longtail.core.checkpoint import load_latest_checkpoint, save_checkpoint
from longtail.core.distributed import average_bn_buffers, convert_sync_bn
from longtail.core.errors import LongtailError
from longtail.core.io import (
    atomic_torch_save,
    atomic_write_json,
    atomic_write_text,
    verified_load,
)
from longtail.core.progress import format_seconds, progress
from longtail.core.rundir import RunDir
from longtail.core.runtime import init_distributed, make_runtime, seed_everything
from longtail.data.build import build_data, check_batch_size, make_loaders
from longtail.data.loader import BatchLoader
from longtail.data.samplers import make_sampler
from longtail.evaluate.metrics import evaluate_logits
from longtail.models import autotune, build_model
from longtail.models.inference import collect_outputs
from longtail.train.bn import refresh_bn
from longtail.train.losses import make_loss, mixup
from longtail.train.schedules import lr_at, swa_collect_from, swa_start_epoch
from longtail.train.swag import SWAG

# keys that may change between a run and its resume
RESUME_MUTABLE = (
    "device",
    "optim.grad_clip",
    "checkpoint_every_steps",
    "data.num_workers",
    "data.root",
    "data.list_dir",
    "stage2",
)
# keys that may also differ between a run and one branched off it (``Stage1(branch_from=)``):
# SWA changes nothing before ``swa.start``, where the branch is taken
BRANCH_MUTABLE = (*RESUME_MUTABLE, "swa")


def git_revision() -> str:
    """The source tree's git commit (``unknown`` outside a checkout)."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=5,
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _check_run_dir(cfg: DictConfig, run: RunDir, resume: bool) -> DictConfig:
    """Refuse a resume into a folder that is not a run of the same config, or a new run into a
    started one; writes nothing."""
    out = run.path
    if resume:
        if not run.config_path.is_file():
            raise LongtailError(
                f"--resume: {str(out)!r} holds no {run.CONFIG}; not a run directory"
            )
        old = load_config(run.config_path)
        diffs = diff_configs(old, cfg, ignore=RESUME_MUTABLE)
        if diffs:
            raise LongtailError(
                f"--resume: {out} was made with a different config; differing "
                f"keys: {'; '.join(diffs)}"
            )
    elif run.started:
        raise LongtailError(
            f"{str(out)!r} already holds a training run; pass --resume to "
            "continue it, or choose another --out"
        )
    return cfg


def _asdict_or_none(d: autotune.Decision | None) -> dict | None:
    return None if d is None else asdict(d)


class Stage1:
    """Everything one stage-1 run holds; :meth:`fit` runs it to the end."""

    def __init__(
        self,
        cfg: DictConfig,
        out: str | Path,
        resume: bool = False,
        *,
        branch_from: str | Path | None = None,
    ):
        """``branch_from``: a finished or running SWA run of the same config but for ``swa.*``
        (for ``longtail sweep``'s SGD baseline): a new run starts from its state at the end of
        epoch ``swa.start`` (``branch.pt``), where the two runs' training has been identical,
        with that run's metrics rows up to there. Ignored when ``resume``."""
        self.rundir = RunDir(out)
        self.out = self.rundir.path
        self.rt = make_runtime(
            cfg.device, cfg.precision, cfg.channels_last, bf16_faster=autotune.bf16_faster
        )
        self.rt = init_distributed(self.rt)  # rank 0's precision on every rank
        check_batch_size(cfg.optim.batch_size, self.rt.world_size)
        self.swa_start = swa_start_epoch(cfg)
        self.collect_from = swa_collect_from(cfg)  # snapshots once the lr is swa.lr
        self.cfg = _check_run_dir(cfg, self.rundir, resume)
        seed_everything(cfg.seed, cfg.deterministic)
        self.splits = build_data(cfg)
        check_batch_size(cfg.optim.batch_size, self.rt.world_size, len(self.splits.train))
        self.out.mkdir(parents=True, exist_ok=True)  # the whole config checked: now write
        self.counts = self.splits.train.counts()
        self.loaders = make_loaders(cfg, self.splits, self.rt)
        self.model = build_model(
            cfg.model.name,
            self.splits.train.num_classes,
            self.splits.train.channels,
            weights_path=cfg.model.weights_path,
            kernels=cfg.kernels,
        )
        self.model.to(self.rt.device)
        if self.rt.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.kernel_choices = self._tune_kernels()
        if self.rt.distributed and cfg.sync_bn:
            self.model = convert_sync_bn(self.model, self.rt.device)
        self.net: nn.Module = self.model  # what the training step calls (DDP / compiled)
        if self.rt.distributed:
            ids = [self.rt.device] if self.rt.device.type == "cuda" else None
            self.net = nn.parallel.DistributedDataParallel(self.net, device_ids=ids)
        if cfg.compile:
            self.net = torch.compile(self.net)
        o = cfg.optim
        self.optimizer = torch.optim.SGD(
            self.model.parameters(),
            lr=o.lr,
            momentum=o.momentum,
            nesterov=o.nesterov,
            weight_decay=o.weight_decay,
        )
        self.scaler = torch.amp.GradScaler(enabled=self.rt.dtype == torch.float16)
        self.loss_fn = make_loss(cfg.loss.name, self.counts, cfg.loss.tau, cfg.loss.label_smoothing)
        self.sampler = make_sampler(
            cfg.sampler.name,
            self.splits.train.labels.numpy(),
            seed=cfg.seed,
            q=cfg.sampler.q,
            total_epochs=o.epochs,
            rank=self.rt.rank,
            world_size=self.rt.world_size,
        )
        self.swa_model = AveragedModel(self.model) if self.swa_start is not None else None
        self.swag = SWAG(self.model, cfg.swa.swag_rank) if self.swa_start is not None else None
        # >= 1: check_batch_size compared the batch with this process's draws
        self.steps_per_epoch = self.loaders["train"].num_batches(len(self.sampler), drop_last=True)
        self.epoch, self.step_in_epoch, self.global_step = 0, 0, 0
        self.branched_from: dict | None = None
        # --resume on a run stopped before its first checkpoint: nothing to continue from and
        # nothing to lose, so it starts again from step 0 in the same folder (config checked)
        restart = resume and not self.rundir.resumable
        if restart:
            self._truncate_log(0)
        elif resume:
            self._restore()
        elif branch_from is not None:
            self._branch(RunDir(branch_from))
        # the run's ETA: wall time per step so far in this process (evaluation included)
        self._clock = (time.perf_counter(), self.global_step)
        if self.rt.is_main and (restart or not resume):
            self._write_run_info()
        if self.branched_from is not None:
            self._checkpoint()  # from here on the run resumes like any other
        self.tb = None

    def _tune_kernels(self) -> dict[str, dict]:
        """Under ``kernels=auto``: rank 0 times each kernel pass against PyTorch's op on one
        training step of a copy of the model at the real batch shape (cached per machine, so
        usually instant); every rank adopts rank 0's decisions. Returns them for run.json."""
        mode = autotune.resolve_mode(self.cfg.kernels)
        if mode != "auto" or self.rt.device.type != "cpu" or not hasattr(self.model, "kernels"):
            return {}  # the C kernels are CPU-only, and only CifarResNet has them
        table: dict[str, autotune.Decision] = {}
        if self.rt.is_main:
            bs = min(self.loaders["train"].batch_size, len(self.splits.train))
            probe = BatchLoader(
                self.splits.train, bs, self.rt.device, channels_last=self.rt.channels_last
            )
            x, _ = next(iter(probe.batches(np.arange(bs))))
            table = autotune.tune_model(self.model, x, self.rt.autocast())
        table = autotune.broadcast(table)
        autotune.apply_step_verdict(self.model, table)  # all ranks: the same table
        return {k: asdict(v) for k, v in table.items()}

    # ------------------------------------------------------------------ bookkeeping
    def _write_run_info(self) -> None:
        atomic_write_text(self.rundir.config_path, to_yaml(self.cfg))
        atomic_write_json(
            self.rundir.info_path,
            {
                "git_revision": git_revision(),
                "command": " ".join(sys.argv),
                "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                "device": str(self.rt.device),
                "precision": self.rt.precision,
                "precision_timed": (  # what precision=auto rested on (CPU with oneDNN bf16)
                    _asdict_or_none(autotune.precision_decision())
                    if self.cfg.precision == "auto" and self.rt.device.type == "cpu"
                    else None
                ),
                "world_size": self.rt.world_size,
                "torch": torch.__version__,
                "classes": self.splits.train.classes,
                "data": self.splits.info,
                "swa_start_epoch": self.swa_start,
                "swa_collect_from_epoch": self.collect_from,
                "kernels": autotune.resolve_mode(self.cfg.kernels),
                "kernel_choices": self.kernel_choices,
                "branched_from": self.branched_from,
            },
        )

    def _state(self) -> dict:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "swa_model": self.swa_model.state_dict() if self.swa_model is not None else None,
            "swag": self.swag.state_dict() if self.swag is not None else None,
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "global_step": self.global_step,
            "aug_rng": self.loaders["train"].generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            "world_size": self.rt.world_size,
        }

    def _restore(self) -> None:
        state = load_latest_checkpoint(self.out, map_location=self.rt.device)
        self._load_state(state)
        if self.swa_model is not None and state["swa_model"] is not None:
            self.swa_model.load_state_dict(state["swa_model"])
        if self.swag is not None and state["swag"] is not None:
            self.swag.load_state_dict(state["swag"])
        self._truncate_log(self.epoch)

    def _load_state(self, state: dict) -> None:
        """Model, optimiser, scaler, position and random streams from a saved :meth:`_state`."""
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.step_in_epoch = state["epoch"], state["step_in_epoch"]
        self.global_step = state["global_step"]
        self.loaders["train"].generator.set_state(state["aug_rng"].cpu())
        torch.set_rng_state(state["torch_rng"].cpu())

    def _branch(self, source: RunDir) -> None:
        """Continue from ``source``'s ``branch.pt`` (see ``__init__``); checks first that the
        epochs before the branch would have been trained the same way here."""
        where = f"cannot branch off {str(source.path)!r}"
        if not source.branch_path.is_file():
            raise LongtailError(
                f"{where}: it has no {source.BRANCH} (only runs with SWA write one, at the end "
                "of epoch swa.start); train this run from the start instead"
            )
        diffs = diff_configs(source.config(), self.cfg, ignore=BRANCH_MUTABLE)
        if diffs:
            raise LongtailError(
                f"{where}: the configs differ in keys that shape the epochs before the branch "
                f"({'; '.join(diffs)}); train this run from the start instead"
            )
        state = verified_load(source.branch_path, map_location=self.rt.device)
        epoch = int(state["epoch"])
        if state["step_in_epoch"] != 0 or epoch >= self.cfg.optim.epochs:
            raise LongtailError(
                f"{where}: its branch point (epoch {epoch}) is not an epoch end before this "
                f"run's optim.epochs={self.cfg.optim.epochs}"
            )
        if self.swa_start is not None and self.swa_start < epoch:
            raise LongtailError(
                f"{where}: this run's swa.start (epoch {self.swa_start}) comes before the branch "
                f"point (epoch {epoch}); its lr leaves the schedule earlier"
            )
        self._load_state(state)
        self.branched_from = {"run": str(source.path), "epoch": epoch}
        if self.rt.is_main and source.metrics_path.is_file():
            with open(source.metrics_path, newline="") as f:
                rows = [r for r in csv.DictReader(f) if int(r["epoch"]) <= epoch]
            if rows:
                buf = io.StringIO()
                w = csv.DictWriter(buf, fieldnames=list(rows[0]))
                w.writeheader()
                w.writerows(rows)
                atomic_write_text(self.rundir.metrics_path, buf.getvalue())

    def _truncate_log(self, epochs_done: int) -> None:
        """Drop metrics rows of epochs the resumed run will redo (written after the checkpoint)."""
        path = self.rundir.metrics_path
        if not self.rt.is_main or not path.is_file():
            return
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
        keep = [r for r in rows if int(r["epoch"]) <= epochs_done]
        if len(keep) < len(rows):
            buf = io.StringIO()
            w = csv.DictWriter(buf, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(keep)
            atomic_write_text(path, buf.getvalue())

    def _checkpoint(self) -> None:
        if self.rt.is_main:
            save_checkpoint(self._state(), self.out, self.epoch, self.step_in_epoch)

    def _log(self, row: dict) -> None:
        if not self.rt.is_main:
            return
        path = self.rundir.metrics_path
        new = not path.exists()
        with open(path, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(row))
            if new:
                w.writeheader()
            w.writerow(row)
        if self.tb is None:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(self.rundir.tensorboard_dir))
        for k, v in row.items():
            if k not in ("epoch", "step") and isinstance(v, (int, float)) and math.isfinite(v):
                self.tb.add_scalar(k, v, row["step"])
        self.tb.flush()

    def lr(self, epoch_float: float) -> float:
        o = self.cfg.optim
        return lr_at(
            epoch_float,
            o.lr,
            o.epochs,
            warmup_epochs=o.warmup_epochs,
            schedule=o.schedule,
            milestones=list(o.milestones),
            gamma=o.gamma,
            swa_start=self.swa_start,
            swa_lr=self.cfg.swa.lr,
            swa_anneal_epochs=self.cfg.swa.anneal_epochs,
        )

    def _collecting(self, epoch_float: float) -> bool:
        """Whether a snapshot is due at fractional epoch ``epoch_float`` (lr already swa.lr)."""
        return self.collect_from is not None and epoch_float >= self.collect_from - 1e-9

    def _average(self) -> None:
        self.swa_model.update_parameters(self.model)
        self.swag.collect(self.model)

    def evaluate(self, model: nn.Module, split: str) -> dict:
        """Metrics of ``model`` on ``split`` (``val`` or ``test``)."""
        logits, labels = collect_outputs(
            model, self.loaders[split].batches(), autocast=self.rt.autocast()
        )
        d = self.cfg.data
        return evaluate_logits(logits, labels, self.counts, d.many_shot, d.few_shot)

    # ------------------------------------------------------------------ the loop
    def train_epoch(self) -> dict:
        """One epoch (or its remainder after a resume); returns summary numbers."""
        cfg, rt, e = self.cfg, self.rt, self.epoch
        indices = self.sampler.shard(e, start=self.step_in_epoch * cfg.optim.batch_size)
        if self.step_in_epoch == 0:  # a fresh epoch: augmentation keyed to (seed, epoch, rank)
            self.loaders["train"].generator.manual_seed(cfg.seed * 100_003 + e + 7919 * rt.rank)
        self.net.train()
        total = self.steps_per_epoch
        bar = progress(
            total=total,
            initial=self.step_in_epoch,
            desc=f"epoch {e + 1}/{cfg.optim.epochs}",
            unit="step",
            is_main=rt.is_main,
        )
        loss_sum, correct, seen, t0 = 0.0, 0, 0, time.perf_counter()
        lr = self.optimizer.param_groups[0]["lr"]
        for x, y in self.loaders["train"].batches(indices, drop_last=True):
            lr = self.lr(e + (self.step_in_epoch + 1) / total)
            for g in self.optimizer.param_groups:
                g["lr"] = lr
            target = y
            if cfg.loss.mixup_alpha > 0:
                x, target = mixup(
                    x,
                    y,
                    len(self.counts),
                    alpha=cfg.loss.mixup_alpha,
                    generator=self.loaders["train"].generator,
                )
            with rt.autocast():
                logits = self.net(x)
                loss = self.loss_fn(logits, target)
            if not torch.isfinite(loss):
                good = self.rundir.checkpoints()
                raise LongtailError(
                    f"loss became {loss.item()} at epoch {e + 1}, step {self.step_in_epoch + 1} "
                    f"(lr {lr:.4g}); stopped. The last good checkpoint "
                    f"{str(good[-1]) if good else '(none yet)'} is intact. Resume from it with a "
                    f"gradient clip (longtail train --resume {self.out} optim.grad_clip=1), "
                    "or start a new run "
                    "(another --out) with a lower optim.lr or longer optim.warmup_epochs"
                )
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            if cfg.optim.grad_clip > 0:
                self.scaler.unscale_(self.optimizer)
                nn.utils.clip_grad_norm_(self.model.parameters(), cfg.optim.grad_clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.step_in_epoch += 1
            self.global_step += 1
            loss_sum += loss.item() * len(y)
            correct += int((logits.argmax(1) == y).sum())
            seen += len(y)
            every = cfg.swa.every_steps
            if (
                every > 0
                and self.global_step % every == 0
                and self._collecting(e + self.step_in_epoch / total)
            ):
                self._average()
            if cfg.checkpoint_every_steps and self.global_step % cfg.checkpoint_every_steps == 0:
                self._checkpoint()
            if not bar.disable:
                bar.set_postfix_str(self._progress_text(loss.item(), lr, seen, t0), refresh=False)
                bar.update()
        bar.close()
        dt = time.perf_counter() - t0
        if cfg.swa.every_steps == 0 and self._collecting(e + 1):
            self._average()
        return {
            "lr": lr,
            "train_loss": loss_sum / max(seen, 1),
            "train_acc": correct / max(seen, 1),
            "img_per_s": seen * rt.world_size / max(dt, 1e-9),
            "epoch_seconds": dt,
        }

    def _progress_text(self, loss: float, lr: float, seen: int, t0: float) -> str:
        """The bar's postfix: loss, lr, images per second (all ranks) and the run's ETA."""
        now = time.perf_counter()
        rate = seen * self.rt.world_size / max(now - t0, 1e-9)
        start, step0 = self._clock
        done = self.global_step - step0
        left = self.cfg.optim.epochs * self.steps_per_epoch - self.global_step
        eta = format_seconds((now - start) / done * left) if done > 0 else "?"
        return f"loss={loss:.3f} lr={lr:.3g} img/s={rate:.0f} run ETA {eta}"

    def fit(self) -> dict:
        """Train to the last epoch, then finalise SWA/SWAG; returns the test metrics."""
        cfg = self.cfg
        while self.epoch < cfg.optim.epochs:
            stats = self.train_epoch()
            row = {"epoch": self.epoch + 1, "step": self.global_step, **stats}
            if "val" in self.loaders:
                v = self.evaluate(self.model, "val")
                row.update(val_acc=v["accuracy"], val_nll=v["nll"], val_ece=v["ece"])
            row["swa_snapshots"] = self.swag.n if self.swag is not None else 0
            self._log(row)
            if self.rt.is_main:
                msg = " ".join(
                    f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                    for k, v in row.items()
                    if k != "step"
                )
                print(msg, flush=True)
            self.epoch, self.step_in_epoch = self.epoch + 1, 0
            self._checkpoint()
            if self.epoch == self.swa_start and self.rt.is_main:
                # nothing is averaged or collected yet, and a branch starts its own SWA state:
                # without it (SWAG's float64 moments) ResNet-32's file is 3.8 MB, not 13.2
                branch = {**self._state(), "swa_model": None, "swag": None}
                atomic_torch_save(branch, self.rundir.branch_path)
        return self.finish()

    def finish(self) -> dict:
        """Save the final and SWA models (BN re-estimated) and their test metrics."""
        results = {"final": self.evaluate(self.model, "test")}
        if self.rt.is_main:
            atomic_torch_save(self.model.state_dict(), self.rundir.model_path("final"))
        if self.swa_model is not None and self.swag.n > 0:
            swa = copy.deepcopy(self.swa_model.module)
            refresh_bn(swa, self.bn_batches(), self.rt.autocast())
            average_bn_buffers(swa)
            results["swa"] = self.evaluate(swa, "test")
            if "val" in self.loaders:
                results["swa_val"] = self.evaluate(swa, "val")
            if self.rt.is_main:
                atomic_torch_save(swa.state_dict(), self.rundir.model_path("swa"))
                atomic_torch_save(self.swag.state_dict(), self.rundir.swag_path)
        if "val" in self.loaders:
            results["final_val"] = self.evaluate(self.model, "val")
        if self.rt.is_main:
            atomic_write_json(self.rundir.stage1_path, results)  # last: the run is finished
            if self.tb is not None:
                self.tb.close()
        return results

    def bn_batches(self):
        """Augmented training batches for BatchNorm re-estimation (``swa.bn_batches`` caps)."""
        loader = self.loaders["train"]
        idx = np.random.default_rng(self.cfg.seed).permutation(len(self.splits.train))
        limit = self.cfg.swa.bn_batches
        if limit > 0:
            idx = idx[: limit * self.cfg.optim.batch_size]
        return loader.batches(idx[self.rt.rank :: self.rt.world_size])
