"""Canonical class names: the database's classes under any of their spellings, and any other class.

The releases spell the same class differently (`NORMAL` / `Normal`, `Viral Pneumonia`, `COVID-19` /
`COVID`, `Lung_Opacity`); everything past the reader speaks only the canonical names, so a run on
one release and a run on another agree on what label 0 means.

Any other folder or config name (a user's `Tuberculosis/`, `Healthy/`) is a class of its own. Its
canonical spelling is the name upper-cased, with each run of spaces, underscores and hyphens made
one `_` and leading / trailing ones removed: `Healthy`, `healthy` and `HEALTHY` are `HEALTHY`;
`Bacterial Pneumonia` and `bacterial-pneumonia` are `BACTERIAL_PNEUMONIA` (the database's own
style). Names differing only in that way are one class.
"""

from __future__ import annotations

import re
from typing import Iterable

from cxr_jax.errors import ConfigError

COVID = "COVID"
NORMAL = "NORMAL"
VIRAL_PNEUMONIA = "VIRAL_PNEUMONIA"
LUNG_OPACITY = "LUNG_OPACITY"
# The database's classes, first in `ordered` (the ClassLabel ids of a prepared copy) in this order.
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


def database_class(name: str) -> str | None:
  """The database class a folder name or config spelling means, or None if it is none of them."""
  return _ALIASES.get(_key(name))


def canonical(name: str) -> str | None:
  """The canonical class of a folder name or config spelling (see module doc); None if empty."""
  name = str(name)
  known = database_class(name)
  if known is not None:
    return known
  out = re.sub(r"[\s_\-]+", "_", name.strip()).strip("_").upper()
  return out or None


def ordered(names: Iterable[str]) -> tuple[str, ...]:
  """Canonical classes in a stable order: the database's (in `CANONICAL` order), then the others
  sorted. It fixes the TFDS ClassLabel ids of a prepared copy holding exactly these classes."""
  names = set(names)
  return tuple(c for c in CANONICAL if c in names) + tuple(sorted(names - set(CANONICAL)))


def expected_names() -> str:
  """The folder names a user may have, for error messages."""
  return ", ".join(f"'{FOLDER_NAMES[c]}'" for c in CANONICAL) + " (any case; first release: " \
      "'NORMAL', 'COVID' or 'COVID-19'), or folders named as the classes of config.data.classes"


def folder_name(name: str) -> str:
  """The folder a user would have for a canonical class, for messages."""
  return FOLDER_NAMES.get(name, name)


AUTO = "auto"


def is_auto(classes) -> bool:
  """Whether config.data.classes asks for the classes found in the data: 'auto', or ('auto',) as
  `--config.data.classes=auto` gives it for the tuple-typed field."""
  if isinstance(classes, (list, tuple)) and len(classes) == 1:
    classes = classes[0]
  return isinstance(classes, str) and classes.strip().lower() == AUTO


def resolve(classes: Iterable[str] | str, key: str = "data.classes") -> tuple[str, ...]:
  """Checks `config.data.classes` and returns it in canonical spelling, in the user's order.

  The order is kept because labels are indices into it. The database's spellings map to its
  classes; any other name is a class of its own (see module doc).
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
      raise ConfigError(f"config.{key}: empty class name in {names!r}")
    if c in out:
      raise ConfigError(f"config.{key}: class {c} is listed twice ({names!r})")
    out.append(c)
  return tuple(out)


def member(name: str, classes: Iterable[str], key: str) -> str:
  """The canonical spelling of `config.<key>` (source_class, target_class), which must be one of
  `config.data.classes` in any spelling; consumers compare and index with what this returns.
  With classes='auto' any name is accepted here (the data then must hold it)."""
  c = canonical(str(name))
  if is_auto(classes):
    if c is None:
      raise ConfigError(f"config.{key}: empty class name")
    return c
  wanted = resolve(classes)
  if c not in wanted:
    raise ConfigError(f"config.{key}: {name!r} is not among config.data.classes "
                      f"{tuple(classes)}")
  return c
