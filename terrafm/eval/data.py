"""Readers for downstream benchmarks: GEO-Bench-style HDF5 and EuroSAT-style folders.

Both return an `EvalSplit`: float32 images (N, C, H, W) with the bands of one of our modalities in
its order (terrafm.modalities), and labels: (N,) class ids, (N, K) multi-hot, or (N, H, W) masks.

HDF5 (GEO-Bench layout): `root/default_partition.json` = {"train": [ids], "valid": [...], "test": [...]}
and `root/<id>.hdf5` with one 2D dataset per band ("01 - Coastal aerosol", ..., "08A - ...", "VV", "VH"; a dated band
is keyed "<name>_<YYYY-MM-DD>")
and the label either as a dataset named "label*" (HxW mask; GEO-Bench segmentation), an attribute
"label", or inside GEO-Bench's pickled attribute dict `attrs["pickle"]` (classification), which is
read with a restricted unpickler (no geobench install needed, no arbitrary code).
Images keep their size here; features.extract resizes them (--img-size) before the patch-multiple check.
Nodata: NaN / inf values, values <= -9999 (the fill of S1 RTC products), a GeoTIFF's own GDAL_NODATA value (or a
band's NoDataValue in its GDAL PAM sidecar `x.tif.aux.xml`, which wins as in GDAL), pixels outside its internal mask
or `.msk` sidecar and, in S2 images, pixels that are 0 in every band (ESA's NO_DATA value:
outside the swath, a detector gap) are read as NaN; the statistics skip them and `normalize` (per batch, in
features.extract) fills them with 0, the band's mean, as `terrafm prepare` does for training tiles. A 0 in some bands
only is kept: a dark pixel clipped at 0 in one band is still a pixel. An image with no valid pixel is refused by name.
A split is held once: readers fill one array image by image (_SplitImages), whole-split work goes by row_chunks.
Folders: `root/<split>/<class>/*.tif|*.npy` for classification, `root/<split>/images/*` with
`root/<split>/masks/*` of the same file names for segmentation.
"""

import ast
import contextlib
import io
import math
import os
import pickle
import re
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from terrafm.data.sources import (
    HUGE_FILL_MIN,
    S1_FILL_MAX,
    effective_nodata,
    external_mask,
    pam_nodata,
    physical_memory,
    read_tiff_layout,
)
from terrafm.fileio import check_regular, file_format, load_json
from terrafm.modalities import MODALITIES, S1_BANDS, S2_BANDS, S2_WITH_B10, s1_to_db

SPLIT_ALIASES = {"train": ("train",), "val": ("val", "valid", "validation"), "test": ("test",)}
# EuroSAT-MS GeoTIFFs store B8A last (phelber/EuroSAT#7, torchgeo#2480), and GEO-Bench's m-eurosat names its
# bands in ESA's order over data in that order (geo-bench#28): the band named B09 holds B10, and so on.
EUROSAT_BANDS = {13: S2_BANDS[:8] + ("B09", "B10", "B11", "B12", "B8A"),
                 12: S2_BANDS[:8] + ("B09", "B11", "B12", "B8A")}
BAND_ORDERS = ("auto", "esa", "eurosat")  # the eval CLI's --band-order choices
IMAGE_SUFFIXES = (".tif", ".tiff", ".npy")
GEOBENCH_DATE = re.compile(r"_\d{4}-\d{2}-\d{2}$")  # GEO-Bench keys a dated band '<name>_<YYYY-MM-DD>'
MAX_CLASSES = 100_000  # a class id at or above this is a broken label, not a class


class MissingSplitError(FileNotFoundError):
    """The dataset has no such split (the optional validation split may be absent)."""


@dataclass
class EvalSplit:
    images: np.ndarray  # (N, C, H, W) float32, bands in the modality's order, NaN where nodata
    labels: np.ndarray  # (N,) int64 | (N, K) multi-hot | (N, H, W) int64 masks
    modality: str
    class_names: list[str] = field(default_factory=list)
    band_order: str = "esa"  # how S2 channels were read: "esa" (B8A 9th) or "eurosat" (B8A last)
    files: list[Path] = field(default_factory=list)  # each image's file (one file in two splits is refused by the
    #                                                  runner; HDF5: GEO-Bench's label-fraction partitions name them)

    @property
    def task(self) -> str:
        """'classification', 'multilabel' or 'segmentation', from the label shape."""
        return {1: "classification", 2: "multilabel", 3: "segmentation"}[self.labels.ndim]


def modality_for_bands(bands: list[str], modality: str = "auto", stored: list[str] | None = None,
                       source: Path | None = None) -> tuple[str, list[int]]:
    """Choose the modality that the dataset's band names fit and the indices that select its bands.

    S2 products with B10 (13 bands) drop it; anything else must contain every band of the modality. stored: the
    names as the dataset spells them, when `bands` are their S2/S1 readings, and source: the file they were read
    from (both for the message only).
    """
    wanted = {name: [b for b in MODALITIES[name].bands] for name in MODALITIES}
    fits = [m for m, bs in wanted.items() if set(bs) <= set(bands)]
    if modality == "auto":
        if not fits:
            raise ValueError(_no_fit_message(bands, stored, source))
        s2 = [m for m in fits if m.startswith("s2")]
        modality = ("s2_l1c" if "B10" in bands else "s2_l2a") if s2 else fits[0]
    elif modality not in MODALITIES:
        raise ValueError(f"unknown modality {modality!r}; expected 'auto' or one of {list(MODALITIES)}")
    elif modality not in fits:
        raise ValueError(f"--modality {modality}: " + _no_fit_message(bands, stored, source))
    return modality, [bands.index(b) for b in wanted[modality]]


def _no_fit_message(bands: list[str], stored: list[str] | None = None, source: Path | None = None) -> str:
    """The dataset's bands as it names them (another sensor's numbered bands, e.g. Landsat's '04 - Red', read as
    S2 numbers would name S2 bands it does not hold) and the file they come from (the first sample's: a band
    missing there only is refused here), then what fits."""
    named = f"{stored} (read as {bands})" if stored is not None and list(stored) != list(bands) else f"{bands}"
    where = f"{source} (the first sample, whose bands decide): " if source is not None else ""
    return (
        f"{where}the dataset's {len(bands)} bands {named} fit no modality; what fits: s2_l2a / s2_l1c = 12 bands "
        f"{list(S2_BANDS)} (13 with B10, which is dropped), s1 = 2 bands {list(S1_BANDS)}"
    )


def bands_from_count(count: int, order: str = "esa") -> list[str]:
    """Band names of an unnamed (folder) image from its channel count: 13/12 -> S2 in ESA's order (B8A after
    B08) or EuroSAT's (B8A last), 2 -> S1."""
    known = {13: list(S2_WITH_B10), 12: list(S2_BANDS), 2: list(S1_BANDS)}
    if count not in known:
        raise ValueError(
            f"images have {count} bands, which fit no modality; what fits: 12 bands (s2_l2a / s2_l1c, "
            f"{list(S2_BANDS)}), 13 bands (S2 with B10, which is dropped) or 2 bands (s1, VV VH)"
        )
    return list(EUROSAT_BANDS[count]) if order == "eurosat" and count in EUROSAT_BANDS else known[count]


def _band_pixels(images: np.ndarray) -> np.ndarray:
    """(C, P) float64: a subsample of every band's pixels (256 images, every 4th row and column), enough for the
    band-layout checks below."""
    sample = images[:256, :, ::4, ::4].astype(np.float64)
    return sample.transpose(1, 0, 2, 3).reshape(sample.shape[1], -1)


