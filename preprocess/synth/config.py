"""``SynthConfig``: the parameters that define a synthetic dataset, in one place.

The sampler (:func:`spinestream.preprocess.synth.spec.study_specs`), the writer
(:func:`spinestream.preprocess.synth.dataset.make_dataset`), the ``spinestream synth`` flags, the
``params`` recorded in ``SYNTH_COMPLETE`` and the demo's stale check all read these fields.
Options that do not change a byte of the output (workers, force, progress) are not part of it.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

#: --syntax name -> transfer syntax UID
SYNTAXES: dict[str, str] = {
    "explicit": "1.2.840.10008.1.2.1",  # Explicit VR Little Endian
    "jpeg-lossless": "1.2.840.10008.1.2.4.70",  # JPEG Lossless, Non-Hierarchical, First-Order (SV1)
    "j2k": "1.2.840.10008.1.2.4.90",  # JPEG 2000 Image Compression (Lossless Only)
    "rle": "1.2.840.10008.1.2.5",  # RLE Lossless
}
CRACK_WIDTH_MM: tuple[float, float] = (1.2, 2.0)  # drawn uniformly per crack
MIN_SLICES = 12  # room for C1..C7 (+T1) of at least one slice each; tests use ~16, real CT 200+


@dataclass(kw_only=True, frozen=True)
class SynthConfig:
    """What a synthetic dataset is made of; the same config gives byte-identical files."""

    studies: int = 24
    """Training studies (train.csv rows)."""
    seed: int = 0
    """Random seed: every draw derives from it."""
    size: int = 512
    """Rows = columns of every slice, in pixels (32..2048)."""
    test_studies: int = 2
    """Unlabeled studies in test_images/."""
    slices: tuple[int, int] = (48, 96)
    """Slices per study, drawn from LO:HI (LO >= 12)."""
    syntax: str = "mixed"
    """Transfer syntax of every study (a key of SYNTAXES), or mixed: a realistic mix."""
    boxed_share: float | None = None
    """Fraction of studies in the boxed cohort, the rest split between negative and positive-unboxed in the
    real ratio; unset: the real mix (12% boxed). The demo enriches it so a CPU run sees enough fractured
    slices."""
    crack_width: tuple[float, float] = CRACK_WIDTH_MM
    """Crack widths in mm, drawn uniformly from LO:HI (1.2:2.0 is 3-9 px at 512 but 1-2 px at 128); the demo
    widens them so a tiny network at 128 px learns them in minutes."""

    def __post_init__(self) -> None:
        # lists (from YAML or JSON) become tuples: the config is frozen and hashable
        object.__setattr__(self, "slices", tuple(self.slices))
        object.__setattr__(self, "crack_width", tuple(self.crack_width))
        if self.studies < 1:
            raise ValueError(f"studies must be >= 1, got {self.studies}")
        if self.test_studies < 0:
            raise ValueError(f"test_studies must be >= 0, got {self.test_studies}")
        if not 32 <= self.size <= 2048:
            raise ValueError(f"size must be in 32..2048 pixels, got {self.size}")
        lo, hi = self.slices
        if not MIN_SLICES <= lo <= hi:
            raise ValueError(f"slices must be a range lo:hi with {MIN_SLICES} <= lo <= hi, got {lo}:{hi}")
        if self.syntax != "mixed" and self.syntax not in SYNTAXES:
            raise ValueError(f"syntax must be 'mixed' or one of {sorted(SYNTAXES)}, got {self.syntax!r}")
        if self.boxed_share is not None and not 0.0 < self.boxed_share < 1.0:
            raise ValueError(f"boxed_share must be in (0, 1), got {self.boxed_share}")
        lo, hi = self.crack_width
        if not 0.0 < lo <= hi <= 10.0:
            raise ValueError(f"crack_width must be a range lo:hi in mm with 0 < lo <= hi <= 10, got {lo}:{hi}")

    @classmethod
    def of(cls, config: SynthConfig | int | None = None, seed: int | None = None, **kwargs: Any) -> SynthConfig:
        """A config from a config, or from its fields (``studies`` and ``seed`` may come positionally,
        as :func:`study_specs` has always taken them)."""
        if isinstance(config, SynthConfig):
            if seed is not None or kwargs:
                raise TypeError("pass either a SynthConfig or its fields, not both")
            return config
        if config is not None:
            kwargs["studies"] = config
        if seed is not None:
            kwargs["seed"] = seed
        unknown = set(kwargs) - {f.name for f in fields(cls)}
        if unknown:
            raise TypeError(f"unknown synth parameter(s) {sorted(unknown)}; known: {[f.name for f in fields(cls)]}")
        return cls(**kwargs)

    def params(self) -> dict[str, Any]:
        """The JSON form recorded in ``SYNTH_COMPLETE`` (tuples as lists)."""
        return {f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v for f in fields(self)}
