"""detectron2's checkpointer, with every checkpoint written whole or not at all.

fvcore's ``Checkpointer.save`` streams ``torch.save`` into the final file, so a full disk leaves a
truncated ``model_final.pth`` behind (and ``last_checkpoint`` naming it), which a resume then
fails to load. Here a checkpoint is serialised in memory first, so its size is known and the free
space is checked against it, then written through a temporary file, fsync and rename
(``transfer.fileio``); ``last_checkpoint`` is written the same way, after the file it names. No
room is a ``DiskError`` that names the file and the free space.
"""
from __future__ import annotations

from pathlib import Path

from detectron2.checkpoint import DetectionCheckpointer

from transfer import fileio

LAST = "last_checkpoint"  # fvcore's name for the file that names the newest checkpoint


class AtomicCheckpointer(DetectionCheckpointer):
    """A DetectionCheckpointer (same loading, resume and file names) whose saves are atomic."""

    @classmethod
    def like(cls, checkpointer: DetectionCheckpointer) -> AtomicCheckpointer:
        """One for the model, folder and checkpointables of ``checkpointer`` (what DefaultTrainer built)."""
        return cls(checkpointer.model, checkpointer.save_dir, save_to_disk=checkpointer.save_to_disk,
                   **checkpointer.checkpointables)

    def save(self, name: str, **extra) -> None:
        if not self.save_dir or not self.save_to_disk:
            return
        state = {"model": self.model.state_dict(),
                 **{key: obj.state_dict() for key, obj in self.checkpointables.items()}, **extra}
        path = Path(self.save_dir) / f"{name}.pth"
        self.logger.info("Saving checkpoint to %s", path)
        fileio.atomic_torch_save(state, path)
        self.tag_last_checkpoint(path.name)

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        fileio.atomic_write_text(Path(self.save_dir) / LAST, last_filename_basename)
