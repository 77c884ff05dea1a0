"""Canonical class names and the folder names each release of the database uses for them.

The releases spell the same class differently (`NORMAL` / `Normal`, `Viral Pneumonia`, `COVID-19` /
`COVID`, `Lung_Opacity`); everything past the reader speaks only the canonical names, so a run on
one release and a run on another agree on what label 0 means.
"""

from __future__ import annotations

import re
from typing import Iterable

from cxr_jax.errors import ConfigError

COVID = "COVID"
NORMAL = "NORMAL"
VIRAL_PNEUMONIA = "VIRAL_PNEUMONIA"
LUNG_OPACITY = "LUNG_OPACITY"
# The order fixes the TFDS ClassLabel ids of prepared datasets: append only, never reorder.
CANONICAL = (COVID, NORMAL, VIRAL_PNEUMONIA, LUNG_OPACITY)

# Folder names (and config spellings) after `_key` normalisation -> canonical name.
_ALIASES = {
    "covid": COVID,
    "covid19": COVID,
    "normal": NORMAL,
    "viralpneumonia": VIRAL_PNEUMONIA,
    "lungopacity": LUNG_OPACITY,
}
# The spelling each canonical class has in the latest release, for messages.
FOLDER_NAMES = {COVID: "COVID", NORMAL: "Normal", VIRAL_PNEUMONIA: "Viral Pneumonia",
                LUNG_OPACITY: "Lung_Opacity"}


def _key(name: str) -> str:
  """Case, spaces, underscores and hyphens do not distinguish classes ('Viral Pneumonia')."""
  return re.sub(r"[\s_\-]+", "", name).lower()


def canonical(name: str) -> str | None:
  """The canonical class of a folder name or config spelling, or None if it names no class."""
  return _ALIASES.get(_key(name))


def index(name: str) -> int:
  """The TFDS label id of a canonical class."""
  return CANONICAL.index(name)


def expected_names() -> str:
  """The folder names a user may have, for error messages."""
  return ", ".join(f"'{FOLDER_NAMES[c]}'" for c in CANONICAL) + " (any case; first release: " \
      "'NORMAL', 'COVID' or 'COVID-19')"


def resolve(classes: Iterable[str] | str, key: str = "data.classes") -> tuple[str, ...]:
  """Checks `config.data.classes` and returns it in canonical spelling, in the user's order.

  The order is kept because labels are indices into it.
  """
  if isinstance(classes, str):
    classes = [c.strip() for c in classes.split(",") if c.strip()]
  try:
    names = list(classes)
  except TypeError:
    raise ConfigError(f"config.{key}: expected a list of class names, got {classes!r}") from None
  if len(names) < 2:
    raise ConfigError(f"config.{key}: a classifier needs at least two classes, got {names!r}")
  out = []
  for name in names:
    c = canonical(str(name))
    if c is None:
      raise ConfigError(f"config.{key}: unknown class {name!r}; known classes: "
                        f"{', '.join(CANONICAL)} (case, spaces and underscores do not matter)")
    if c in out:
      raise ConfigError(f"config.{key}: class {c} is listed twice ({names!r})")
    out.append(c)
  return tuple(out)
