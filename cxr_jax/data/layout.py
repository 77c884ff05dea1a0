"""Finding the COVID-19 Radiography Database in whatever form the user has it.

Accepted forms of `config.data.data_dir`:
- the database folder of the first release: flat class folders `COVID/`, `NORMAL/`,
  `Viral Pneumonia/` holding `COVID (1).png`, ... (`COVID-19/` is accepted for `COVID/`);
- the folder of a later release: `<Class>/images/*.png` beside `<Class>/masks/` (lung masks,
  ignored), `Normal/`, an extra `Lung_Opacity/` class and `*.metadata.xlsx` / README files
  (ignored);
- any folder up to `MAX_DEPTH` levels above one of those (e.g. the folder the Kaggle download was
  unzipped into, which holds `COVID-19_Radiography_Dataset/`);
- the Kaggle zip itself. Members are read straight from the zip when the dataset is prepared,
  nothing is extracted to disk: the prepared array_record copy is the only copy made;
- a user's own data: class folders with any names (`Tuberculosis/`, `Healthy/`, see `classes`),
  found as the database is (the root is the shallowest folder holding a folder named as a database
  class or as a class of `config.data.classes`; failing that, one holding folders of images);
- a CSV of `file,label[,split]` (`config.data.labels_csv`, `from_labels_csv`): the images may sit
  anywhere, the labels (and the split, when given) are the CSV's.

Every folder beside the class folders at the root is a class of its own; only the classes of
`config.data.classes` are used. DICOM files are images (`.dcm`, `.dicom`, and in folders also
files without a suffix that carry the DICM preamble).

Directory symlinks are followed (a database assembled from links works) but each real directory is
visited once, so symlink loops cannot hang the scan. Inside a class folder, a link back to a folder
that holds it (a loop: it would reach folders outside the database) or into another class's folder
(its images would get this class's label) is not followed, and an image name that is a broken or
looping link is skipped, each with a warning naming it. Hidden files and folders, macOS
`__MACOSX/` and AppleDouble `._*` files, and `masks/` folders are skipped.

File names that are not valid UTF-8 (copies unzipped with a legacy code page) are kept: the entry
is named with the undecodable bytes escaped (`caf\\xe9.png`), so that it can be stored, logged and
written to the manifest, and `Layout.reader` maps the escaped name back to the file on disk.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import hashlib
import io
import math
import os
import pathlib
import zipfile
from typing import Callable, Iterator, Sequence

from absl import logging

from cxr_jax.data import classes as classes_lib
from cxr_jax.data import images
from cxr_jax.errors import DataError
from cxr_jax.utils import files as files_lib

# How many folder levels below `data_dir` the database root may sit.
MAX_DEPTH = 3
# Stop looking for the root after this many folders (someone pointed data_dir at `/` or `~`).
MAX_SCANNED_DIRS = 5000
_SKIPPED_DIRS = ("masks", "__macosx")

FIRST_RELEASE = "first"  # flat class folders
LATER_RELEASE = "later"  # <Class>/images/
LABELS_CSV = "labels_csv"  # files and labels listed in a CSV
CSV_COLUMNS = ("file", "label", "split")
# Names the split manifest writes itself: a metadata column of that name would be ambiguous.
RESERVED_COLUMNS = ("sha256", "class", "note")


@dataclasses.dataclass(frozen=True)
class Entry:
  file: str  # relative to the database root, '/'-separated, e.g. 'COVID/images/COVID-1.png'
  label: str  # canonical class name (see classes.canonical)


@dataclasses.dataclass(frozen=True)
class Layout:
  """The database as discovered: where it is, which release, and every image with its class."""
  source: pathlib.Path  # the resolved folder or zip the user gave
  is_zip: bool
  root: str  # the database root, relative to `source` ('' when `source` is the root), '/'-separated
  release: str  # FIRST_RELEASE, LATER_RELEASE or LABELS_CSV
  entries: tuple[Entry, ...]  # sorted by file
  class_folders: dict[str, tuple[str, ...]]  # canonical class -> folder name(s) as on disk
  ignored_folders: tuple[str, ...] = ()  # folders beside the class folders that name no class
  fingerprint: str = ""  # changes when files are added, removed or modified
  # Entry.file -> the name on disk, for the names that are not valid UTF-8 (see module doc).
  on_disk: dict[str, str] = dataclasses.field(default_factory=dict)
  labels_csv: str = ""  # the CSV the entries come from (resolved path), or ''
  # Entry.file -> 'train' / 'val' / 'test' when the CSV has a split column, else empty.
  given_splits: dict[str, str] = dataclasses.field(default_factory=dict)
  # Entry.file -> metadata (patient_id, age, sex, view, source, a CSV's other columns); only
  # non-empty values.
  metadata: dict[str, dict[str, str]] = dataclasses.field(default_factory=dict)

  @property
  def classes(self) -> tuple[str, ...]:
    """The classes that have images, in `classes.ordered` order (the prepared copy's label ids)."""
    return classes_lib.ordered(e.label for e in self.entries)

  @property
  def root_path(self) -> str:
    """The root as the user would name it (a folder, or a path inside the zip), for messages."""
    return str(self.source / self.root) if self.root else str(self.source)

  def display(self, file: str) -> str:
    return file if os.path.isabs(file) else f"{self.root_path}/{file}"

  def counts(self) -> dict[str, int]:
    """Images per class: the database's four classes (0 when absent) and every class found."""
    out = {c: 0 for c in classes_lib.ordered([*classes_lib.CANONICAL, *self.class_folders])}
    for e in self.entries:
      out[e.label] = out.get(e.label, 0) + 1
    return out

  def require_classes(self, wanted: Sequence[str]) -> None:
    """Raises DataError naming the root when a class the run needs has no image."""
    counts = self.counts()
    missing = [c for c in wanted if counts.get(c, 0) == 0]
    if not missing:
      return
    if self.labels_csv:
      raise DataError(
          f"{self.labels_csv}: no image labelled {', '.join(missing)}, which config.data.classes "
          f"asks for. Labels found: "
          f"{', '.join(f'{c} ({k} images)' for c, k in counts.items() if k) or 'none'}.")
    found = ", ".join(f"'{'/'.join(self.class_folders[c])}' ({counts.get(c, 0)} images)"
                      for c in classes_lib.ordered(self.class_folders)) or "none"
    raise DataError(
        f"{self.root_path}: no images of class {', '.join(missing)}, which config.data.classes "
        f"asks for (expected a folder named "
        f"{', '.join(repr(classes_lib.folder_name(c)) for c in missing)}; case, spaces, "
        f"underscores and hyphens do not matter). Class folders "
        f"found: {found}. Set config.data.classes to the classes this copy has.")

  @contextlib.contextmanager
  def reader(self) -> Iterator[Callable[[str], bytes]]:
    """Yields read(file) -> bytes; safe to call from several threads (zipfile locks its reads)."""
    if not self.is_zip:
      base = self.source / self.root if self.root else self.source
      on_disk = self.on_disk
      yield lambda file: (base / on_disk.get(file, file)).read_bytes()
      return
    try:
      zf = zipfile.ZipFile(self.source)
    except (OSError, zipfile.BadZipFile) as e:
      raise DataError(f"{self.source}: cannot open the zip file ({e})") from None
    except UnicodeDecodeError as e:
      raise DataError(_bad_zip_name(self.source, e)) from None
    prefix = self.root + "/" if self.root else ""
    with zf:
      yield lambda file: zf.read(prefix + file)


def discover(data_dir: str | os.PathLike, classes: Sequence[str] = ()) -> Layout:
  """Finds the database under `data_dir` (a folder, a parent folder or the Kaggle zip).

  `classes` (canonical names, config.data.classes) also mark the root: a user's folder holding
  `Tuberculosis/` and `Healthy/` is found from a folder above it.
  """
  given = pathlib.Path(os.path.expanduser(str(data_dir)))
  if not given.exists():
    hint = " (a broken symlink)" if given.is_symlink() else ""
    raise DataError(f"config.data.data_dir: {given} does not exist{hint}. Download the COVID-19 "
                    "Radiography Database from Kaggle and point config.data.data_dir at its "
                    "folder or zip, or leave it empty for the embedded synthetic data.")
  source = given.resolve()
  if source.is_dir():
    tree: _Tree = _FolderTree(source)
  elif source.is_file() and zipfile.is_zipfile(source):
    tree = _ZipTree(source)
  else:
    raise DataError(f"config.data.data_dir: {given} is neither a folder nor a zip file; point it "
                    "at the COVID-19 Radiography Database folder or its Kaggle zip.")
  root = _find_root(tree, given, classes)
  return _read_layout(tree, source, root)


class _Tree:
  """A read-only directory tree: a real folder or the member list of a zip."""

  def children(self, rel: str, peek: bool = False) -> tuple[list[str], list[str]]:
    """(folder names, file names) directly in `rel` ('' is the top), hidden ones left out.

    `peek`: a look that does not count as the scan of `rel` (folder trees visit each folder once).
    """
    raise NotImplementedError

  def file_stamp(self, rel: str) -> str:
    """A string that changes when the file at `rel` changes (for the cache fingerprint)."""
    raise NotImplementedError

  def read(self, rel: str) -> bytes:
    """The bytes of the file at `rel` (OSError when it cannot be read)."""
    raise NotImplementedError


class _FolderTree(_Tree):

  def __init__(self, top: pathlib.Path):
    self.top = top
    self._visited: set[tuple[int, int]] = set()

  def children(self, rel, peek=False):
    path = self.top / rel if rel else self.top
    try:
      st = os.stat(path)
    except OSError:
      return [], []
    key = (st.st_dev, st.st_ino)
    if peek:
      pass
    elif key in self._visited:
      logging.warning("Not scanning %s again: it is a link to a folder already scanned", path)
      return [], []
    else:
      self._visited.add(key)
    dirs, files = [], []
    try:
      with os.scandir(path) as it:
        for e in it:
          if _hidden(e.name):
            continue
          try:
            if e.is_dir():  # follows symlinks; loops are cut by `_visited`
              dirs.append(e.name)
            elif e.is_file():
              files.append(e.name)
            elif e.is_symlink() and images.is_image_name(e.name):
              logging.warning("Skipping %s: a link to a missing file",
                              files_lib.printable(e.path))
          except OSError as err:  # a link loop, or a file that vanished
            if images.is_image_name(e.name):
              logging.warning("Skipping %s: %s", files_lib.printable(e.path), err.strerror or err)
    except OSError as e:
      logging.warning("Cannot list %s (%s); skipping it", path, e.strerror or e)
    return sorted(dirs), sorted(files)

  def reset(self):
    self._visited.clear()

  def real(self, rel: str) -> str:
    return os.path.realpath(self.top / rel if rel else self.top)

  def file_stamp(self, rel):
    try:
      st = os.stat(self.top / rel)
      return f"{st.st_size}:{st.st_mtime_ns}"
    except OSError:
      return "?"

  def read(self, rel):
    return (self.top / rel).read_bytes()


class _ZipTree(_Tree):

  def __init__(self, path: pathlib.Path):
    try:
      with zipfile.ZipFile(path) as zf:
        infos = [i for i in zf.infolist() if not i.is_dir()]
    except (OSError, zipfile.BadZipFile) as e:
      raise DataError(f"{path}: cannot read the zip file ({e})") from None
    except UnicodeDecodeError as e:
      raise DataError(_bad_zip_name(path, e)) from None
    self._dirs: dict[str, set[str]] = {"": set()}
    self._files: dict[str, list[str]] = {"": []}
    self._stamps: dict[str, str] = {}
    for info in infos:
      parts = [p for p in info.filename.split("/") if p]
      if not parts or any(_hidden(p) for p in parts):
        continue
      for i in range(len(parts) - 1):
        parent = "/".join(parts[:i])
        self._dirs.setdefault(parent, set()).add(parts[i])
        self._dirs.setdefault("/".join(parts[:i + 1]), set())
      parent = "/".join(parts[:-1])
      self._files.setdefault(parent, []).append(parts[-1])
      self._stamps["/".join(parts)] = f"{info.file_size}:{info.CRC}"
    self.top = path

  def children(self, rel, peek=False):
    del peek
    return sorted(self._dirs.get(rel, ())), sorted(self._files.get(rel, ()))

  def file_stamp(self, rel):
    return self._stamps.get(rel, "?")

  def read(self, rel):
    try:
      with zipfile.ZipFile(self.top) as zf:
        return zf.read(rel)
    except (KeyError, zipfile.BadZipFile, RuntimeError) as e:
      raise OSError(str(e)) from None


def _link_problem(tree: _Tree, parent: str, name: str, label: str,
                  class_real: dict[str, str]) -> str | None:
  """Why folder `parent/name`, met while reading class `label`, must not be read, or None."""
  if not isinstance(tree, _FolderTree):
    return None
  here, there = tree.real(parent), tree.real(_join(parent, name))
  if here == there or here.startswith(there.rstrip(os.sep) + os.sep):
    return f"a link to {files_lib.printable(there)}, a folder that holds it (a loop)"
  for path, other in class_real.items():
    if other != label and (there == path or there.startswith(path + os.sep)):
      return (f"a link into the {other} class folder {files_lib.printable(path)}; its images "
              f"would be labelled {label}")
  return None


def _bad_zip_name(path: pathlib.Path, e: UnicodeDecodeError) -> str:
  name = e.object[:200] if isinstance(e.object, bytes) else b""
  return (f"{path}: cannot read the zip file: the member name {name!r} is marked UTF-8 but is "
          f"not ({e.reason}). Re-create the zip, or extract it with a tool that repairs names "
          f"and point config.data.data_dir at the folder.")


def _hidden(name: str) -> bool:
  return name.startswith(".") or name.lower() == "__macosx"


def _join(*parts: str) -> str:
  return "/".join(p for p in parts if p)


def _find_root(tree: _Tree, given: pathlib.Path, classes: Sequence[str] = ()) -> str:
  """The shallowest folder that holds a folder named as a class (of the database or of
  `classes`); failing that, the shallowest that holds folders with image files."""
  wanted = set(classes)

  def named(rel: str, dirs: list[str]) -> bool:
    del rel
    return any(classes_lib.database_class(d) or classes_lib.canonical(d) in wanted
               for d in dirs if d.lower() not in _SKIPPED_DIRS)

  def with_images(rel: str, dirs: list[str]) -> bool:
    for d in dirs:
      if d.lower() in (*_SKIPPED_DIRS, "images"):
        continue
      sub_dirs, files = tree.children(_join(rel, d), peek=True)
      if any(images.is_image_name(f) for f in files):
        return True
      if any(x.lower() == "images" for x in sub_dirs) and any(
          images.is_image_name(f) for f in tree.children(_join(rel, d, "images"), peek=True)[1]):
        return True
    return False

  root, seen = _search_root(tree, given, named)
  if root is None:
    if isinstance(tree, _FolderTree):
      tree.reset()
    root, _ = _search_root(tree, given, with_images)
  if root is not None:
    return root
  shown = ", ".join(f"'{s}'" for s in seen[:20]) + (f" and {len(seen) - 20} more"
                                                     if len(seen) > 20 else "")
  hint = ""
  if any(s.lower() in ("images", "masks") for s in seen[:3]):
    hint = " It looks like a single class folder: point at the folder above it."
  raise DataError(
      f"config.data.data_dir: no class folder found in {given} (searched {MAX_DEPTH} levels "
      f"down). Folders seen: {shown or 'none'}. Expected folders named "
      f"{classes_lib.expected_names()}.{hint}")


def _search_root(tree: _Tree, given: pathlib.Path, holds_classes: Callable[[str, list[str]], bool]
                 ) -> tuple[str | None, list[str]]:
  """Breadth-first search for the shallowest folder for which `holds_classes(rel, dirs)`; returns
  it (None if there is none) and the folders seen."""
  level = [""]
  seen: list[str] = []
  scanned = 0
  for _ in range(MAX_DEPTH + 1):
    found, below = [], []
    for rel in level:
      dirs, _ = tree.children(rel)
      scanned += 1
      if holds_classes(rel, dirs):
        found.append(rel)
      for d in dirs:
        if d.lower() in _SKIPPED_DIRS:
          continue
        below.append(_join(rel, d))
    if len(found) > 1:
      shown = ", ".join(str(given / f) if f else str(given) for f in found)
      raise DataError(f"config.data.data_dir: {given} holds several copies of the database "
                      f"({shown}); point config.data.data_dir at one of them.")
    if found:
      if isinstance(tree, _FolderTree):
        tree.reset()  # the root's own scan starts afresh
      return found[0], seen
    seen.extend(below)
    level = below
    if scanned + len(level) > MAX_SCANNED_DIRS:
      break
  return None, seen


def _read_layout(tree: _Tree, source: pathlib.Path, root: str) -> Layout:
  dirs, root_files = tree.children(root)
  class_folders: dict[str, list[str]] = {}
  ignored = []
  for d in dirs:
    c = classes_lib.canonical(d)
    if c is None or d.lower() in _SKIPPED_DIRS:
      ignored.append(d)
    else:
      class_folders.setdefault(c, []).append(d)
  root_shown = str(source / root) if root else str(source)
  for d in ignored:
    logging.warning("Ignoring folder '%s' in %s: it names no class", d, root_shown)
  for c, folders in class_folders.items():
    if len(folders) > 1:
      logging.warning("Folders %s in %s all hold class %s: reading all of them",
                      ", ".join(repr(f) for f in folders), root_shown, c)
  entries: list[Entry] = []
  on_disk: dict[str, str] = {}
  skipped_masks = skipped_other = 0
  in_images_folder = 0
  class_real = {}  # real path of each class folder -> its class (folders only: zips hold no links)
  if isinstance(tree, _FolderTree):
    class_real = {tree.real(_join(root, f)): c for c, fs in class_folders.items() for f in fs}
  for c, folders in class_folders.items():
    for folder in folders:
      stack = [folder]
      while stack:
        rel = stack.pop()
        sub_dirs, files = tree.children(_join(root, rel))
        for d in sub_dirs:
          if d.lower() in _SKIPPED_DIRS:
            skipped_masks += 1
            continue
          problem = _link_problem(tree, _join(root, rel), d, c, class_real)
          if problem:
            logging.warning("Not reading %s: %s",
                            files_lib.printable(str(tree.top / root / rel / d)), problem)
          else:
            stack.append(_join(rel, d))
        for f in files:
          if images.is_image_name(f) or (
              isinstance(tree, _FolderTree) and "." not in f
              and images.has_dicom_preamble(tree.top / root / rel / f)):
            file = _join(rel, f)
            shown = files_lib.printable(file)
            if shown != file:
              on_disk[shown] = file
            entries.append(Entry(shown, c))
            in_images_folder += rel.rsplit("/", 1)[-1].lower() == "images"
          else:
            skipped_other += 1
  entries.sort(key=lambda e: e.file)
  if skipped_masks or skipped_other:
    logging.info("Dataset %s: ignored %d masks/ folder(s) and %d non-image file(s)",
                 root_shown, skipped_masks, skipped_other)
  if on_disk:
    shown = ", ".join(sorted(on_disk)[:5]) + (f" and {len(on_disk) - 5} more"
                                              if len(on_disk) > 5 else "")
    logging.warning("Dataset %s: %d file name(s) are not valid UTF-8; they are read and listed "
                    "with the undecodable bytes escaped: %s", files_lib.printable(root_shown),
                    len(on_disk), shown)
  release = LATER_RELEASE if in_images_folder else FIRST_RELEASE
  digest = hashlib.sha256()
  for e in entries:
    stamp = tree.file_stamp(_join(root, on_disk.get(e.file, e.file)))
    digest.update(f"{e.file}\t{e.label}\t{stamp}\n".encode())
  metadata = _xlsx_sources(tree, root, root_files, entries)
  return Layout(source=source, is_zip=isinstance(tree, _ZipTree), root=root, release=release,
                entries=tuple(entries),
                class_folders={c: tuple(f) for c, f in sorted(class_folders.items())},
                ignored_folders=tuple(ignored), fingerprint=digest.hexdigest()[:16],
                on_disk=on_disk, metadata=metadata)


XLSX_SUFFIX = ".metadata.xlsx"


def _xlsx_sources(tree: _Tree, root: str, root_files: Sequence[str],
                  entries: Sequence[Entry]) -> dict[str, dict[str, str]]:
  """`source` metadata from the later releases' `<Class>.metadata.xlsx` files beside the class
  folders (columns FILE NAME, FORMAT, SIZE, URL): each image named there gets its URL.

  openpyxl is optional (the `xlsx` extra): without it the files are noted and left unread.
  """
  sheets = [f for f in root_files if f.lower().endswith(XLSX_SUFFIX)]
  if not sheets:
    return {}
  try:
    import openpyxl  # pylint: disable=import-outside-toplevel
  except ImportError:
    logging.info("Not reading %s: the source column needs openpyxl (pip install openpyxl, or "
                 "the package's 'xlsx' extra)", ", ".join(sheets))
    return {}
  by_stem: dict[tuple[str, str], str] = {}  # (class, lower-case file stem) -> Entry.file
  for e in entries:
    by_stem[(e.label, pathlib.PurePosixPath(e.file).stem.lower())] = e.file
  out: dict[str, dict[str, str]] = {}
  for sheet in sheets:
    label = classes_lib.canonical(sheet[:-len(XLSX_SUFFIX)])
    shown = files_lib.printable(str(tree.top / root / sheet))
    try:
      book = openpyxl.load_workbook(io.BytesIO(tree.read(_join(root, sheet))), read_only=True,
                                    data_only=True)
      rows = list(book.worksheets[0].iter_rows(values_only=True)) if book.worksheets else []
      book.close()
    except Exception as e:  # pylint: disable=broad-except  # openpyxl raises many kinds
      logging.warning("Not reading %s: not a readable xlsx file (%s)", shown,
                      str(e).splitlines()[0] if str(e) else type(e).__name__)
      continue
    header = [str(h or "").strip().upper() for h in (rows[0] if rows else ())]
    if "FILE NAME" not in header or "URL" not in header:
      logging.warning("Not reading %s: expected columns FILE NAME and URL, found %s", shown,
                      ", ".join(h for h in header if h) or "none")
      continue
    name_col, url_col = header.index("FILE NAME"), header.index("URL")
    matched = 0
    for row in rows[1:]:
      if len(row) <= max(name_col, url_col) or row[name_col] is None or not row[url_col]:
        continue
      stem = pathlib.PurePosixPath(str(row[name_col]).strip()).stem.lower()
      file = by_stem.get((label, stem)) or by_stem.get((label, str(row[name_col]).strip().lower()))
      if file is not None:
        out[file] = {"source": str(row[url_col]).strip()}
        matched += 1
    logging.info("%s: source of %d image(s) of class %s", shown, matched, label)
  return out



def from_labels_csv(labels_csv: str | os.PathLike, data_dir: str | os.PathLike,
                    classes: Sequence[str], *, labels_per_patient: bool = False) -> Layout:
  """The images, labels and metadata a labels CSV lists (config.data.labels_csv).

  Columns (header names in any case): `file` and `label` (required), then any of `split`,
  `patient_id` (alias `group`), `age` (years), `sex`, `view`, `source`, and any other column, kept
  as metadata. `file` is relative to `data_dir` (the CSV's folder when `data_dir` is empty) or
  absolute; every label must be one of `classes` (canonical), or any label when `classes` is empty
  (config.data.classes='auto'); `split` is train, val or test. Each problem raises a DataError
  naming the CSV and its line.
  """
  csv_path = pathlib.Path(os.path.expanduser(str(labels_csv))).resolve()
  if not csv_path.is_file():
    raise DataError(f"config.data.labels_csv: {csv_path} is not a file")
  base = (pathlib.Path(os.path.expanduser(str(data_dir))) if data_dir else csv_path.parent)
  if not base.is_dir():
    raise DataError(f"config.data.data_dir: {base} must be the folder the files of "
                    f"{csv_path} are relative to (a zip is not read with a labels CSV)")
  base = base.resolve()
  try:
    with open(csv_path, newline="", encoding="utf-8-sig") as f:
      rows = list(csv.reader(f))
  except (OSError, UnicodeDecodeError, csv.Error) as e:
    raise DataError(f"{csv_path}: cannot read the labels CSV ({e})") from None
  header = _csv_header(csv_path, rows[0] if rows else [])
  meta_columns = [h for h in header if h not in CSV_COLUMNS]
  wanted = set(classes)
  entries: list[Entry] = []
  given: dict[str, str] = {}
  metadata: dict[str, dict[str, str]] = {}
  first_line: dict[str, int] = {}
  patients: dict[str, tuple[int, str, str]] = {}  # patient -> (first line, label, sex)
  digest = hashlib.sha256(f"{csv_path}\n".encode("utf-8", "surrogateescape"))
  for line, row in enumerate(rows[1:], start=2):
    if not any(cell.strip() for cell in row):
      continue
    where = f"{csv_path}: line {line}"
    if len(row) != len(header):
      raise DataError(f"{where}: {len(row)} field(s), expected {len(header)} "
                      f"({','.join(header)})")
    cells = dict(zip(header, (cell.strip() for cell in row)))
    file, label = cells["file"], cells["label"]
    if not file:
      raise DataError(f"{where}: empty file name")
    path = pathlib.Path(file) if os.path.isabs(file) else base / file
    if not path.is_file():
      raise DataError(f"{where}: file {file!r} not found (looked for {path})")
    file = str(path) if os.path.isabs(file) else pathlib.PurePath(file).as_posix()
    if file in first_line:
      raise DataError(f"{where}: {file!r} is listed again (first on line {first_line[file]})")
    first_line[file] = line
    c = classes_lib.canonical(label)
    if c is None:
      raise DataError(f"{where}: empty label")
    if wanted and c not in wanted:
      raise DataError(f"{where}: label {label!r} is not in config.data.classes "
                      f"({', '.join(classes)})")
    if "split" in cells:
      split = cells["split"].lower()
      if split not in ("train", "val", "test"):
        raise DataError(f"{where}: unknown split {cells['split']!r}; expected train, val or test")
      given[file] = split
    meta = {}
    for k in meta_columns:
      value = normalise_metadata(k, cells[k], where)
      if value:
        meta[k] = value
    patient = meta.get("patient_id", "")
    if patient:
      first, first_label, first_sex = patients.setdefault(patient, (line, c, meta.get("sex", "")))
      if labels_per_patient and first_label != c:
        raise DataError(f"{where}: patient {patient!r} is labelled {c} here and {first_label} on "
                        f"line {first} (config.data.labels_per_patient=True: one label per "
                        "patient)")
      sex = meta.get("sex", "")
      if sex and first_sex and sex != first_sex:
        raise DataError(f"{where}: patient {patient!r} has sex {sex} here and {first_sex} on line "
                        f"{first}")
    if meta:
      metadata[file] = meta
    entries.append(Entry(file, c))
    st = path.stat()
    digest.update(f"{file}\t{c}\t{given.get(file, '')}\t{st.st_size}:{st.st_mtime_ns}\n"
                  .encode("utf-8", "surrogateescape"))
  if not entries:
    raise DataError(f"{csv_path}: lists no images")
  entries.sort(key=lambda e: e.file)
  found = wanted or {e.label for e in entries}
  return Layout(source=base, is_zip=False, root="", release=LABELS_CSV, entries=tuple(entries),
                class_folders={c: (csv_path.name,) for c in classes_lib.ordered(found)},
                fingerprint=digest.hexdigest()[:16], labels_csv=str(csv_path),
                given_splits=given, metadata=metadata)


def _csv_header(csv_path: pathlib.Path, raw: Sequence[str]) -> list[str]:
  """The labels CSV's column names (lower case, `group` read as `patient_id`), checked."""
  where = f"{csv_path}: line 1"
  header = [h.strip().lower() for h in raw]
  if header[:2] != ["file", "label"]:
    raise DataError(f"{where}: malformed header {','.join(raw)!r}; expected 'file,label' "
                    "first, then any of split, patient_id (or group), age, sex, view, source and "
                    "other metadata columns")
  if "group" in header and "patient_id" in header:
    raise DataError(f"{where}: columns 'group' and 'patient_id' both name the patient ('group' "
                    "is read as 'patient_id'); keep one")
  header = ["patient_id" if h == "group" else h for h in header]
  if "age_band" in header and "age" in header:
    raise DataError(f"{where}: column 'age_band' collides with the age band derived from 'age' "
                    "for config.subgroups; rename it or leave it out")
  for k, h in enumerate(header):
    if not h:
      raise DataError(f"{where}: column {k + 1} has no name")
    if h in header[:k]:
      raise DataError(f"{where}: column {h!r} appears twice")
    if h in RESERVED_COLUMNS:
      raise DataError(f"{where}: column {h!r} collides with a column the split manifest writes "
                      f"({', '.join(RESERVED_COLUMNS)}); rename it")
  return header


_SEXES = {"m": "M", "male": "M", "f": "F", "female": "F", "o": "O", "other": "O", "u": "",
          "unknown": ""}


def normalise_metadata(column: str, value: str, where: str) -> str:
  """One metadata value as stored and compared: `age` a number of years, `sex` M / F / O, `view`
  upper case (DICOM's PA, AP, LL...), others as given. Raises DataError naming `where`."""
  value = value.strip()
  if not value:
    return ""
  if column == "age":
    try:
      years = float(value)
    except ValueError:
      years = math.nan
    if not math.isfinite(years) or not 0 <= years <= 150:
      raise DataError(f"{where}: age {value!r} is not a number of years (0-150)")
    return f"{years:g}"
  if column == "sex":
    if value.lower() not in _SEXES:
      raise DataError(f"{where}: sex {value!r} is not M, F, O (or male, female, other, unknown)")
    return _SEXES[value.lower()]
  if column == "view":
    return value.upper()
  return value