def cirrus_order(images: np.ndarray) -> str | None:
    """Which 13-band order (N, 13, H, W) S2 reflectances are in, from where the cirrus band B10 sits: its top of
    atmosphere reflectance is near 0 except under cirrus, the lowest of the 13 bands by far (also with the +1000
    offset of processing baseline 04.00). ESA's order puts B10 11th, EuroSAT's 10th. None when the data cannot
    tell (normalised values, the lowest band elsewhere or not clearly lowest)."""
    medians = np.nanmedian(_band_pixels(images), axis=1)
    if not np.isfinite(medians).all() or medians.min() <= 0:
        return None
    lowest, second = np.argsort(medians)[:2]
    if medians[lowest] > 0.8 * medians[second]:
        return None
    return {10: "esa", 9: "eurosat"}.get(int(lowest))


def true_colour_tail(images: np.ndarray) -> bool:
    """Whether 13-band (N, 13, H, W) S2 data ends in three 8-bit bands (integers in 0-255, a true-colour RGB) after
    ten bands of reflectance (medians over 255): GEO-Bench's m-brick-kiln (geo-bench#29)."""
    sample = _band_pixels(images)
    tail = sample[10:]
    tail = tail[np.isfinite(tail)]
    if tail.size == 0 or tail.min() < 0 or tail.max() > 255 or not np.array_equal(tail, np.round(tail)):
        return False
    return bool((np.nanmedian(sample[:10], axis=1) > 255).all())


def resolve_band_order(images: np.ndarray, band_order: str, where: str) -> str:
    """"esa" or "eurosat" for this S2 data: as asked, or with "auto" what cirrus_order reads from 13 bands; a
    12-band set, or one the data cannot tell, is taken in ESA's order (with a warning for 13 bands)."""
    if band_order not in BAND_ORDERS:
        raise ValueError(f"unknown band order {band_order!r}; expected one of {list(BAND_ORDERS)}")
    if images.shape[1] == 13 and true_colour_tail(images):
        warnings.warn(f"{where}: its last three bands hold 8-bit values (0-255) where S2 reflectances are expected: "
                      "the layout of GEO-Bench's m-brick-kiln, whose data is B01-B05, B07, B8A, B08, B11, B12 and a "
                      "true-colour RGB under the 13 S2 band names (ServiceNow/geo-bench#29). The bands are read as "
                      "named, as published GEO-Bench results were, so B06 to B12 do not hold what their names say",
                      stacklevel=2)
    if band_order != "auto":
        return band_order
    if images.shape[1] != 13:
        return "esa"
    found = cirrus_order(images)
    if found is None:
        warnings.warn(f"{where}: cannot tell the order of its 13 S2 bands from the data (no clearly lowest, cirrus "
                      "band B10 in 11th or 10th place); reading them in ESA's order (B8A after B08). Pass --band-order "
                      "eurosat if B8A is the last band, as in EuroSAT-MS", stacklevel=2)
        return "esa"
    return found


def geobench_band_name(name: str) -> str:
    """'08A - Vegetation Red Edge' -> 'B8A', '01 - Coastal aerosol' -> 'B01', 'VV' -> 'VV'. Radar bands are told
    by their polarisation first (m-so2sat numbers them too: '06 - VV.LEE Filtered' -> 'VV'); a complex
    component ('01 - VH.Real', '08 - VV.LEE Filtered.Imaginary') is not backscatter power and keeps its name."""
    pols = [p for p in S1_BANDS if re.search(rf"(?<![A-Za-z]){p}(?![A-Za-z])", name, flags=re.IGNORECASE)]
    if pols:
        complex_part = re.search(r"real|imag", name, flags=re.IGNORECASE)
        return name if complex_part or len(pols) > 1 else pols[0]
    m = re.match(r"^\s*(\d{1,2})(A?)\s*-", name)
    if m:
        num, a = int(m.group(1)), m.group(2)
        return f"B{num}A" if a else f"B{num:02d}"
    return name


def _split_key(available: list[str] | dict, split: str, where: str) -> str:
    for alias in SPLIT_ALIASES.get(split, (split,)):
        if alias in available:
            return alias
    hint = ""
    if isinstance(available, list) and not available and Path(where).is_dir() and next(Path(where).glob("*.hdf5"),
                                                                                       None):
        hint = " (its .hdf5 files are GEO-Bench samples: --format hdf5)"
    raise MissingSplitError(f"split {split!r} not found in {where}; it has {sorted(available)}{hint}")


# -- HDF5 -------------------------------------------------------------------------------------------
def read_hdf5(root: str | Path, split: str, modality: str = "auto", band_order: str = "auto") -> EvalSplit:
    """Read one split of a GEO-Bench-style HDF5 dataset (see module docstring). S2 bands are taken by their names
    in ESA's order; band_order "eurosat" reads the 12/13 S2 bands, sorted by name, as holding EuroSAT's order
    (m-eurosat's shifted names), and "auto" tells the two apart from the data (resolve_band_order)."""
    import h5py

    root = Path(root)
    partition_file = root / "default_partition.json"
    if not partition_file.exists():
        _refuse_broken_link(partition_file)
        inside = sorted(p.parent.name for p in root.glob("*/default_partition.json"))  # a benchmark folder
        hint = f"; {root} holds the datasets {inside[:8]}: pass one, e.g. {root / inside[0]}" if inside else ""
        raise FileNotFoundError(f"{partition_file} not found: a GEO-Bench dataset lists its splits there{hint}")
    try:
        partition = load_json(partition_file)
    except (OSError, ValueError) as err:
        raise ValueError(f"{partition_file}: not a readable JSON partition ({err})") from err
    if not isinstance(partition, dict):
        raise ValueError(f"{partition_file}: expected an object of splits, e.g. "
                         '{"train": [ids], "valid": [ids], "test": [ids]}')
    key = _split_key(partition, split, str(partition_file))
    ids = partition[key]
    if not isinstance(ids, list) or not all(isinstance(i, str) and i and "/" not in i and "\\" not in i
                                            and i not in (".", "..") for i in ids):
        raise ValueError(f"split {split!r} in {partition_file} must be a list of sample ids (file names without "
                         f".hdf5 in {root}), got {str(ids)[:100]}")
    if not ids:  # an empty validation split is no validation split
        raise MissingSplitError(f"split {split!r} in {partition_file} is empty")
    _refuse_shared_samples(partition, key, partition_file)
    ids = sorted(ids)  # rows in sample-id order: seeded subsets and hold-outs pick by row, not the list's order
    band_names, chosen, paths, s2_set = None, None, [], None

    def choose(head: np.ndarray) -> tuple[str, list[int], str]:
        if s2_set is None:  # the bands read are the modality's, in its order
            return modality, list(range(head.shape[1])), "esa"
        order = resolve_band_order(head, band_order, f"split {split!r} of {root}")
        return (*modality_for_bands(bands_from_count(len(s2_set), order), modality), order)

    images, labels = _SplitImages(len(ids), choose), _Rows(len(ids))
    for sample_id in ids:
        path = root / f"{sample_id}.hdf5"
        if not path.exists():
            _refuse_broken_link(path)
            raise FileNotFoundError(f"{path} is listed in split {split!r} of {partition_file} but missing")
        try:
            check_regular(path)  # a FIFO blocked h5py until a writer came
            f = h5py.File(path, "r")
        except OSError as err:  # not HDF5, truncated, a folder: h5py's message is long, its first line says it
            kind = file_format(path, "an HDF5 file")
            if kind:
                raise ValueError(f"{path}: not an HDF5 file: it is {kind}") from err
            raise ValueError(f"{path}: not a readable HDF5 file ({str(err).splitlines()[0][:160]})") from err
        with f, _damaged_hdf5(path):
            keys = _band_keys(f, path)
            names = list(keys)
            if band_names is None:
                band_names = names
                mapped = [geobench_band_name(n) for n in names]
                s2_set = next((b for b in (S2_WITH_B10, S2_BANDS) if set(b) <= set(mapped)), None)
                if s2_set is not None and modality in ("auto", "s2_l2a", "s2_l1c"):
                    chosen = [mapped.index(b) for b in s2_set]  # all of them, by name; selected once the order is known
                else:
                    s2_set = None
                    modality, chosen = modality_for_bands(mapped, modality, stored=names, source=path)
            else:  # bands the read does not use (a cloud mask in some samples) do not matter
                lacking = [band_names[i] for i in chosen if band_names[i] not in keys]
                if lacking:
                    raise ValueError(f"{path} lacks band(s) {lacking}, which the first sample has and the split is "
                                     f"read with; it has {names}")
            bands = [_hdf5_band(f, keys[band_names[i]], path) for i in chosen]
            image = _mask_nodata(_stack_bands(bands, path, [band_names[i] for i in chosen]), path)
            first = images.first_shape or image.shape
            if image.shape != first:
                raise ValueError(f"{path} is {image.shape[1]}x{image.shape[2]} px, the first sample of split {split!r} "
                                 f"{first[1]}x{first[2]}: a split's images must share one size")
            label = _label_shape(class_ids(_hdf5_label(f, path), path, split), path)
            if label.ndim == 2 and label.shape != image.shape[1:]:
                raise ValueError(f"{path}: its label mask is {label.shape[0]}x{label.shape[1]} px, its image "
                                 f"{image.shape[1]}x{image.shape[2]}: a mask must cover its image pixel for pixel")
            images.add(image, path)
            labels.add(label, path)
            paths.append(path)
    y = labels.array()
    return EvalSplit(images.array(), y.astype(np.float32) if y.ndim == 2 else y, images.modality,
                     band_order=images.order, files=paths)


