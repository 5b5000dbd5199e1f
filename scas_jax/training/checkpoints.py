"""Train checkpoints: one Orbax ``CheckpointManager`` under ``OUTPUT/checkpoints``.

Each step directory holds two items:

- ``state``: the :class:`~scas_jax.training.step.TrainState` (step, float32 params,
  optimiser state), saved with its shardings and restored into the current mesh;
- ``meta``: JSON with ``step``, ``data_position`` (the next global batch index),
  ``data_fingerprint``, ``config`` (the TrainConfig) and ``model_config``.

Orbax writes a step into a temporary directory and renames it when complete, and
``latest_step`` ignores temporaries, so a run killed mid-save leaves the previous
checkpoint as the latest. Saves are synchronous: when ``save`` returns, the step is
committed.

Several processes: every process opens the same directory and calls ``save`` and the
restores (Orbax writes and reads each process's own shards; process 0 writes the
metadata and commits). The directory may be a URL such as ``gs://bucket/run/checkpoints``
(any path ``etils.epath`` knows), passed to Orbax as written.
"""

from __future__ import annotations

from typing import Any

import jax

from scas_jax.errors import ScasError


class TrainCheckpoints:
    """The checkpoints of one training run. The directory is created by the first
    ``save``, never by opening: a run that fails before it saves leaves nothing."""

    def __init__(self, directory, max_to_keep: int = 3):
        import orbax.checkpoint as ocp

        from scas_jax.convert.checkpoint import orbax_path

        self._ocp = ocp
        self.directory = orbax_path(directory)  # an etils.epath.Path
        self._max_to_keep = max_to_keep
        self._manager = None

    @property
    def manager(self):
        if self._manager is None:
            ocp = self._ocp
            options = ocp.CheckpointManagerOptions(
                max_to_keep=self._max_to_keep or None,
                enable_async_checkpointing=False,
                create=True,
            )
            self._manager = ocp.CheckpointManager(self.directory, options=options,
                                                  item_names=("state", "meta"))
        return self._manager

    def latest_step(self) -> int | None:
        if self._manager is None and not self.directory.is_dir():
            return None
        return self.manager.latest_step()

    def step_dirs_on_disk(self) -> bool:
        """Whether a step directory exists on disk, whatever this process's manager has
        recorded: a process that fails inside a collective save (a peer died) may not have
        registered a step its peers already committed; such a directory is never deleted."""
        try:
            return any(p.name.isdigit() for p in self.directory.iterdir())
        except (FileNotFoundError, NotADirectoryError, OSError):
            return False

    def save(self, step: int, state, meta: dict[str, Any]) -> None:
        ocp = self._ocp
        if step in (self.manager.all_steps() or []):
            return
        self.manager.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
            force=True,
        )
        self.manager.wait_until_finished()

    def read_meta(self, step: int | None = None) -> dict[str, Any]:
        step = self.latest_step() if step is None else step
        if step is None:
            raise ScasError(f"{self.directory}: no checkpoint to resume from")
        ocp = self._ocp
        out = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return dict(out["meta"])

    def restore_state(self, step: int, abstract_state):
        """``abstract_state``: ShapeDtypeStructs carrying the target shardings."""
        ocp = self._ocp
        out = self.manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state))
        )
        return out["state"]

    def close(self) -> None:
        if self._manager is not None:
            self._manager.close()


def abstract_like(state, shardings):
    """ShapeDtypeStructs of ``state`` with ``shardings`` (for restore)."""
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings
    )
