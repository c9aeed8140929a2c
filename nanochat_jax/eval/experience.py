"""The experience library of training-free GRPO (grpo.py): the lessons prepended to prompts.

A short numbered list ("[1]. lesson") with add / modify / delete and a log of every change,
saved as JSON. Caps: at most `max_items` lessons (16) and `max_chars` rendered characters
(2048, ~512 tokens); an add past a cap first evicts the lesson with the lowest win rate, oldest
first among ties (an untried lesson's win rate is 0, so proven lessons outlive new ones). A
lesson's win rate is the mean reward of the problems whose prompt held it (`credit`).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
from collections.abc import Iterable

from nanochat_jax.errors import EvalError

HEADER = "Lessons from earlier attempts:\n"
SIMILARITY = 0.9  # difflib ratio at which two lessons count as the same lesson
OPERATIONS = ("add", "modify", "delete")


def _normalise(text: str) -> str:
    """`text` on one line with single spaces: the form lessons are stored and compared in."""
    return " ".join(text.split())


@dataclasses.dataclass
class Experience:
    """One lesson: `uses` counts the problems whose prompt held it, `wins` sums their rewards."""

    id: int
    text: str
    uses: int = 0
    wins: float = 0.0  # a sum of group mean rewards

    @property
    def win_rate(self) -> float:
        """The mean reward of the problems it was used on; 0.0 before its first use."""
        return self.wins / self.uses if self.uses else 0.0


class UnknownLessonError(EvalError, KeyError):
    """A lesson id that the library does not hold."""

    __str__ = Exception.__str__  # KeyError's would quote the message


@dataclasses.dataclass
class ExperienceLibrary:
    """The ordered, capped list of lessons prepended to prompts, with a log of every change.

    `epoch` stamps the log entries; `next_id` keeps ids unique after deletions.
    """

    max_items: int = 16
    max_chars: int = 2048  # of the rendered list, ~512 tokens
    items: list[Experience] = dataclasses.field(default_factory=list)
    log: list[dict] = dataclasses.field(default_factory=list)
    epoch: int = 0
    next_id: int = 1

    def __post_init__(self):
        if self.max_items < 1 or self.max_chars < 1:
            raise ValueError(f"max_items={self.max_items} and max_chars={self.max_chars} must "
                             f"be positive")

    def add(self, text: str) -> int:
        """Append a lesson and return its id; the id of an identical lesson if there is one.

        Past a cap, the lowest-win-rate other lessons are evicted first.
        """
        text = self._fitting(text)
        for item in self.items:
            if item.text == text:
                return item.id
        item = Experience(self.next_id, text)
        self.next_id += 1
        self.items.append(item)
        self._record("add", item.id, text)
        self._enforce_caps(keep=item.id)
        return item.id

    def modify(self, id: int, text: str) -> None:
        """Replace a lesson's text, keeping its place and its credit."""
        item = self.get(id)
        item.text = self._fitting(text)
        self._record("modify", id, item.text)
        self._enforce_caps(keep=id)

    def delete(self, id: int, reason: str = "requested") -> None:
        """Remove a lesson; `reason` ("requested", "cap", "harmful") goes into the log."""
        item = self.get(id)
        self.items.remove(item)
        self._record("delete", id, item.text, reason=reason)

    def get(self, id: int) -> Experience:
        """The lesson with this id."""
        for item in self.items:
            if item.id == id:
                return item
        raise UnknownLessonError(f"no lesson with id {id} in the experience library (ids: "
                                 f"{[item.id for item in self.items]})")

    def similar(self, text: str) -> int | None:
        """The id of the first lesson nearly identical to `text` (difflib ratio >= SIMILARITY)."""
        text = _normalise(text)
        for item in self.items:
            if difflib.SequenceMatcher(None, item.text, text).ratio() >= SIMILARITY:
                return item.id
        return None

    def credit(self, ids: Iterable[int], mean_reward: float) -> None:
        """Credit the lessons that were in one problem's prompt with the group's mean reward."""
        for id in ids:
            item = self.get(id)
            item.uses += 1
            item.wins += mean_reward

    def render(self) -> str:
        """The lessons as "[1]. lesson" lines, numbered by position (not id)."""
        return "\n".join(f"[{n}]. {item.text}" for n, item in enumerate(self.items, 1))

    def prompt(self, problem_prompt: str) -> str:
        """`problem_prompt` after a header and the lessons; unchanged when there are none."""
        if not self.items:
            return problem_prompt
        return HEADER + self.render() + "\n\n" + problem_prompt

    def save(self, path: str | os.PathLike) -> None:
        """Write the library (caps, lessons, log) as JSON, replacing `path` atomically."""
        tmp = f"{path}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(dataclasses.asdict(self), f, indent=1)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> ExperienceLibrary:
        """Read a library written by `save`."""
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
            items = [Experience(**item) for item in data.pop("items")]
            return cls(items=items, **data)
        except FileNotFoundError:
            raise EvalError(f"experience library {path} does not exist") from None
        except (json.JSONDecodeError, TypeError, KeyError, AttributeError) as e:
            raise EvalError(f"{path} is not an experience library written by "
                            f"ExperienceLibrary.save ({e})") from None

    def _fitting(self, text: str) -> str:
        """`text` normalised, if it is non-empty and fits `max_chars` on its own."""
        text = _normalise(text)
        if not text:
            raise ValueError("a lesson needs some text")
        if len(f"[1]. {text}") > self.max_chars:
            raise ValueError(f"a lesson of {len(text)} characters cannot fit "
                             f"max_chars={self.max_chars}")
        return text

    def _enforce_caps(self, keep: int) -> None:
        """Evict lessons other than `keep`, lowest win rate (then oldest) first, until both
        caps hold."""
        while len(self.items) > self.max_items or len(self.render()) > self.max_chars:
            victim = min((item for item in self.items if item.id != keep),
                         key=lambda item: item.win_rate)
            self.delete(victim.id, reason="cap")

    def _record(self, op: str, id: int, text: str, **extra) -> None:
        """Append one operation to the log."""
        self.log.append({"op": op, "id": id, "text": text, "epoch": self.epoch, **extra})
