"""The three sensors/products TerraFM reads, their band lists and checkpoint names.

One name per modality everywhere (config, data shards, model, CLI): s2_l2a, s2_l1c, s1.
Band lists are defaults; the data config may override them (method.md: L1C drops B10 so both S2
products share the 12 bands of L2A).
"""

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Modality:
    name: str
    bands: tuple[str, ...]
    dtype: str  # storage dtype in shards: uint16 reflectance (S2) or float16 backscatter (S1)

    @property
    def channels(self) -> int:
        return len(self.bands)


S2_BANDS = ("B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B11", "B12")
S2_WITH_B10 = S2_BANDS[:10] + ("B10",) + S2_BANDS[10:]  # the 13 bands of an L1C product, in ESA's order
S1_BANDS = ("VV", "VH")
# Native ground sampling distance (m) of each S2 band, as Sentinel-2 and Major-TOM store them (B10: L1C only)
S2_NATIVE_M = {"B01": 60, "B02": 10, "B03": 10, "B04": 10, "B05": 20, "B06": 20, "B07": 20, "B08": 10, "B8A": 20,
               "B09": 60, "B10": 60, "B11": 20, "B12": 20}

MODALITIES: dict[str, Modality] = {
    "s2_l2a": Modality("s2_l2a", S2_BANDS, "uint16"),
    "s2_l1c": Modality("s2_l1c", S2_BANDS, "uint16"),
    "s1": Modality("s1", S1_BANDS, "float16"),
}
MODALITY_NAMES = tuple(MODALITIES)

# How `terrafm prepare` stores S1 (a prepare flag, recorded in index.json, checkpoints and exports):
# "db" = 10 log10(sigma0), floored at S1_DB_FLOOR (the default: the community's S1 statistics are in dB);
# "linear" = sigma0 as Major-TOM Core-S1RTC ships it.
S1_SCALINGS = ("db", "linear")
S1_DB_FLOOR = -50.0  # dB; linear power 1e-5, well below the S1 noise floor (about -25 dB)

# Published per-band statistics of Major-TOM Core (TerraMind v1 pretraining statistics, as released with
# TerraTorch; S1RTC in dB; L1C without B10). The normalisation itself uses the statistics `terrafm prepare`
# computes on the user's shards; these are the reference they should come close to, and the value that
# masked (nodata) pixels carry in the shards, so that such pixels normalise to about 0.
REFERENCE_STATS: dict[str, dict[str, tuple[float, ...]]] = {
    "s2_l2a": {"mean": (1390.458, 1503.317, 1718.197, 1853.910, 2199.100, 2779.975, 2987.011, 3083.234, 3132.220,
                        3162.988, 2424.884, 1857.648),
               "std": (2106.761, 2141.107, 2038.973, 2134.138, 2085.321, 1889.926, 1820.257, 1871.918, 1753.829,
                       1797.379, 1434.261, 1334.311)},
    "s2_l1c": {"mean": (2357.089, 2137.385, 2018.788, 2082.986, 2295.651, 2854.537, 3122.849, 3040.560, 3306.481,
                        1473.847, 2472.825, 1838.929),
               "std": (1624.683, 1675.806, 1557.708, 1833.702, 1823.738, 1733.977, 1732.131, 1679.732, 1727.26,
                       1024.687, 1331.411, 1160.419)},
    "s1": {"mean": (-10.93, -17.329), "std": (4.391, 4.459)},  # dB
}


def s1_to_db(linear):
    """10 log10 of S1 linear power, floored at S1_DB_FLOOR (zero and tiny values become the floor)."""
    return 10.0 * np.log10(np.maximum(linear, 10.0 ** (S1_DB_FLOOR / 10.0)))
