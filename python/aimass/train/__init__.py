"""aimass.train: the Trainer (data-parallel under mpirun, exact resume), checkpoints and distillation.

    trainer = aimass.train.Trainer(model, optimizer, F.cross_entropy, train_loader, val_loader,
                                   epochs=10, checkpoint_dir="runs/a")
    trainer.fit(resume=True)

``aimass train config.yml`` does the same from a config (docs/training.md).
"""
from .checkpoint import latest as latest_checkpoint
from .checkpoint import load as load_checkpoint
from .distill import distill_loss
from .trainer import Callback, Trainer

__all__ = ["Trainer", "Callback", "distill_loss", "load_checkpoint", "latest_checkpoint"]
