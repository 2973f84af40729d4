"""Shards for job arrays: ``--shard K/N`` classifies a deterministic 1/N of the discovered files.

A file belongs to shard ``sha256(path) mod N``, where ``path`` is the report's ``path`` column:
the path relative to the folder it was found under (or the path as given, for files named
explicitly or listed with ``--files-from``), as UTF-8 with ``surrogateescape`` (so a name that is
not valid UTF-8 hashes by its original bytes). The shard therefore depends neither on the machine
(where the archive is mounted), nor on the walk order, nor on the other shards, and every file
is in exactly one shard for a given N.

Because the shard can be computed again from any row's ``path``, a part needs no extra column
or side file to say which shard it is: :mod:`cxr_batch.report.merge` re-hashes every row.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

_SPEC = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")


def shard_of(path: str, count: int) -> int:
    """The shard (0 … count-1) the report path ``path`` belongs to."""
    digest = hashlib.sha256(path.encode("utf-8", "surrogateescape")).digest()
    return int.from_bytes(digest[:8], "big") % count


@dataclass(frozen=True)
class Shard:
    """Shard ``index`` of ``count`` (numbered from 0, like ``sbatch --array=0-15``)."""

    index: int
    count: int

    def __post_init__(self) -> None:
        if self.count < 1:
            raise ValueError(f"the shard count must be at least 1, not {self.count}")
        if not 0 <= self.index < self.count:
            raise ValueError(
                f"shard {self.index}/{self.count}: K must be 0…{self.count - 1} "
                f"(shards are numbered from 0, as in sbatch --array=0-{self.count - 1})"
            )

    @classmethod
    def parse(cls, text: str) -> Shard:
        """``"K/N"`` → ``Shard(K, N)``.

        Raises:
            ValueError: not of the form K/N, N < 1, or K outside 0…N-1.
        """
        match = _SPEC.match(text)
        if not match:
            raise ValueError(f"{text!r} is not K/N (for example 3/16: shard 3 of 16, numbered from 0)")
        return cls(int(match.group(1)), int(match.group(2)))

    def owns(self, path: str) -> bool:
        """Whether the report path ``path`` belongs to this shard."""
        return shard_of(path, self.count) == self.index

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"