HEAD = 256  # the images the band-layout checks look at (_band_pixels)


class _SplitImages:
    """A split's images in one (N, C, H, W) float32 array, filled image by image as they are read, so the split is
    held once (GEO-Bench m-bigearthnet: ~14 GB a copy), not as a list, its stack and a band selection of that. The
    first HEAD images are held until choose(their stack) -> (modality, bands to keep, band order) can tell which
    bands to keep; from then on each image's kept bands go straight into the array, S2 pixels empty in all of them
    masked (_mask_s2_empty)."""

    def __init__(self, count: int, choose):
        self.count, self.choose = count, choose
        self.head: list[tuple[np.ndarray, Path]] = []
        self.out, self.filled, self.first_shape = None, 0, None
        self.modality, self.bands, self.order = "", [], "esa"

    def add(self, image: np.ndarray, path: Path) -> None:
        self.first_shape = self.first_shape or image.shape
        if self.out is not None:
            self._put(image, path)
            return
        self.head.append((image, path))
        if len(self.head) == min(HEAD, self.count):
            self.modality, self.bands, self.order = self.choose(np.stack([im for im, _ in self.head]))
            self.out = np.empty((self.count, len(self.bands), *image.shape[1:]), np.float32)
            head, self.head = self.head, []
            while head:
                self._put(*head.pop(0))

    def _put(self, image: np.ndarray, path: Path) -> None:
        i = self.filled
        self.out[i] = image[self.bands]
        _mask_s2_empty(self.out[i:i + 1], self.modality, [path])
        self.filled += 1

    def array(self) -> np.ndarray:
        return self.out


class _Rows:
    """Per-sample arrays of one shape (labels) in one (N, ...) array allocated at the first, not a list and its
    stack; a sample of another shape is refused by name."""

    def __init__(self, count: int):
        self.count, self.out, self.filled = count, None, 0

    def add(self, row: np.ndarray, path: Path) -> None:
        if self.out is None:
            self.out = np.empty((self.count, *row.shape), row.dtype)
        elif row.shape != self.out.shape[1:]:
            raise ValueError(f"{path}: its label has shape {row.shape}, the first sample's {self.out.shape[1:]}: a "
                             "split's labels are class ids, multi-hot vectors or masks of one shape")
        self.out[self.filled] = row
        self.filled += 1

    def array(self) -> np.ndarray:
        return self.out


def geobench_label_subset(root: str | Path, fraction: float, train_files: list[Path]) -> tuple[np.ndarray, str] | None:
    """(indices into the train split, file name) of GEO-Bench's own label-fraction partition for `fraction`
    (`{fraction:.2f}x_train_partition.json`, e.g. 0.01x_train_partition.json: its "train" ids), so 1% results
    compare with GEO-Bench's; None where the dataset has no such file. Ids outside the default train split are
    refused by name."""
    path = Path(root) / f"{fraction:.2f}x_train_partition.json"
    if round(fraction, 2) != fraction:  # 0.005 is not the 0.01x file's fraction
        return None
    if not path.is_file():
        _refuse_broken_link(path)  # else a stratified subset would stand in for GEO-Bench's, in silence
        return None
    try:
        ids = load_json(path).get("train")
    except (OSError, ValueError, AttributeError) as err:
        raise ValueError(f"{path}: not a readable JSON partition with a 'train' list ({err})") from err
    if not isinstance(ids, list) or not ids or not all(isinstance(i, str) for i in ids):
        raise ValueError(f"{path}: 'train' must be a non-empty list of sample ids, got {str(ids)[:100]}")
    _refuse_shared_samples({"train": ids}, "train", path)  # an id listed twice would count once, in silence
    where = {f.stem: i for i, f in enumerate(train_files)}
    outside = [i for i in ids if i not in where]
    if outside:
        raise ValueError(f"{path} lists {len(outside)} sample(s) that are not in default_partition.json's train "
                         f"split (e.g. {outside[0]!r}): a label subset must come from the training samples")
    return np.array(sorted({where[i] for i in ids})), path.name


def _refuse_broken_link(path: Path) -> None:
    """A symlink whose target is gone is refused by name with where it points, not read as "missing": GEO-Bench
    writes default_partition.json as an absolute link to {name}_partition.json in the folder it was made in, so it
    dangles once the dataset folder is moved. A missing file that is no link is the caller's to name."""
    if not path.is_symlink():
        return
    target = os.readlink(path)
    sibling = path.parent / Path(target).name
    fix = (f"; the folder was moved? link it again where it is: ln -sf {sibling.name} {path}"
           if sibling.is_file() and sibling != path else "")
    raise FileNotFoundError(f"{path} is a broken symlink: it points to {target}, which does not exist{fix}")


def _refuse_shared_samples(partition: dict, key: str, partition_file: Path) -> None:
    """A sample listed in this split and another one would be scored by a probe fit on it, and one listed twice in a
    split would count twice: both refused by name."""
    mine = set(partition[key])
    if len(mine) < len(partition[key]):
        twice = sorted(i for i, n in Counter(partition[key]).items() if n > 1)
        raise ValueError(f"{partition_file} lists {len(twice)} sample{'s' * (len(twice) > 1)} more than once in "
                         f"{key!r} (e.g. {twice[0]!r}): it would count twice; fix the partition")
    splits = {alias for aliases in SPLIT_ALIASES.values() for alias in aliases}
    for other, ids in partition.items():
        if other == key or other not in splits or not isinstance(ids, list):  # a key no split reads ("all") is not one
            continue
        shared = sorted(mine.intersection(i for i in ids if isinstance(i, str)))
        if shared:
            raise ValueError(f"{partition_file} lists {len(shared)} sample{'s' * (len(shared) > 1)} in both {key!r} "
                             f"and {other!r} (e.g. {shared[0]!r}): a probe would be scored on images it was fit on; "
                             "fix the partition")


@contextlib.contextmanager
def _damaged_hdf5(path: Path):
    """Errors h5py raises on a file that opens but whose inner metadata is damaged (a byte changed in a download or
    on disk: RuntimeError, KeyError or OSError, from whichever read meets the damage) -> ValueError naming the file;
    they were a traceback, or "cannot write" the --out folder."""
    try:
        yield
    except (OSError, RuntimeError, KeyError) as err:
        first = str(err.args[0] if err.args else err).splitlines()[0][:160]
        raise ValueError(f"{path}: damaged HDF5 file, not readable ({type(err).__name__}: {first}); download it "
                         "again") from err


