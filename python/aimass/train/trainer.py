"""Trainer: a torch training loop, data-parallel under mpirun, with exact resume."""
from __future__ import annotations

import json
import os
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np

from . import checkpoint as _ckpt
from .distill import distill_loss


class Callback:
    """Hooks called on every rank. Set ``trainer.stop_training = True`` to stop after the current step."""

    def on_train_begin(self, trainer: "Trainer") -> None: ...
    def on_step_end(self, trainer: "Trainer", step: int, loss: float) -> None: ...
    def on_epoch_end(self, trainer: "Trainer", epoch: int, metrics: dict) -> None: ...
    def on_train_end(self, trainer: "Trainer") -> None: ...


def _under_mpirun() -> bool:
    return any(k in os.environ for k in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "MPI_LOCALNRANKS"))


class Trainer:
    """Fits a torch model on batches from an aimass.data.Loader (or any iterable of batches).

    Under ``mpirun -np N`` (or after ``aimass.dist.init()``) it trains data-parallel: parameters and
    optimizer state are broadcast from rank 0 at the start, the optimizer is wrapped in
    aimass.dist.DistributedOptimizer (gradients averaged while backward runs), each rank reads its
    shard of the loader, and validation metrics are summed over ranks. In one process the same
    code runs with world size 1.

    Batches are dicts (``input_key`` -> inputs, ``label_key`` -> targets) or (inputs, targets)
    pairs; ``batch_fn(batch) -> (inputs, targets)`` overrides both. With ``teacher`` the loss is
    :func:`distill_loss` (kd_alpha * KL * T^2 + (1 - kd_alpha) * loss_fn).

    ``checkpoint_dir``: rank 0 writes a checkpoint (model, optimizer, scheduler, every rank's loader
    position and random states, epoch and step) atomically with a sha256 every ``checkpoint_every``
    steps (0: at each epoch's end) and at the end; ``fit(resume=True)`` continues from it, mid-epoch
    included, to bitwise the same weights as an uninterrupted run. Per-epoch metrics are appended to
    ``<log_dir>/metrics.jsonl`` (log_dir defaults to checkpoint_dir), and written as TensorBoard
    events when tensorboard is installed."""

    def __init__(self, model, optimizer, loss_fn: Callable, train_loader, val_loader=None, epochs: int = 1,
                 checkpoint_dir: Optional[str] = None, callbacks: Sequence[Callback] = (), teacher=None,
                 kd_temperature: float = 4.0, kd_alpha: float = 0.5, scheduler=None, checkpoint_every: int = 0,
                 log_dir: Optional[str] = None, progress: bool = True, input_key: Optional[str] = None,
                 label_key: str = "label", batch_fn: Optional[Callable] = None, keep_checkpoints: int = 2):
        import torch
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"Trainer: model must be a torch.nn.Module, got {type(model).__name__}")
        if not callable(loss_fn):
            raise TypeError("Trainer: loss_fn must be callable (e.g. torch.nn.functional.cross_entropy)")
        for nm, v, lo in (("epochs", epochs, 1), ("checkpoint_every", checkpoint_every, 0),
                          ("keep_checkpoints", keep_checkpoints, 1)):
            if not isinstance(v, int) or isinstance(v, bool) or v < lo:
                raise ValueError(f"Trainer: {nm} must be an int >= {lo}, got {v!r}")
        if teacher is not None and not isinstance(teacher, torch.nn.Module):
            raise TypeError(f"Trainer: teacher must be a torch.nn.Module, got {type(teacher).__name__}")
        if kd_temperature <= 0 or not 0 <= kd_alpha <= 1:
            raise ValueError(f"Trainer: kd_temperature must be > 0 and kd_alpha in [0, 1], "
                             f"got {kd_temperature} and {kd_alpha}")
        from .. import dist
        if _under_mpirun() or dist.is_initialized():
            dist.init()
            self.rank, self.world = dist.rank(), dist.size()
        else:
            self.rank, self.world = 0, 1
        for nm, ld in (("train_loader", train_loader), ("val_loader", val_loader)):
            ws = getattr(ld, "world_size", None)
            if ws is not None and ws != self.world:
                raise ValueError(f"Trainer: {nm} is sharded for world size {ws} but this job has {self.world} "
                                 "rank(s); build the Loader without rank/world_size (aimass.dist decides)")
        self.model, self.loss_fn = model, loss_fn
        self.train_loader, self.val_loader = train_loader, val_loader
        self.epochs, self.checkpoint_dir = epochs, (os.path.abspath(checkpoint_dir) if checkpoint_dir else None)
        self.callbacks = list(callbacks)
        self.teacher, self.kd_temperature, self.kd_alpha = teacher, float(kd_temperature), float(kd_alpha)
        self.scheduler, self.checkpoint_every = scheduler, checkpoint_every
        self.log_dir = os.path.abspath(log_dir) if log_dir else self.checkpoint_dir
        self.progress = progress and self.rank == 0
        self.input_key, self.label_key, self.batch_fn = input_key, label_key, batch_fn
        self.keep_checkpoints = keep_checkpoints
        self._base_opt = optimizer._opt if isinstance(optimizer, dist.DistributedOptimizer) else optimizer
        if self.world > 1 and not isinstance(optimizer, dist.DistributedOptimizer):
            optimizer = dist.DistributedOptimizer(optimizer, model.named_parameters())
        self.optimizer = optimizer
        self.step = 0
        self.epoch = 0
        self.history: List[dict] = []
        self.stop_training = False
        self._tb = None

    # ------------------------------------------------------------ batches
    def _split(self, batch):
        if self.batch_fn is not None:
            return self.batch_fn(batch)
        if isinstance(batch, dict):
            if self.label_key not in batch:
                raise KeyError(f"Trainer: batch has no label field {self.label_key!r}; fields: {sorted(batch)}")
            key = self.input_key
            if key is None:
                others = [k for k in batch if k != self.label_key]
                if len(others) != 1:
                    raise ValueError(f"Trainer: batches have fields {sorted(batch)}; pass input_key= to say "
                                     "which is the model's input")
                key = others[0]
            return batch[key], batch[self.label_key]
        if isinstance(batch, (tuple, list)) and len(batch) == 2:
            return batch[0], batch[1]
        raise TypeError(f"Trainer: a batch must be a dict or an (inputs, targets) pair, got {type(batch).__name__}")

    def _sum_across_ranks(self, values: List[float], name: str) -> np.ndarray:
        a = np.asarray(values, dtype=np.float64)
        if self.world == 1:
            return a
        from .. import dist
        return np.asarray(dist.allreduce(a, op="sum", name=name))

    # ------------------------------------------------------------ evaluation
    def evaluate(self, loader) -> Dict[str, float]:
        """Loss (and accuracy for class logits) over `loader`, summed over every rank's shard."""
        import torch
        was = self.model.training
        self.model.eval()
        loss_sum = correct = n = 0.0
        with torch.no_grad():
            for batch in loader:
                x, y = self._split(batch)
                out = self.model(x)
                b = int(y.shape[0])
                loss_sum += float(self.loss_fn(out, y)) * b
                if out.dim() == 2 and y.dim() == 1 and not torch.is_floating_point(y):
                    correct += float((out.argmax(1) == y).sum())
                n += b
        self.model.train(was)
        loss_sum, correct, n = self._sum_across_ranks([loss_sum, correct, n], "trainer.eval")
        if n == 0:
            raise ValueError("evaluate: the loader gave no batches")
        return {"loss": float(loss_sum / n), "accuracy": float(correct / n), "samples": int(n)}

    # ------------------------------------------------------------ checkpoints
    def _state(self, running) -> Dict[str, Any]:
        per_rank = _ckpt.gather_objects({"rng": _ckpt.rng_state(), "loader": self._loader_state(),
                                          "running": list(running)}, self.world)
        return {"model": self.model.state_dict(), "optimizer": self._base_opt.state_dict(),
                "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
                "ranks": per_rank, "world_size": self.world, "epoch": self.epoch, "step": self.step,
                "history": self.history}

    def _loader_state(self):
        sd = getattr(self.train_loader, "state_dict", None)
        return sd() if callable(sd) else None

    def save_checkpoint(self, running=(0.0, 0.0, 0.0, 0.0)) -> Optional[str]:
        """Write a checkpoint now (collective: every rank must call it)."""
        if self.checkpoint_dir is None:
            return None
        state = self._state(running)
        path = None
        if self.rank == 0:
            path = _ckpt.save(self.checkpoint_dir, state, self.step, keep=self.keep_checkpoints)
        if self.world > 1:
            from .. import dist
            dist.barrier(name="trainer.ckpt")
        return path

    def _restore(self):
        state = _ckpt.load(self.checkpoint_dir)
        if state["world_size"] != self.world:
            raise ValueError(f"resume: the checkpoint in {self.checkpoint_dir} was written by {state['world_size']} "
                             f"rank(s); this job has {self.world}. Resume with the same mpirun -np")
        self.model.load_state_dict(state["model"])
        self._base_opt.load_state_dict(state["optimizer"])
        if self.scheduler is not None and state["scheduler"] is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        mine = state["ranks"][self.rank]
        if mine["loader"] is not None:
            self.train_loader.load_state_dict(mine["loader"])
        _ckpt.set_rng_state(mine["rng"])
        self.epoch, self.step, self.history = state["epoch"], state["step"], list(state["history"])
        return tuple(mine["running"]), (mine["loader"] or {}).get("batch", 0)

    # ------------------------------------------------------------ logging
    def _log(self, row: dict) -> None:
        self.history.append(row)
        if self.rank != 0 or self.log_dir is None:
            return
        os.makedirs(self.log_dir, exist_ok=True)
        with open(os.path.join(self.log_dir, "metrics.jsonl"), "a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())
        if self._tb is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self._tb = SummaryWriter(os.path.join(self.log_dir, "tensorboard"))
            except ImportError:
                self._tb = False
        if self._tb:
            for k, v in row.items():
                if k not in ("epoch", "step") and isinstance(v, (int, float)):
                    self._tb.add_scalar(k, v, row["epoch"])
            self._tb.flush()

    def _rewrite_log(self) -> None:
        """On resume: metrics.jsonl keeps exactly the epochs the checkpoint had finished."""
        if self.rank != 0 or self.log_dir is None:
            return
        from .._io import atomic_write_text
        os.makedirs(self.log_dir, exist_ok=True)
        atomic_write_text(os.path.join(self.log_dir, "metrics.jsonl"),
                          "".join(json.dumps(r) + "\n" for r in self.history))

    # ------------------------------------------------------------ training
    def _loss(self, out, x, y):
        if self.teacher is None:
            return self.loss_fn(out, y)
        import torch
        with torch.no_grad():
            t = self.teacher(x)
        return distill_loss(out, t, y, self.kd_temperature, self.kd_alpha, task_loss=self.loss_fn)

    def fit(self, resume: bool = False) -> List[dict]:
        """Train for the remaining epochs; returns the per-epoch metrics (also in self.history)."""
        import torch
        from tqdm.auto import tqdm
        running = (0.0, 0.0, 0.0, 0.0)  # loss sum, correct, samples, steps of the current epoch
        start_batch = 0
        resumed = False
        if resume:
            if self.checkpoint_dir is None:
                raise ValueError("fit(resume=True) needs checkpoint_dir")
            if _ckpt.latest(self.checkpoint_dir) is not None:
                running, start_batch = self._restore()
                resumed = True
        if self.world > 1:
            from .. import dist
            dist.broadcast_parameters(self.model.state_dict(), root_rank=0)
            dist.broadcast_optimizer_state(self.optimizer, root_rank=0)
        self._rewrite_log()  # a fresh run starts a fresh metrics.jsonl; a resumed one keeps finished epochs
        if self.teacher is not None:
            self.teacher.eval()
        for cb in self.callbacks:
            cb.on_train_begin(self)
        self.model.train()
        self.stop_training = False
        while self.epoch < self.epochs and not self.stop_training:
            epoch = self.epoch
            if hasattr(self.train_loader, "set_epoch") and not (resumed and start_batch):
                self.train_loader.set_epoch(epoch)
            resumed = False
            loss_sum, correct, seen, steps = running
            n_batches = len(self.train_loader) if hasattr(self.train_loader, "__len__") else None
            bar = tqdm(total=n_batches, initial=start_batch, desc=f"epoch {epoch + 1}/{self.epochs}",
                       unit="batch", disable=not self.progress, leave=False, dynamic_ncols=True)
            t0, t_seen = time.perf_counter(), 0
            for batch in self.train_loader:
                x, y = self._split(batch)
                self.optimizer.zero_grad()
                out = self.model(x)
                loss = self._loss(out, x, y)
                loss.backward()
                self.optimizer.step()
                if self.scheduler is not None:
                    self.scheduler.step()
                self.step += 1
                b = int(y.shape[0])
                lv = float(loss.detach())
                loss_sum, seen, steps, t_seen = loss_sum + lv * b, seen + b, steps + 1, t_seen + b
                if out.dim() == 2 and y.dim() == 1 and not torch.is_floating_point(y):
                    correct += float((out.detach().argmax(1) == y).sum())
                if self.progress:
                    rate = t_seen * self.world / max(time.perf_counter() - t0, 1e-9)
                    bar.set_postfix(loss=f"{lv:.4f}", samples_s=f"{rate:,.0f}", refresh=False)
                    bar.update(1)
                for cb in self.callbacks:
                    cb.on_step_end(self, self.step, lv)
                if self.checkpoint_every and self.step % self.checkpoint_every == 0:
                    self.save_checkpoint((loss_sum, correct, seen, steps))
                if self.stop_training:
                    break
            bar.close()
            if self.stop_training:
                break
            elapsed = time.perf_counter() - t0
            start_batch, running = 0, (0.0, 0.0, 0.0, 0.0)
            tot = self._sum_across_ranks([loss_sum, correct, seen, elapsed], "trainer.train")
            row = {"epoch": epoch + 1, "step": self.step, "train_loss": float(tot[0] / max(tot[2], 1)),
                   "train_accuracy": float(tot[1] / max(tot[2], 1)),
                   "lr": float(self._base_opt.param_groups[0]["lr"]),
                   "samples_per_s": float(tot[2] / max(tot[3] / self.world, 1e-9))}
            if self.val_loader is not None:
                v = self.evaluate(self.val_loader)
                row.update(val_loss=v["loss"], val_accuracy=v["accuracy"])
            self.epoch = epoch + 1
            self._log(row)
            if self.progress:
                tqdm.write(f"epoch {epoch + 1}/{self.epochs}: " + ", ".join(
                    f"{k} {v:.4g}" for k, v in row.items() if k not in ("epoch", "step")))
            for cb in self.callbacks:
                cb.on_epoch_end(self, epoch, row)
            if self.checkpoint_dir is not None and (not self.checkpoint_every or self.epoch == self.epochs):
                self.save_checkpoint()
        for cb in self.callbacks:
            cb.on_train_end(self)
        if self._tb:
            self._tb.close()
            self._tb = None
        return self.history
