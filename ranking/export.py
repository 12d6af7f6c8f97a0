"""The trained ranker's artefact: what ``shoprec train`` writes and Triton's model loads.

A version folder ``model_repo/fused_ranker/<n>/`` holds, beside the thin ``model.py``:

* ``ranker.json`` -- the :class:`RankerConfig`, the item id of every behavioural row
  (row 0 = unknown item), the training report and, where the learner chose them, how many
  complements the version's lists take after a purchase and in which order
  (``complements``, ``complement_order``);
* ``ranker.pt`` -- the weights (a ``state_dict``; fp32, a few hundred KB to a few MB).

Serving builds :class:`FusedRanker` from these and compiles it with TorchScript; item
text vectors are not stored: the model reads them from its Redis-fed item table, so a
catalogue change reaches the ranker without a new version.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ranking.model import FusedRanker, RankerConfig
from ranking.pipeline import COMPLEMENT_ORDERS, ComplementOrder

CONFIG_FILE = "ranker.json"
WEIGHTS_FILE = "ranker.pt"
MODEL_PY = Path(__file__).resolve().parent.parent / "model_repo" / "fused_ranker" / "2" / "model.py"
"""The version-independent Triton wrapper, copied into every new version folder."""


@dataclass
class Artefact:
    model: FusedRanker
    config: RankerConfig
    item_ids: list[str]
    report: dict[str, Any]
    complements: int | None = None
    """The most complements after a purchase (``ranking.pipeline.Scorer.complements``)."""
    complement_order: ComplementOrder = "co-purchase"
    """Their order (``ranking.pipeline.Scorer.complement_order``)."""

    def item_rows(self) -> dict[str, int]:
        return {item: row for row, item in enumerate(self.item_ids) if row}


def save(
    folder: Path, model: FusedRanker, cfg: RankerConfig, item_ids: list[str], report: dict[str, Any]
) -> None:
    """Write the artefact (and the version's ``model.py``) into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    torch.save(state, folder / WEIGHTS_FILE)
    meta = {"config": cfg.to_dict(), "item_ids": item_ids, "report": report}
    (folder / CONFIG_FILE).write_text(json.dumps(meta) + "\n")
    target = folder / "model.py"
    if MODEL_PY.is_file() and target.resolve() != MODEL_PY:
        shutil.copyfile(MODEL_PY, target)


def config_of(report: dict[str, Any]) -> RankerConfig:
    """The shape a training report records (``report["model"]``)."""
    return RankerConfig(**report["model"])


def _meta(folder: Path) -> dict[str, Any]:
    """``folder``'s ``ranker.json``, its complement order checked."""
    path = folder / CONFIG_FILE
    meta: dict[str, Any] = json.loads(path.read_text())
    order = meta.setdefault("complement_order", "co-purchase")
    if order not in COMPLEMENT_ORDERS:
        raise ValueError(
            f"{path}: complement_order {order!r} is not one of {', '.join(COMPLEMENT_ORDERS)}"
        )
    return meta


def load(folder: Path, device: torch.device | str = "cpu") -> Artefact:
    meta = _meta(folder)
    cfg = RankerConfig(**meta["config"])
    model = FusedRanker(cfg)
    state = torch.load(folder / WEIGHTS_FILE, map_location="cpu", weights_only=True)
    if not cfg.base:
        # Written before the baseline path existed: its per-item bias is zero and unused.
        state.setdefault("item_bias.weight", model.item_bias.weight.detach().clone())
    model.load_state_dict(state)
    model.to(device).eval()
    return Artefact(
        model,
        cfg,
        list(meta["item_ids"]),
        dict(meta.get("report", {})),
        meta.get("complements"),
        meta["complement_order"],
    )


def training_report(folder: Path) -> dict[str, Any]:
    """The training report saved with ``folder``'s artefact, without loading its weights."""
    return dict(_meta(folder).get("report", {}))


def served_complements(folder: Path) -> tuple[int | None, ComplementOrder]:
    """What ``folder``'s version serves after a purchase, without loading its weights: its
    complements (None: what each request carries) and their order.  A version without an
    artefact (v1's fixed fusion) takes each request's, in co-purchase order."""
    if not (folder / CONFIG_FILE).is_file():
        return None, "co-purchase"
    meta = _meta(folder)
    return meta.get("complements"), meta["complement_order"]


def set_complements(
    folder: Path, complements: int | None, order: ComplementOrder = "co-purchase"
) -> None:
    """Record in ``folder``'s artefact how many complements its lists take after a purchase
    (None: what each request carries) and in which order.  The learner decides both after
    judging the version it has written."""
    path = folder / CONFIG_FILE
    meta = json.loads(path.read_text())
    meta["complements"] = complements
    meta["complement_order"] = order
    path.write_text(json.dumps(meta) + "\n")