def _band_keys(f, path: Path) -> dict[str, str]:
    """{band name: dataset key} of a sample's bands (every dataset but 'label*'). GEO-Bench keys a band with an
    acquisition date as '<name>_<YYYY-MM-DD>' (m-cashew-plant: each sample has its own date), so names are compared
    without it. One band at several dates is a time series, which eval does not read: refused by name."""
    keys = {}
    for key in f.keys():
        if key.startswith("label"):
            continue
        name = GEOBENCH_DATE.sub("", key)
        if name in keys:
            raise ValueError(f"{path} holds band {name!r} at several dates ({keys[name]!r}, {key!r}): a time series; "
                             "terrafm eval reads one image per sample")
        keys[name] = key
    return keys


def _drop_band_axis(mask: np.ndarray) -> np.ndarray:
    """A mask stored with a singleton band axis, (1, H, W) or (H, W, 1), as (H, W); any other array as it is."""
    if mask.ndim == 3 and 1 in (mask.shape[0], mask.shape[-1]):
        return mask[0] if mask.shape[0] == 1 else mask[..., 0]
    return mask


def _label_shape(label: np.ndarray, path: Path) -> np.ndarray:
    """A sample's label as a class id (), a multi-hot vector (K,) or a mask (H, W). A one-element vector is a class
    id (not a multi-label set of one class); a mask with a singleton band axis, (1, H, W) or (H, W, 1), is squeezed
    as folder masks are; any other shape is refused by name."""
    if label.shape == (1,):
        return label.reshape(())
    if label.size == 0:  # a multi-hot vector of no class scored every F1 and mAP 0 without a word
        raise ValueError(f"{path}: its label is empty (shape {label.shape}); expected a class id, a multi-hot vector "
                         "(K,) or a mask (H, W)")
    label = _drop_band_axis(label)
    if label.ndim > 2:
        raise ValueError(f"{path}: its label has shape {label.shape}; expected a class id, a multi-hot vector (K,) "
                         "or a mask (H, W)")
    return label


def _hdf5_member(f, name: str, path: Path, what: str):
    """f[name], refusing by name a link to another file (reading it would open a file outside the sample) and a
    link to nothing in this one (h5py's KeyError)."""
    import h5py

    link = f.get(name, getlink=True)
    if isinstance(link, h5py.ExternalLink):
        raise ValueError(f"{path}: {what} {name!r} is a link to {link.filename!r}; a sample's data must be in its "
                         "own file")
    try:
        member = f[name]
    except KeyError as err:
        target = getattr(link, "path", "?")
        raise ValueError(f"{path}: {what} {name!r} is a link to {target!r}, which is not in the file") from err
    # a soft link into a group reached through an external link lands in another file all the same
    if os.path.realpath(member.file.filename) != os.path.realpath(f.filename):
        raise ValueError(f"{path}: {what} {name!r} leads into {member.file.filename!r} through a link; a sample's "
                         "data must be in its own file")
    # raw data kept in other files (external storage, a virtual dataset: a missing source read as zeros in silence)
    if isinstance(member, h5py.Dataset) and (member.external or member.is_virtual):
        kind = "a virtual dataset" if member.is_virtual else "external storage"
        raise ValueError(f"{path}: {what} {name!r} keeps its data in other files ({kind}); a sample's data must be in "
                         "its own file")
    # a chunked dataset declares any shape in a few bytes: read as float32 it must fit in the machine's memory
    if isinstance(member, h5py.Dataset) and math.prod(member.shape or ()) * 8 > physical_memory():
        raise ValueError(f"{path}: {what} {name!r} declares shape {member.shape}, more than this machine's "
                         f"{physical_memory() / 2**30:.0f} GiB of memory could read: a damaged or foreign file")
    return member


def _hdf5_band(f, name: str, path: Path) -> np.ndarray:
    """One band as a 2D float32 array; anything else (a 3D dataset, strings, a group, a broken or external link)
    names the file and band."""
    try:
        band = np.asarray(_hdf5_member(f, name, path, "band"), dtype=np.float32)
    except (TypeError, ValueError, OSError) as err:
        raise ValueError(f"{path}: band {name!r} is not a numeric array ({err})") from err
    except MemoryError as err:
        raise ValueError(f"{path}: band {name!r} does not fit in this process's memory ({err})") from err
    if band.ndim != 2 or min(band.shape) < 1:
        raise ValueError(f"{path}: band {name!r} has shape {band.shape}; GEO-Bench bands are 2D (H, W)")
    return band


def _mask_nodata(image: np.ndarray, path: Path, declared: float | None = None) -> np.ndarray:
    """Nodata pixel values -> NaN: NaN / inf, S1 fill (<= S1_FILL_MAX), float fills (>= HUGE_FILL_MIN: one such
    pixel made a band's std ~1e35 and every feature of the split constant) and the file's declared nodata value.
    An image with no valid pixel carries nothing to probe: refused by name."""
    bad = _nodata(image, declared)
    if bad.all():
        raise ValueError(f"{path}: every pixel is nodata (NaN/inf, <= {S1_FILL_MAX:g}, >= {HUGE_FILL_MIN:g} or the "
                         "file's declared nodata value): remove the sample from the split")
    if bad.any():
        image = np.where(bad, np.float32(np.nan), image)
    return image


def _nodata(image: np.ndarray, declared: float | np.ndarray | None = None) -> np.ndarray:
    """Where `image` holds nodata (bool, its shape): NaN / inf, S1 fill, huge float fill, the declared value."""
    bad = ~np.isfinite(image) | (image <= S1_FILL_MAX) | (image >= HUGE_FILL_MIN)
    if declared is not None:
        bad |= image == np.float32(declared)
    return bad


def _mask_s2_empty(images: np.ndarray, modality: str, paths: list[Path]) -> np.ndarray:
    """S2 pixels that are 0 (or already nodata) in every band -> NaN, in place: ESA's NO_DATA value. paths[i]
    names image i when all of it is empty."""
    if not modality.startswith("s2"):
        return images
    empty = np.all((images == 0) | np.isnan(images), axis=1)  # (N, H, W)
    for i in np.flatnonzero(empty.all(axis=(1, 2))):
        raise ValueError(f"{paths[i]}: every pixel is nodata (0 in every S2 band, or NaN/inf or declared nodata): "
                         "remove the sample from the split")
    np.copyto(images, np.nan, where=empty[:, None])
    return images


def _stack_bands(bands: list[np.ndarray], path: Path, names: list[str]) -> np.ndarray:
    """(C, H, W) from 2D bands; bands stored at a coarser grid (20 m / 60 m) have their nodata set to NaN on that
    grid and are brought to the finest one by nearest-neighbour (pixel replication at 2x / 6x, as `terrafm prepare`
    makes training tiles). Bilinear resizing blended a fill value (-9999, S2's 0) into its valid neighbours, which
    then passed as data. A band whose aspect differs from the finest one's covers another area: refused."""
    shape = max((b.shape for b in bands), key=lambda s: s[0] * s[1])
    if all(b.shape == shape for b in bands):
        return np.stack(bands)
    for b, name in zip(bands, names, strict=True):  # h / H = w / W up to one pixel of rounding at each side
        if abs(b.shape[0] * shape[1] - b.shape[1] * shape[0]) > max(shape):
            raise ValueError(f"{path}: band {name!r} is {b.shape[0]}x{b.shape[1]} px and the finest band "
                             f"{shape[0]}x{shape[1]}: not the same area at a coarser grid")
    import torch
    import torch.nn.functional as F

    def up(b: np.ndarray) -> np.ndarray:
        if b.shape == shape:
            return b
        b = np.where(_nodata(b), np.float32(np.nan), b.astype(np.float32, copy=False))
        return F.interpolate(torch.from_numpy(b)[None, None], size=shape, mode="nearest")[0, 0].numpy()

    return np.stack([up(b) for b in bands])


