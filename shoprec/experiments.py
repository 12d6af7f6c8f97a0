"""Experiments: named arms, their traffic shares, and who is in which (DESIGN §10).

An experiment is configuration (``SHOPREC_EXPERIMENT``: JSON, or the path of a JSON file)::

    {"name": "ranker-vs-covis", "control": "ranker",
     "arms": [{"name": "ranker", "kind": "ranker", "share": 0.45},
              {"name": "covis", "kind": "covisitation", "share": 0.45},
              {"name": "holdout", "kind": "holdout", "share": 0.10},
              {"name": "v1", "kind": "ranker", "model_version": "1", "shadow": true},
              {"name": "no-complements", "kind": "ranker", "complements": 0, "shadow": true}],
     "click_types": ["click"],
     "bandit": {"reward": "click", "min_share": 0.1, "every_s": 300}}

Arm kinds:

* ``ranker``: Triton's ``fused_ranker``, the served version or ``model_version`` (Triton
  must keep that version loaded: its ``version_policy``);
* ``covisitation``: the same candidates ordered by co-visitation alone, then popularity
  (scored in the worker, like the fallback);
* ``retrieval``: the same candidates in the fallback's retrieval order (the worker's
  ``FallbackScorer``);
* ``holdout``: no list is emitted; the user is still counted and their purchases recorded,
  the baseline the other arms are compared with.

A ``shadow`` arm gets no users: it scores every trigger beside the live arm and its lists
are kept and attributed, never emitted (how would it have done, at no risk).

``complements`` sets how many co-purchases take turns with the arm's picks after a
purchase (``SHOPREC_COMPLEMENTS_AFTER_PURCHASE`` when left out): the complements cost the
next-item ranking on some shops and add purchases on others (docs/models.md), so a shop
reads what they do to its own conversion with an arm (a shadow arm pairs the two on every
trigger) instead of trusting either offline measure.

Assignment (:func:`assign`) is a stable hash of the experiment name and the user id into
the shares, in the order the arms are listed: reproducible, and no state is needed to
compute it.  The worker stores each user's first assignment under their hash tag (with the
user's TTL) and keeps it while that arm exists, so changing the shares moves only users not
yet seen; a user whose arm was removed is assigned again under the new shares.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from shoprec.errors import ConfigError

ArmKind = Literal["ranker", "covisitation", "retrieval", "holdout"]
Outcome = Literal["click", "cart", "purchase"]
OUTCOMES: tuple[Outcome, ...] = ("click", "cart", "purchase")
"""The events a list can be credited with, in the order reports show them."""

_NAME = r"^[A-Za-z0-9_.-]{1,40}$"
# Shares are fractions written by people: they must add up to one within this.
_SHARE_TOLERANCE = 1e-6


class Arm(BaseModel):
    """One way of recommending, and the share of new users it gets."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=_NAME, description="Name in the output, metrics and reports.")
    kind: ArmKind = "ranker"
    share: float = Field(0.0, ge=0.0, le=1.0, description="Share of new users (0 for shadow).")
    model_version: str = Field(
        "",
        pattern=r"^[0-9]*$",
        description="The fused_ranker version Triton must answer with; empty: the served one.",
    )
    shadow: bool = False
    complements: int | None = Field(
        None,
        ge=0,
        le=100,
        description="Co-purchases that take turns with this arm's picks after a purchase; "
        "empty: SHOPREC_COMPLEMENTS_AFTER_PURCHASE.",
    )

    @model_validator(mode="after")
    def _check(self) -> Arm:
        if self.kind == "holdout" and self.complements is not None:
            raise ValueError(f"holdout arm {self.name!r} shows no list: it has no complements")
        return self

    def complements_or(self, default: int) -> int:
        """How many complements this arm's lists take after a purchase."""
        return default if self.complements is None else self.complements

    @property
    def emits(self) -> bool:
        """Whether this arm's users get lists on ``recs.out``."""
        return not self.shadow and self.kind != "holdout"

    @property
    def label(self) -> str:
        """What scores this arm, as the reports name it."""
        if self.kind == "ranker":
            return f"fused_ranker@{self.model_version or 'served'}"
        return self.kind


