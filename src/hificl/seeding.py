"""One run seed, fanned out to named purposes.

A run config has one ``seed``. What it decides, by purpose:

=========  ====================================================================  =========================
purpose    what it decides                                                        seeded by
=========  ====================================================================  =========================
data       which train / validation / test examples a run uses, and the          the run's ``seed``
           validation examples a task holds out of train
init       the initial weights of a trained method (HiFICL's virtual pairs,      the replicate's seed
           LIVE / MimIC shifts, LoRA)
order      the order of the training examples in each epoch, and dropout         the replicate's seed
demos      in-context demonstrations drawn at random (ICL rows, teachers)        the replicate's seed
=========  ====================================================================  =========================

A *replicate* is one repetition of a method that has randomness of its own (training, random demonstrations);
a run has one replicate per entry of its ``seeds`` (by default just ``seed``), while its data stay those of
``seed``, so every replicate is measured on the same test questions. Each purpose draws from a generator of its
own seeded with its number, so purposes never consume each other's random numbers, and nothing here touches the
process-global generators (the trainer forks them: see `hificl.trainer`).
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_SEED = 3407  # the paper's


@dataclass(frozen=True)
class Seeds:
    """The seeds of one replicate of a run (see the module docstring)."""

    data: int = DEFAULT_SEED
    replicate: int = DEFAULT_SEED

    @property
    def init(self) -> int:
        return self.replicate

    @property
    def order(self) -> int:
        return self.replicate

    @property
    def demos(self) -> int:
        return self.replicate
