"""The recommended split of ``../shared/data/optsar`` (its README, "Recommended split").

:func:`split_group` names the group a pair is reported in; the tables state it.
"""

from __future__ import annotations

import re

from promptmid.evaluation.manifest import Pair

TRAIN_3MOS = ("GF3_", "RCM_")
UNSEEN_3MOS = {"SEN_": "Sentinel-1", "Redarsat_": "RADARSAT-2", "ALOS_": "ALOS", "TerraSAR_": "TerraSAR-X"}
UNSEEN_OTHER = ("msg", "vsff", "mapglue", "rift", "os-sift")
NEAR_DOMAIN = ("lnift_matlab", "rift2", "osmnet")

SPLIT_TEXT = (
    "Split (data README): training = srif pairs 1-180 except 169, 3MOS GF3_* and RCM_*; "
    "validation = srif 181-200; unseen test domains (never tuned on) = 3MOS Sentinel-1, RADARSAT-2, ALOS, "
    "TerraSAR-X (per sensor) and msg, vsff, mapglue, rift, os-sift; near-domain tests = lnift_matlab, rift2, osmnet."
)


def split_group(pair: Pair) -> str:
    """``"train"``, ``"val"``, ``"unseen:<sensor or other>"``, ``"near"`` or ``"other:<source>"``."""
    name = pair.id.split("/", 1)[-1]
    if pair.source == "srif":
        m = re.search(r"pair(\d+)$", name)
        k = int(m.group(1)) if m else -1
        if 181 <= k <= 200:
            return "val"
        return "train" if k != 169 else "other:srif-duplicate"
    if pair.source == "3mos":
        if name.startswith(TRAIN_3MOS):
            return "train"
        for prefix, sensor in UNSEEN_3MOS.items():
            if name.startswith(prefix):
                return f"unseen:3mos-{sensor}"
    if pair.source in UNSEEN_OTHER:
        return "unseen:other-sensors"
    if pair.source in NEAR_DOMAIN:
        return "near"
    return f"other:{pair.source}"