class Bandit(BaseModel):
    """Thompson sampling over the arms that emit (holdout and shadow arms keep out)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    reward: Outcome = Field(
        "click", description="A list rewards its arm when it gets at least one of these."
    )
    min_share: float = Field(
        0.05, ge=0.0, lt=0.5, description="Every arm keeps at least this share (exploration)."
    )
    every_s: float = Field(
        300.0, gt=0.0, description="How often the allocation is recomputed (wall-clock seconds)."
    )
    draws: int = Field(4000, ge=100, le=100_000, description="Posterior draws per allocation.")


class Experiment(BaseModel):
    """A named experiment: its arms, the control, what counts as a click, the bandit."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=_NAME)
    arms: tuple[Arm, ...]
    control: str = Field("", description="The arm the others are compared with; default first.")
    click_types: tuple[Literal["click", "view"], ...] = Field(
        ("click",),
        description="Event types that count as a click on a shown item. A shop whose stream "
        "has no click events but product page views (rees46) adds 'view'.",
    )
    bandit: Bandit | None = None

    @model_validator(mode="after")
    def _check(self) -> Experiment:
        names = [a.name for a in self.arms]
        if len(set(names)) != len(names):
            raise ValueError(f"arm names must be unique, got {names}")
        live = self.live_arms
        if not live:
            raise ValueError("an experiment needs at least one arm that is not a shadow")
        for arm in self.arms:
            if arm.shadow and (arm.kind == "holdout" or arm.share):
                raise ValueError(f"shadow arm {arm.name!r}: a shadow scores, has no share")
        total = sum(a.share for a in live)
        if abs(total - 1.0) > _SHARE_TOLERANCE:
            raise ValueError(
                f"the shares of the arms that are not shadows add up to {total:g}, not 1"
            )
        if self.control and self.control not in {a.name for a in live}:
            raise ValueError(f"control {self.control!r} is not one of the arms {names}")
        if self.bandit is not None:
            bandit_arms = [a for a in live if a.emits]
            if len(bandit_arms) < 2:
                raise ValueError("a bandit needs at least two arms that emit lists")
            if self.bandit.min_share * len(bandit_arms) > 1.0:
                raise ValueError("bandit min_share times the number of arms exceeds 1")
        return self

    @property
    def live_arms(self) -> tuple[Arm, ...]:
        """The arms users are assigned to (every arm but the shadows)."""
        return tuple(a for a in self.arms if not a.shadow)

    @property
    def shadow_arms(self) -> tuple[Arm, ...]:
        return tuple(a for a in self.arms if a.shadow)

    @property
    def control_arm(self) -> str:
        return self.control or self.live_arms[0].name

    def arm(self, name: str) -> Arm:
        for a in self.arms:
            if a.name == name:
                return a
        raise KeyError(name)

    def most_complements(self, default: int) -> int:
        """The most complements any arm takes: how many a request must carry for all."""
        return max((a.complements_or(default) for a in self.arms), default=default)

    def shares(self) -> dict[str, float]:
        """The configured share of each live arm."""
        return {a.name: a.share for a in self.live_arms}

    def counts_as(self, event_type: str) -> Outcome | None:
        """The outcome an event of this type is credited as, or None."""
        if event_type in ("cart", "purchase"):
            return event_type  # type: ignore[return-value]
        if event_type in self.click_types:
            return "click"
        return None


DEFAULT_EXPERIMENT = Experiment(name="live", arms=(Arm(name="ranker", share=1.0),))
"""Without ``SHOPREC_EXPERIMENT`` every user is in one arm, the served ranker: lists are
still attributed, and the report has one arm."""


def load_experiment(value: object) -> Experiment | None:
    """``SHOPREC_EXPERIMENT`` as given: JSON text, the path of a JSON file, a mapping, an
    :class:`Experiment`, or empty (none)."""
    if value is None or isinstance(value, Experiment):
        return value
    if isinstance(value, Mapping):
        return Experiment.model_validate(value)
    if not isinstance(value, str):
        raise ValueError(f"an experiment is JSON or a file path, not {type(value).__name__}")
    text = value.strip()
    if not text:
        return None
    if not text.startswith("{"):
        path = Path(text).expanduser()
        if not path.is_file():
            raise ValueError(f"SHOPREC_EXPERIMENT: {text!r} is neither JSON nor a readable file")
        text = path.read_text()
    try:
        return Experiment.model_validate(json.loads(text))
    except json.JSONDecodeError as exc:
        raise ValueError(f"SHOPREC_EXPERIMENT is not valid JSON: {exc}") from None


def unit_hash(*parts: str) -> float:
    """A stable number in [0, 1) from ``parts`` (BLAKE2b, 64 bits): the same on every worker,
    every run, every Python."""
    raw = "\x00".join(parts).encode("utf-8", "surrogatepass")
    return int.from_bytes(hashlib.blake2b(raw, digest_size=8).digest(), "big") / 2.0**64


def assign(user_id: str, experiment: str, shares: Sequence[tuple[str, float]]) -> str:
    """The arm a user new to ``experiment`` gets under ``shares`` (arm, share), in order:
    where the user's hash falls on the shares laid end to end."""
    positive = [(name, s) for name, s in shares if s > 0]
    if not positive:
        raise ConfigError(f"experiment {experiment!r}: no arm has a share above 0")
    total = sum(s for _, s in positive)
    point = unit_hash(experiment, user_id) * total
    upto = 0.0
    for name, share in positive:
        upto += share
        if point < upto:
            return name
    return positive[-1][0]  # point == total only through rounding


def list_id(user_id: str, trigger_event_id: str) -> str:
    """The id of the list a trigger produced: the same when the list is emitted again for
    a redelivered trigger, so it is recorded and attributed once."""
    raw = f"{user_id}\x00{trigger_event_id}".encode("utf-8", "surrogatepass")
    return hashlib.blake2b(raw, digest_size=8).hexdigest()


def revenue(price: float | None, qty: int | None) -> float:
    """What a purchase event is worth: price times quantity (one when not given); 0 when
    the event has no price."""
    if price is None:
        return 0.0
    return float(price) * (1 if qty is None else int(qty))