def _hdf5_label(f, path: Path) -> np.ndarray:
    """The sample's raw label: a 'label*' dataset, a 'label' attribute or the 'label' of attrs['pickle']."""
    masks = [k for k in f.keys() if k.startswith("label")]
    dataset = _hdf5_member(f, masks[0], path, "label") if masks else None
    try:
        if dataset is not None:
            return np.asarray(dataset)
        if "label" in f.attrs:
            return np.asarray(f.attrs["label"])
    except (OSError, ValueError, TypeError) as err:  # a damaged chunk, an unreadable attribute
        raise ValueError(f"{path}: its label is not readable ({str(err).splitlines()[0][:160]})") from err
    if "pickle" in f.attrs:
        raw = f.attrs["pickle"]  # h5py's OSError on a damaged heap: the caller names a damaged HDF5 file
        try:
            if isinstance(raw, bytes) and raw[:2] in (b"b'", b'b"'):  # GEO-Bench's str(pickle.dumps(...)) as bytes
                raw = raw.decode("ascii")
            attrs = _StubUnpickler(io.BytesIO(raw if isinstance(raw, bytes) else ast.literal_eval(raw))).load()
            found = isinstance(attrs, dict) and "label" in attrs
        except pickle.UnpicklingError as err:
            raise pickle.UnpicklingError(f"{path}: {err}") from err
        except Exception as err:  # damaged bytes fail anywhere in the unpickler (a bad encoding name: LookupError)
            raise ValueError(f"{path}: attrs['pickle'] is not GEO-Bench's pickled attribute dict "
                             f"({type(err).__name__}: {str(err)[:160]})") from err
        if found and isinstance(attrs["label"], _Unreadable):
            raise pickle.UnpicklingError(f"{path}: attrs['pickle'] holds a label that is {attrs['label'].why}")
        if found:
            return np.asarray(attrs["label"])
    raise ValueError(f"{path} has no label: expected a 'label' dataset, a 'label' attribute or GEO-Bench's "
                     "attrs['pickle'] with a 'label' entry")


class _Stub:
    """Stands in for GEO-Bench's own classes (BandInfo, ...) inside its pickled sample attributes."""

    def __init__(self, *args, **kwargs):
        self.args = args

    def __setstate__(self, state):
        self.__dict__["state"] = state


# numpy dtypes a pickled label may have: bool, ints, floats, complex, bytes, text, object (a list of values)
_DTYPE_CODE = re.compile(r"[biufc]\d{1,2}|[SU]\d{0,6}|O\d?")


class _PickledDtype:
    """numpy.dtype(code, align, copy) and its BUILD state, as plain data: numpy's own dtype.__setstate__ is not
    memory-safe on damaged state (a flipped byte crashed the process), so only a simple code and byte order build
    a dtype, in dtype()."""

    def __init__(self, code=None, align=False, copy=True):
        self.code, self.state = code, None

    def __setstate__(self, state):
        self.state = state

    def dtype(self) -> np.dtype:
        code, state = self.code, self.state
        if not (isinstance(code, str) and _DTYPE_CODE.fullmatch(code)):
            raise pickle.UnpicklingError(f"a pickled numpy dtype {str(code)[:20]!r} that a label never has")
        order = "|"
        if state is not None:
            if not (isinstance(state, tuple) and len(state) >= 6 and state[1] in ("<", ">", "|", "=")
                    and all(x is None for x in state[2:5]) and isinstance(state[5], int)):
                raise pickle.UnpicklingError("a pickled numpy dtype with fields or a damaged state")
            order = state[1]
            if code[0] in "SU" and state[5] > 0:  # the item size in bytes, where the code has none (old numpy)
                code = f"{code[0]}{state[5] // (4 if code[0] == 'U' else 1)}"
        if code[0] == "O":
            return np.dtype(object)
        return np.dtype(code).newbyteorder(order) if order in "<>" else np.dtype(code)


class _PickledArray:
    """numpy's _reconstruct(ndarray, ...) and its BUILD state (version, shape, dtype, fortran, data), checked before
    an array is made from them (array()): numpy's ndarray.__setstate__ trusts them."""

    def __init__(self, *_args):
        self.state = None

    def __setstate__(self, state):
        self.state = state

    def array(self) -> np.ndarray:
        state = self.state
        if not (isinstance(state, tuple) and len(state) == 5 and isinstance(state[2], _PickledDtype)):
            raise pickle.UnpicklingError("a pickled numpy array with a damaged state")
        _, shape, dtype, fortran, data = state
        return _array_from(data, dtype.dtype(), shape, "F" if fortran else "C")


def _array_from(data, dtype: np.dtype, shape, order: str) -> np.ndarray:
    """An array of `shape` from a pickle's raw bytes (or, for object arrays, its list of values), sizes checked."""
    if not (isinstance(shape, tuple) and all(isinstance(n, int) and 0 <= n < 1 << 31 for n in shape)
            and order in ("C", "F")):
        raise pickle.UnpicklingError(f"a pickled numpy array with a damaged shape {str(shape)[:40]}")
    count = math.prod(shape)
    if dtype.kind == "O":
        if not (isinstance(data, list) and len(data) == count):
            raise pickle.UnpicklingError("a pickled object array whose values do not fill its shape")
        values = np.empty(count, dtype=object)
        values[:] = [_resolve(v) for v in data]
        return values.reshape(shape, order=order)
    if not (isinstance(data, bytes | bytearray) and len(data) == count * dtype.itemsize):
        raise pickle.UnpicklingError("a pickled numpy array whose bytes do not fill its shape")
    return np.frombuffer(bytes(data), dtype=dtype).reshape(shape, order=order).copy()


class _Unreadable:
    """A pickled numpy value that does not rebuild safely (why): an error only if it is the label."""

    def __init__(self, why: str):
        self.why = why


def _scalar(dtype, data=None):
    """numpy's multiarray.scalar(dtype, bytes): a numpy scalar (an object dtype's holds its value)."""
    try:
        if not isinstance(dtype, _PickledDtype):
            raise pickle.UnpicklingError("a pickled numpy scalar without a dtype")
        dtype = dtype.dtype()
        return data if dtype.kind == "O" else _array_from(data, dtype, (), "C")[()]
    except pickle.UnpicklingError as err:
        return _Unreadable(str(err))


def _frombuffer(data, dtype, shape, order):
    """numpy's _frombuffer (protocol 5 pickles of arrays)."""
    try:
        if not isinstance(dtype, _PickledDtype):
            raise pickle.UnpicklingError("a pickled numpy array without a dtype")
        return _array_from(data, dtype.dtype(), shape, order)
    except pickle.UnpicklingError as err:
        return _Unreadable(str(err))


def _latin1(text, encoding="utf-8"):
    """_codecs.encode as protocol 2 pickles call it for bytes: latin-1 text to bytes, no other codec."""
    if not (isinstance(text, str) and encoding in ("latin1", "latin-1")):
        raise pickle.UnpicklingError(f"refusing _codecs.encode with {str(encoding)[:20]!r} in a sample's "
                                     "attrs['pickle']")
    return text.encode("latin-1")


def _resolve(value):
    """A loaded value with the pickled numpy arrays in it made arrays (lists, tuples and dicts walked); one that does
    not rebuild safely is _Unreadable."""
    try:
        if isinstance(value, _PickledArray):
            return value.array()
        if isinstance(value, _PickledDtype):
            return value.dtype()
    except pickle.UnpicklingError as err:
        return _Unreadable(str(err))
    if isinstance(value, list | tuple):
        return type(value)(_resolve(v) for v in value)
    if isinstance(value, dict):
        return {k: _resolve(v) for k, v in value.items()}
    return value


