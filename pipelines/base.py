"""`PatchLoader`: the interface every loader implements, and the checks every batch passes.

Every loader delivers raw patches (store dtype, NCDHW) with their normalisation parameters; the
trainer normalises them on its device (`train.step.to_model_input` -> `pipelines.normalize`)."""

from __future__ import annotations

from collections.abc import Iterator

from stacktrain.errors import PipelineError

from .config import LoaderConfig
from .contract import Batch, BatchSpec, check_batch
from .patches import PatchIndex
from .source import PatchSource

__all__ = ["PatchLoader"]


class PatchLoader:
    """What the trainer iterates. Subclasses provide `_batches(epoch)`; this class checks and finishes them."""

    kind: str  # resolved loader: "dali" | "dali-cpu" | "torch"

    def __init__(self, *, stack_ids: list[str], index: PatchIndex, spec: BatchSpec, source: PatchSource,
                 cfg: LoaderConfig):
        self.stack_ids = list(stack_ids)  # Batch.stack_index indexes into this
        self.index = index  # all patches of these stacks, before rank sharding
        self.spec = spec
        self.source = source
        self.cfg = cfg
        self._n_batches = len(source.plan(0))  # raises now if a train epoch cannot fill one batch

    def __len__(self) -> int:
        """Batches per epoch for this rank."""
        return self._n_batches

    def epoch(self, epoch: int) -> Iterator[Batch]:
        """The batches of `epoch`, deterministic from (cfg.seed, epoch); each is checked against `spec`."""
        if epoch < 0:
            raise PipelineError(f"epoch {epoch}: epochs count from 0")
        norm = self.spec.norm
        for batch in self._batches(epoch):
            batch.norm = norm  # raw images: the trainer's input step normalises them (pipelines/normalize.py)
            check_batch(batch, self.spec)
            yield batch

    def _batches(self, epoch: int) -> Iterator[Batch]:
        raise NotImplementedError

    def close(self) -> None:
        """Stop worker processes; the loader cannot be used afterwards."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
