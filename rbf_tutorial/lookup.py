"""A content-addressed lookup task: find the token whose key matches, wherever it is, and read its value.

Chapter 05 asks whether rotating queries and keys (RoPE) hurts attention that must find a token
by its *content* at an unknown distance. This task isolates that: one attention step can solve it,
and position is of no use.

Token layout of one row (``n_pairs`` pairs, ``length`` slots before the questions)::

    slots      f  f  (k3,v3)  f  (k1,v1)  f  f  (k2,v2)  f ...     questions  k2  k3  k1
    targets    -  -     -     -     -     -  -     -     - ...                v2  v3  v1

* a **pair token** ``(k, v)`` carries a key and a value in one id, so finding the right token is
  all there is to do: its value is already in it;
* **fillers** ``f`` are random ids of their own, distractors that match no question;
* the **questions** at the end name every key of the row once, in random order, and the target at
  each question is the value paired with that key (the usual next-token convention: the target at
  position ``t`` is predicted from inputs ``0..t``, and a question sees every slot before it).

Ids never collide: pair tokens are ``[0, K V)`` (``k * V + v``), questions ``[K V, K V + K)``,
answers ``[K V + K, K V + K + V)``, fillers after those, with ``K = n_keys`` and ``V = n_values``.
Each row draws its own pairs: ``n_pairs`` distinct keys with random values, at random slots.
"""

from __future__ import annotations

import torch

from .arguments import positive_int

__all__ = ["IGNORE_INDEX", "LookupTask"]

#: Target of the positions that are not scored (PyTorch's cross-entropy default).
IGNORE_INDEX = -100


class LookupTask:
    """The vocabulary and sizes of one lookup task; :meth:`batch` draws rows.

    Args:
        n_keys: distinct keys ``K``; each row uses ``n_pairs`` of them.
        n_values: distinct values ``V``; chance accuracy is ``1 / V``.
        n_pairs: pairs per row, at most ``n_keys``; also the number of questions.
        length: slots before the questions (pairs plus fillers), at least ``n_pairs``.
        n_fillers: distinct filler ids.
    """

    def __init__(self, *, n_keys: int = 4, n_values: int = 4, n_pairs: int = 4, length: int = 16,
                 n_fillers: int = 16) -> None:
        self.n_keys = positive_int("n_keys", n_keys)
        self.n_values = positive_int("n_values", n_values)
        self.n_pairs = positive_int("n_pairs", n_pairs)
        self.length = positive_int("length", length)
        self.n_fillers = positive_int("n_fillers", n_fillers)
        if self.n_pairs > self.n_keys:
            raise ValueError(f"n_pairs: {n_pairs} pairs need as many distinct keys, got n_keys={n_keys}")
        if self.length < self.n_pairs:
            raise ValueError(f"length: {length} slots cannot hold n_pairs={n_pairs} pairs")
        self.first_question = self.n_keys * self.n_values
        self.first_answer = self.first_question + self.n_keys
        self.first_filler = self.first_answer + self.n_values

    @property
    def vocab_size(self) -> int:
        return self.first_filler + self.n_fillers

    @property
    def context(self) -> int:
        """Tokens per row: the slots and then one question per pair."""
        return self.length + self.n_pairs

    def batch(
        self, batch_size: int, *, generator: torch.Generator | None = None, device=None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """int64 ``(inputs, targets)``, each ``(batch_size, context)``; targets are ``IGNORE_INDEX``
        except at the questions."""
        batch_size = positive_int("batch_size", batch_size)
        draw = {"generator": generator}
        keys = torch.rand(batch_size, self.n_keys, **draw).argsort(dim=1)[:, : self.n_pairs]
        values = torch.randint(0, self.n_values, (batch_size, self.n_pairs), **draw)
        slots = self.first_filler + torch.randint(0, self.n_fillers, (batch_size, self.length), **draw)
        where = torch.rand(batch_size, self.length, **draw).argsort(dim=1)[:, : self.n_pairs]
        slots.scatter_(1, where, keys * self.n_values + values)
        order = torch.rand(batch_size, self.n_pairs, **draw).argsort(dim=1)
        questions = self.first_question + keys.gather(1, order)
        inputs = torch.cat([slots, questions], dim=1)
        targets = torch.full_like(inputs, IGNORE_INDEX)
        targets[:, self.length :] = self.first_answer + values.gather(1, order)
        return inputs.to(device), targets.to(device)
