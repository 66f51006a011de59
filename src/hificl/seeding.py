"""One run seed, and the seed of each replicate.

A run config has one ``seed`` (default `DEFAULT_SEED`, the paper's; `hificl.run_config.RunConfig` is the only
place that defaults it: every library function that draws takes its seed explicitly). What the numbers decide:

* ``data`` (the run's ``seed``): which train / validation / test examples a run uses, and the validation
  examples a task holds out of train.
* ``replicate`` (one entry of the run's ``seeds``; by default ``seed`` itself): everything random about one
  repetition of a method -- the initial weights of a trained method (HiFICL's virtual pairs, LIVE / MimIC shifts,
  LoRA), the order of the training examples in each epoch and dropout, and in-context demonstrations drawn at
  random (ICL rows, teachers).

One number per replicate, not a derived stream per purpose: each consumer seeds a generator of its OWN with it
(the adapter's initialiser, the trainer's data order, the prompter's draws), so purposes never consume each
other's random numbers and a change to one (say, more demonstrations) leaves the others' draws as they were;
deriving distinct numbers would buy nothing more and would change every published result. Nothing here touches
the process-global generators (the trainer forks them: see `hificl.trainer`).

A *replicate* is one repetition of a method that has randomness of its own (training, random demonstrations);
a run has one replicate per entry of its ``seeds`` while its data stay those of ``seed``, so every replicate is
measured on the same test questions.
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_SEED = 3407  # the paper's


@dataclass(frozen=True)
class Seeds:
    """The seeds of one replicate of a run (see the module docstring): `data` picks the examples, `replicate`
    seeds the method's own randomness."""

    data: int
    replicate: int
