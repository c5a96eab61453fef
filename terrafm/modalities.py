"""The three sensors/products TerraFM reads, their band lists and checkpoint names.

One name per modality everywhere (config, data shards, model, CLI): s2_l2a, s2_l1c, s1.
Band lists are defaults; the data config may override them (method.md: L1C drops B10 so both S2
products share the 12 bands of L2A).
"""

from dataclasses import dataclass


@dataclass(frozen=True)
class Modality:
    name: str
    bands: tuple[str, ...]
    dtype: str  # storage dtype in shards: uint16 reflectance (S2) or float16 backscatter (S1)

    @property
    def channels(self) -> int:
        return len(self.bands)


S2_BANDS = ("B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B11", "B12")
S1_BANDS = ("VV", "VH")

MODALITIES: dict[str, Modality] = {
    "s2_l2a": Modality("s2_l2a", S2_BANDS, "uint16"),
    "s2_l1c": Modality("s2_l1c", S2_BANDS, "uint16"),
    "s1": Modality("s1", S1_BANDS, "float16"),
}
MODALITY_NAMES = tuple(MODALITIES)