class _StubUnpickler(pickle.Unpickler):
    """Loads plain data, numpy arrays (rebuilt from checked raw bytes, never numpy's own __setstate__) and dates;
    GEO-Bench classes become _Stub; anything else is refused."""

    ALLOWED = {("copyreg", "_reconstructor"), ("collections", "OrderedDict"), ("collections", "defaultdict"),
               ("datetime", "date"), ("datetime", "datetime"), ("datetime", "timedelta"),
               *(("builtins", n) for n in ("object", "set", "frozenset", "tuple", "list", "dict", "complex",
                                           "slice"))}
    NUMPY = {"dtype": _PickledDtype, "ndarray": _PickledArray, "_reconstruct": _PickledArray, "scalar": _scalar,
             "_frombuffer": _frombuffer}
    NUMPY_MODULES = ("numpy", "numpy.core.multiarray", "numpy._core.multiarray", "numpy.core.numeric",
                     "numpy._core.numeric")
    # GEO-Bench's band metadata: its own classes, rasterio CRS and affine transforms (never needed here)
    STUBBED = ("geobench", "ccb", "rasterio", "affine")

    def load(self):
        return _resolve(super().load())

    def find_class(self, module, name):
        module = {"__builtin__": "builtins", "copy_reg": "copyreg"}.get(module, module)  # protocol 0-2 names
        if module.split(".")[0] in self.STUBBED:
            return _Stub
        if module in self.NUMPY_MODULES and name in self.NUMPY:
            return self.NUMPY[name]
        if (module, name) == ("_codecs", "encode"):
            return _latin1
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a sample's attrs['pickle']")


def class_ids(label, path: Path, split: str) -> np.ndarray:
    """A sample's label (id, multi-hot vector or mask) as int64: finite integers (3.0 is 3) in [0, MAX_CLASSES);
    anything else is refused by name, before a probe allocates one column per class. Text is refused even when it
    spells a number ("3", b"3"): numpy would read it as one."""
    where = f"split {split!r} sample {path}: label"
    try:
        arr = np.asarray(label)
        values = arr.ravel().tolist() if arr.dtype.kind == "O" else []
        missing = any(v is None for v in values)
        text = arr.dtype.kind in "SU" or any(isinstance(v, str | bytes) for v in values)
        if np.iscomplexobj(arr):
            raise TypeError("complex values")
        if not (missing or text):
            arr = arr.astype(np.float64)
    except (ValueError, TypeError) as err:
        raise ValueError(f"{where} is not numeric ({err})") from err
    if missing:
        raise ValueError(f"{where} is missing (None)")
    if text:
        raise ValueError(f"{where} is text {arr.ravel().tolist()[:3]}, not a number; class ids are 0, 1, ...")
    bad = arr[~np.isfinite(arr)]
    if bad.size:
        raise ValueError(f"{where} {bad[0]} is not a finite number; class ids are 0, 1, ...")
    bad = arr[arr != np.round(arr)]
    if bad.size:
        raise ValueError(f"{where} {bad[0]:g} is not an integer class id")
    bad = arr[arr < 0]
    if bad.size:
        raise ValueError(f"{where} {bad[0]:g} is negative; class ids are 0, 1, ... (masks: 255 = ignore)")
    bad = arr[arr >= MAX_CLASSES]
    if bad.size:
        raise ValueError(f"{where} {bad[0]:g} is not a class id: class ids are below {MAX_CLASSES}")
    return arr.astype(np.int64)


# -- folders --------------------------------------------------------------------------------------
def _decode(path: Path) -> tuple[np.ndarray, float | np.ndarray | None, bool | None]:
    """The float32 array of a .npy or GeoTIFF, the GeoTIFF's declared nodata value (_pam_declared: per band where its
    bands declare different ones), and whether the bands are the last axis: a GeoTIFF of several samples per pixel
    says so; a .npy or a stack of pages does not (None)."""
    import tifffile

    declared, samples_last = None, None
    try:
        check_regular(path)  # a FIFO blocked the reader until a writer came
        if path.suffix.lower() == ".npy":
            arr = _load_npy(path)
        else:
            arr, declared, samples_last = read_tiff_layout(path)  # imagecodecs' errors are RuntimeErrors
    except (OSError, ValueError, TypeError, RuntimeError, tifffile.TiffFileError) as err:  # also object .npy files
        kind = None if path.suffix.lower() == ".npy" else file_format(path, "a TIFF image")
        if kind:  # a Git LFS pointer, a PNG saved as .tif: say what it is
            raise ValueError(f"{path}: not a GeoTIFF: it is {kind}") from err
        raise ValueError(f"{path}: not a readable image ({err})") from err
    except MemoryError as err:  # a header declaring less than the machine has, more than it has free
        raise ValueError(f"{path}: its image does not fit in this process's memory ({err})") from err
    if np.iscomplexobj(arr):
        raise ValueError(f"{path}: complex values ({arr.dtype}); expected real band values")
    try:
        with np.errstate(over="ignore"):  # float64 beyond float32 (GDAL's -1.79e308 fill) is +-inf: masked as nodata
            arr = np.asarray(arr, dtype=np.float32)
    except (ValueError, TypeError) as err:  # a structured .npy
        raise ValueError(f"{path}: not a readable image ({err})") from err
    if path.suffix.lower() != ".npy":
        arr = _sidecar_nodata(arr, path, samples_last)
        declared = _pam_declared(path, declared, arr, samples_last)
    return arr, declared, samples_last


def _sidecar_nodata(arr: np.ndarray, path: Path, samples_last: bool | None) -> np.ndarray:
    """arr (float32) with the pixels that the GeoTIFF's `.msk` sidecar (sources.external_mask: GDAL's external nodata
    mask) marks as nodata set to NaN, like those outside an internal mask; a sidecar of another size is refused."""
    try:
        mask = external_mask(path)
    except (OSError, ValueError) as err:
        raise ValueError(f"{path}.msk: not a readable mask ({err})") from err
    if mask is None:
        return arr
    size = arr.shape[:2] if samples_last else arr.shape[-2:]
    if mask.shape[-2:] != size:
        raise ValueError(f"{path} is {size[0]}x{size[1]} px but its .msk sidecar {mask.shape[-2]}x{mask.shape[-1]}: "
                         "not its mask")
    if mask.ndim == 3:  # GDAL's per-band masks: one per band of the image
        bands = 1 if arr.ndim == 2 else arr.shape[-1] if samples_last else arr.shape[0]
        if mask.shape[0] != bands:
            raise ValueError(f"{path} has {bands} band(s) but its .msk sidecar {mask.shape[0]} per-band masks: not "
                             "its mask")
        arr[np.moveaxis(mask, 0, -1) if samples_last else mask] = np.nan
    elif samples_last:
        arr[mask] = np.nan
    else:
        arr[..., mask] = np.nan
    return arr


def _pam_declared(path: Path, tag: float | None, arr: np.ndarray, samples_last: bool | None
                  ) -> float | np.ndarray | None:
    """The nodata value a GeoTIFF declares once its GDAL PAM sidecar (x.tif.aux.xml: sources.pam_nodata) is read: a
    band's NoDataValue there wins over the file's GDAL_NODATA tag (tag), as in GDAL (sources.effective_nodata). One
    value (or None) when every band has the same; else a (C,) float32 array in band order, NaN for a band without
    one (_load puts it on the band axis). A stack of single-sample pages (samples_last None) takes band 1's, as GDAL
    reads its first page as the dataset. A sidecar that does not read is refused by name."""
    try:
        pam = pam_nodata(path)
    except (OSError, ValueError) as err:
        raise ValueError(f"{path}.aux.xml: not a readable GDAL sidecar ({err})") from err
    if not pam:
        return tag
    count = 1 if arr.ndim < 3 or samples_last is None else arr.shape[-1 if samples_last else 0]
    values = [effective_nodata(tag, pam, band) for band in range(1, count + 1)]
    if len(set(values)) == 1:
        return values[0]
    return np.array([np.nan if v is None else v for v in values], np.float32)


