"""Land-use text prompts for the diffusion branch, and zero-shot land-use selection.

PromptMID conditions the diffusion UNet on a land-use prompt (README, 'Pipeline and presets'). The
default prompt set has 9 classes and one template per modality::

    optical: "an optical satellite image of {class}"
    sar:     "a SAR satellite image of {class}"

A prompt set can be replaced from a file (:func:`load_prompt_set`):

* ``.json`` / ``.yaml`` / ``.yml``: ``{"classes": [...], "templates": {"optical": "...", "sar": "..."}}``
  (either key may be omitted; templates must contain ``{class}``);
* anything else (``.txt``): one class per line, ``#`` starts a comment; default templates.

The zero-shot choice of a class for an image is :func:`promptmid.models.land_use.select_land_use`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import json
from dataclasses import dataclass, field
from pathlib import Path

from promptmid.errors import InputError

if TYPE_CHECKING:
    from promptmid.io import Modality

LAND_USE_CLASSES: tuple[str, ...] = (
    "farmland",
    "forest",
    "grassland",
    "water",
    "urban",
    "rural settlement",
    "road",
    "bare land",
    "mountain",
)
TEMPLATES: dict[str, str] = {
    "optical": "an optical satellite image of {class}",
    "sar": "a SAR satellite image of {class}",
}
# class name meaning "no land-use label": the prompt is the template without " of {class}"
GENERIC = "generic"


@dataclass(frozen=True)
class PromptSet:
    """Land-use classes and per-modality templates (placeholder ``{class}``)."""

    classes: tuple[str, ...] = LAND_USE_CLASSES
    templates: dict[str, str] = field(default_factory=lambda: dict(TEMPLATES))

    def prompt_for(self, cls: str, modality: Modality = "optical") -> str:
        """The text prompt of class ``cls`` for an image of ``modality``; :data:`GENERIC` gives the template
        without its land-use part ("a SAR satellite image")."""
        if modality not in self.templates:
            raise InputError(f"Unknown modality {modality!r}; expected one of {sorted(self.templates)}.")
        if cls == GENERIC:
            return self.templates[modality].replace(" of {class}", "").replace("{class}", "").strip()
        return self.templates[modality].replace("{class}", cls)

    def check_class(self, cls: str) -> str:
        """Return ``cls`` if it is a known class (or :data:`GENERIC`), else raise :class:`InputError`."""
        if cls not in self.classes and cls != GENERIC:
            raise InputError(f"Unknown land-use class {cls!r}; choose one of {list(self.classes)}.")
        return cls


DEFAULT_PROMPTS = PromptSet()


def prompt_for(cls: str, modality: Modality = "optical", prompt_set: PromptSet = DEFAULT_PROMPTS) -> str:
    """The prompt of land-use class ``cls`` for ``modality`` ("optical" or "sar")."""
    return prompt_set.prompt_for(cls, modality)


def load_prompt_set(path: str | Path) -> PromptSet:
    """Read a prompt set from a JSON, YAML or text file (format in the module docstring).

    Raises:
        InputError: missing file, unreadable content, no classes, or a template without ``{class}``.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"Prompt file not found: {path}")
    text = path.read_text(encoding="utf-8")
    try:
        data = _parse_prompt_file(path, text)
    except (ValueError, TypeError) as exc:  # json/yaml errors derive from ValueError or are wrapped
        raise InputError(f"Cannot parse prompt file {path}: {exc}") from exc
    classes = tuple(str(c).strip() for c in data.get("classes", LAND_USE_CLASSES) if str(c).strip())
    templates = {**TEMPLATES, **{str(k): str(v) for k, v in (data.get("templates") or {}).items()}}
    if not classes:
        raise InputError(f"Prompt file {path} lists no land-use classes.")
    bad = [m for m, t in templates.items() if "{class}" not in t]
    if bad:
        raise InputError(f"Prompt file {path}: template(s) {bad} lack the '{{class}}' placeholder.")
    return PromptSet(classes=classes, templates=templates)


def _parse_prompt_file(path: Path, text: str) -> dict:
    suffix = path.suffix.lower()
    if suffix == ".json":
        data = json.loads(text)
    elif suffix in (".yaml", ".yml"):
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ValueError(str(exc)) from exc
    else:
        lines = (line.split("#", 1)[0].strip() for line in text.splitlines())
        data = {"classes": [line for line in lines if line]}
    if isinstance(data, list):
        data = {"classes": data}
    if not isinstance(data, dict):
        raise TypeError("expected a mapping with 'classes' and/or 'templates', or a list of classes")
    return data