def _load_npy(path: Path) -> np.ndarray:
    """A .npy file's array, memory-mapped and then copied: a damaged header that declares a huge shape fails on the
    file's size instead of allocating it (a MemoryError). Whatever numpy's header parser raises on damaged bytes
    (tokenize's TokenError too) is a ValueError."""
    try:
        return np.array(np.load(path, mmap_mode="r"))
    except (OSError, ValueError, MemoryError):
        raise
    except Exception as err:
        raise ValueError(f"malformed .npy header ({type(err).__name__}: {err})") from err


def _load(path: Path) -> tuple[np.ndarray, float | np.ndarray | None]:
    """(C, H, W) float32 from a .npy or GeoTIFF and the GeoTIFF's declared nodata value (per band: (C, 1, 1));
    channel-last arrays (H, W, C) are transposed: a GeoTIFF with several samples per pixel says which axis they are
    (EuroSAT-MS stores 13 interleaved samples, so a 13 px tile is still (13, 13, 13) = (H, W, C)); otherwise the
    shape decides (bands are 2, 12 or 13)."""
    arr, declared, samples_last = _decode(path)
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3:
        raise ValueError(f"{path}: expected a (C, H, W) or (H, W, C) image, got shape {arr.shape}")
    if samples_last is None:
        samples_last = arr.shape[-1] in (2, 12, 13) and arr.shape[0] not in (2, 12, 13)
    if samples_last:
        arr = arr.transpose(2, 0, 1)
    if isinstance(declared, np.ndarray):
        declared = declared[:, None, None]  # per band (samples_last was known): on the band axis
    return arr, declared


def _read_image(path: Path) -> np.ndarray:
    """(C, H, W) float32, nodata as NaN."""
    arr, declared = _load(path)
    return _mask_nodata(arr, path, declared)


def _read_mask(path: Path, size: tuple[int, int], split: str) -> np.ndarray:
    """(H, W) int64 class ids of an image of `size` (H, W); a (1, H, W) or (H, W, 1) mask is squeezed. Pixels at
    the file's declared nodata value are ignored (probes.IGNORE_INDEX)."""
    from terrafm.eval.probes import IGNORE_INDEX

    mask, declared, _ = _decode(path)
    mask = _drop_band_axis(mask)
    if mask.ndim != 2:
        raise ValueError(f"{path}: a mask is one band of class ids (H, W), got shape {mask.shape}")
    if mask.shape != size:
        raise ValueError(f"{path} is {mask.shape[0]}x{mask.shape[1]} px, its image {size[0]}x{size[1]}: "
                         "a mask must cover its image pixel for pixel")
    ignored = np.isnan(mask)  # outside the file's internal mask (read_tiff_layout)
    if declared is not None:
        ignored |= mask == np.float32(declared)
    return class_ids(np.where(ignored, IGNORE_INDEX, mask), path, split)


def _files(folder: Path) -> list[Path]:
    """Image files of a folder; hidden files (.DS_Store, macOS `._x.tif`) and sidecars (.aux.xml) are not images."""
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))


def _masks_by_stem(folder: Path) -> dict[str, Path]:
    """The mask files of a folder by file stem: an image's mask has exactly its stem ('x.1.tif' is not the mask of
    'x.tif', nor is the sidecar 'x.tif.aux.xml'); two masks of one stem are refused by name."""
    masks = {}
    for m in _files(folder):
        if m.stem in masks:
            raise ValueError(f"{folder} holds two masks named {m.stem!r}: {masks[m.stem].name} and {m.name}")
        masks[m.stem] = m
    return masks


def _subdirs(folder: Path) -> list[str]:
    """Visible sub-folders (a .ipynb_checkpoints or .git folder is not a split or a class)."""
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def read_folder(root: str | Path, split: str, modality: str = "auto",
                class_names: list[str] | None = None, band_order: str = "auto") -> EvalSplit:
    """Read one split of a EuroSAT-style folder dataset (classification or images/ + masks/). band_order: the
    order of 12/13 S2 channels ("esa", "eurosat" or "auto": resolve_band_order)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset folder {root} does not exist")
    split_dir = root / _split_key(_subdirs(root), split, str(root))
    subdirs = _subdirs(split_dir)
    if not subdirs and not _files(split_dir):  # an empty validation folder is no validation split
        raise MissingSplitError(f"split folder {split_dir} is empty")
    if {"images", "masks"} <= set(subdirs):
        paths = _files(split_dir / "images")
        if not paths:
            raise ValueError(f"{split_dir / 'images'} holds no {'/'.join(IMAGE_SUFFIXES)} files")
        masks, labels, names = _masks_by_stem(split_dir / "masks"), None, class_names or []
    else:
        names = class_names or subdirs
        unseen = sorted(set(subdirs) - set(names))
        if unseen:  # dropping them would score the probe on a filtered test set
            raise ValueError(f"{split_dir} has class folders the train split lacks: {unseen[:8]}; a probe cannot "
                             "predict a class it never saw: add its train images or remove the folder")
        if not names:
            raise ValueError(f"{split_dir} has no class folders (expected {split_dir}/<class>/*.tif)")
        paths, labels = [], []
        for idx, name in enumerate(names):
            folder = split_dir / name
            if class_names and not folder.exists():  # a val / test split without this train class: none to score
                continue
            found = _files(folder) if folder.is_dir() else []
            nested = [folder / d for d in (_subdirs(folder) if folder.is_dir() else []) if _files(folder / d)]
            if nested:  # read only the class folder's own files, these were left out in silence
                raise ValueError(f"{nested[0]} holds images inside the folder of class {name!r}: a class folder "
                                 f"holds its images directly ({split_dir}/<class>/*.tif); move them up or remove it")
            if not found:
                raise ValueError(f"class {name!r} has no images in {folder} (expected *.tif, *.tiff or *.npy)")
            paths += found
            labels += [idx] * len(found)
        if not paths:  # images loose in the split folder, none in a class folder
            raise ValueError(f"{split_dir} holds none of the train split's class folders {names[:8]} (expected "
                             f"{split_dir}/<class>/*.tif)")
        labels = np.asarray(labels, dtype=np.int64)

    def choose(head: np.ndarray) -> tuple[str, list[int], str]:
        order = resolve_band_order(head, band_order, str(split_dir)) if head.shape[1] in (12, 13) else "esa"
        return (*modality_for_bands(bands_from_count(head.shape[1], order), modality), order)

    images, mask_rows = _SplitImages(len(paths), choose), _Rows(len(paths))
    for path in paths:
        if labels is None and path.stem not in masks:
            raise FileNotFoundError(f"no mask for {path} in {split_dir / 'masks'} (expected {path.stem}.tif/.npy)")
        image = _read_image(path)
        first = images.first_shape or image.shape
        if image.shape != first:
            raise ValueError(f"images in {split_dir} differ in shape: {path} is {image.shape}, {paths[0]} {first}")
        if labels is None:
            mask_rows.add(_read_mask(masks[path.stem], image.shape[1:], split), path)
        images.add(image, path)
    labels = mask_rows.array() if labels is None else labels
    return EvalSplit(images.array(), labels, images.modality, list(names), images.order, list(paths))


def shared_files(splits: dict[str, EvalSplit]) -> list[tuple[str, str, Path, Path]]:
    """(split, other split, file, its twin) for each file that two splits both read: the same file by identity
    (device and inode), so a symlink or hard link into the train folder counts; copies do not."""
    seen: dict[tuple[int, int], tuple[str, Path]] = {}
    shared = []
    for name, split in splits.items():
        for path in split.files:
            stat = path.stat()
            first = seen.setdefault((stat.st_dev, stat.st_ino), (name, path))
            if first[0] != name:
                shared.append((first[0], name, first[1], path))
    return shared


FORMATS = ("hdf5", "folder")  # what read_split reads (the eval CLI's --format choices)


def read_split(root: str | Path, fmt: str, split: str, modality: str = "auto",
               class_names: list[str] | None = None, band_order: str = "auto") -> EvalSplit:
    if fmt == "hdf5":
        return read_hdf5(root, split, modality, band_order)
    if fmt == "folder":
        return read_folder(root, split, modality, class_names, band_order)
    raise ValueError(f"unknown format {fmt!r}; expected one of {list(FORMATS)}")


NORMALIZATIONS = ("auto", "checkpoint", "dataset")


def s1_units(images: np.ndarray) -> str:
    """'db' or 'linear': S1 backscatter in dB is mostly negative; linear power is not (resampled linear power can
    dip a little below 0, so one negative pixel does not make an image dB)."""
    count = negative = 0  # the sign of the median of the finite values, gathered chunk by chunk
    top_negative, low_rest = -np.inf, np.inf
    for chunk in row_chunks(images):
        values = chunk[np.isfinite(chunk)]
        below = values < 0
        count, negative = count + values.size, negative + int(below.sum())
        if below.any():
            top_negative = max(top_negative, values[below].max())
        if not below.all():
            low_rest = min(low_rest, values[~below].min())
    if 2 * negative == count and count:  # the two middle values straddle 0: their mean decides, as np.median's
        return "db" if np.mean(np.array([top_negative, low_rest], images.dtype)) < 0 else "linear"
    return "db" if 2 * negative > count else "linear"


def to_s1_scaling(images: np.ndarray, scaling: str, have: str | None = None) -> np.ndarray:
    """S1 images in `scaling` (db | linear), converted from the units `have` (default: what they look like)."""
    have = have or s1_units(images)
    if have == scaling:
        return images
    return (s1_to_db(images) if scaling == "db" else 10.0 ** (images / 10.0)).astype(np.float32)


def input_statistics(train: EvalSplit, inputs: dict, how: str = "auto") -> tuple[np.ndarray, np.ndarray, str]:
    """(mean, std, source) to normalise with: the checkpoint's training statistics (`inputs` = a loaded
    model's input_metadata) or the train split's own; auto = the checkpoint's when it has them."""
    if how not in NORMALIZATIONS:
        raise ValueError(f"normalize must be one of {NORMALIZATIONS}, got {how!r}")
    m = train.modality
    have = m in inputs.get("mean", {}) and m in inputs.get("std", {})
    trained = sorted(inputs.get("mean", {}))  # a run that recorded its inputs: the sensors it trained on
    if trained and m not in trained:
        warnings.warn(f"the checkpoint's run trained on {', '.join(trained)} only: its {m} patch embedding never saw "
                      f"data, so these features are a random projection of the bands. Evaluate on "
                      f"{' or '.join(trained)} data, or with a checkpoint trained on {m}", stacklevel=2)
    if how == "checkpoint" and not have:
        why = (f"its run trained on {', '.join(trained)} only" if trained else
               "an export of a run that recorded them has them")
        raise ValueError(f"--normalize checkpoint: the checkpoint carries no {m} statistics ({why}); use "
                         "--normalize dataset")
    names = MODALITIES[m].bands
    if how == "dataset" or not have:
        mean, std = band_stats(train.images, names)
        flat = np.flatnonzero(std <= 1e-6)
        if flat.size:  # z-scored with std 1e-6, a test value 1000 off the train constant was 1e9: the probe saw only it
            warnings.warn(f"{m} band(s) {[names[b] for b in flat]} are constant in the train split: they are left out "
                          "of the features (0 everywhere after normalisation), as no scale fitted on train fits them",
                          stacklevel=2)
            std[flat] = np.inf
        return mean, std, "dataset"
    bands, want = inputs.get("bands", {}).get(m), list(names)
    if bands is not None and list(bands) != want:
        raise ValueError(f"the checkpoint was trained on {m} bands {list(bands)}; this dataset gives {want}. "
                         "Use --normalize dataset, or a checkpoint trained on all bands")
    mean, std = np.asarray(inputs["mean"][m], np.float32), np.asarray(inputs["std"][m], np.float32)
    if mean.shape != (len(want),) or std.shape != (len(want),):
        raise ValueError(f"the checkpoint's {m} statistics have {mean.size} / {std.size} values, expected "
                         f"{len(want)} (one per band of {want})")
    own, own_std = band_stats(train.images, names)
    ratio = own_std / np.maximum(std, 1e-6)
    far = np.flatnonzero((np.abs(own - mean) > 3 * std) | (ratio < 0.05) | (ratio > 20))
    if len(far):
        b = int(far[0])
        warnings.warn(f"the dataset's {m} band {want[b]} has mean {own[b]:.4g} / std {own_std[b]:.4g}, the "
                      f"checkpoint was trained on mean {mean[b]:.4g} / std {std[b]:.4g} ({len(far)} band(s) this far "
                      "apart): other units or scaling? Check the input, or use --normalize dataset", stacklevel=2)
    return mean, np.maximum(std, 1e-6), "checkpoint"


def band_stats(images: np.ndarray, bands: list[str] | tuple[str, ...] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per-band mean and std (C,) of the valid (non-NaN) pixels of the training split (float64, one band at a time)."""
    mean, std = np.zeros(images.shape[1], np.float32), np.zeros(images.shape[1], np.float32)
    for c in range(images.shape[1]):
        mean[c], std[c] = _mean_std(_valid_values(images[:, c]), bands[c] if bands else c)
    return mean, std


def _mean_std(x: np.ndarray, band) -> tuple[float, float]:
    """x.mean() and x.std() (at least 1e-6) of a band's valid values, with the deviations squared in place: the band
    is held once in float64, not twice."""
    if x.size == 0:
        raise ValueError(f"band {band!r} has no valid pixel in the train split (all nodata)")
    mean = x.mean()
    x -= mean
    np.multiply(x, x, out=x)
    return mean, max(np.sqrt(np.add.reduce(x) / x.size), 1e-6)  # x.std(), as numpy computes it


def _valid_values(band: np.ndarray) -> np.ndarray:
    """The non-NaN values of a band (N, H, W) in order, as float64, gathered chunk by chunk: no full-size mask or
    float32 copy beside them."""
    chunks = list(row_chunks(band))
    x, at = np.empty(sum(int(np.count_nonzero(~np.isnan(chunk))) for chunk in chunks)), 0
    for chunk in chunks:
        values = chunk[~np.isnan(chunk)]
        x[at:at + values.size] = values
        at += values.size
    return x


def normalize(images: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """(x - mean) / std per band; nodata (NaN) becomes 0, the band's mean. features.extract calls it per batch."""
    out = ((images - mean[None, :, None, None]) / std[None, :, None, None]).astype(np.float32, copy=False)
    return np.nan_to_num(out, copy=False, nan=0.0)  # in place: no second copy; inf was masked at read


CHUNK_BYTES = 1 << 23  # how much of a split row_chunks hands out at a time


def row_chunks(images: np.ndarray):
    """Consecutive row slices of an (N, ...) array of about CHUNK_BYTES each: whole-split work without a whole-split
    temporary."""
    step = max(1, CHUNK_BYTES // max(1, images[:1].nbytes))
    for start in range(0, len(images), step):
        yield images[start:start + step]


def nodata_pixels(images: np.ndarray) -> int:
    """How many pixel values of a split are nodata (NaN)."""
    return sum(int(np.isnan(chunk).sum()) for chunk in row_chunks(images))
