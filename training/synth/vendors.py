"""Scanner vendors' habits: names, kernels, descriptions, pixel representation, numbering, thicknesses.

Why a table: the consumer's series selection and slice sorting must not depend on one vendor's
conventions, so every study draws one of these and writes its headers the way that vendor does.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class _Vendor:
    key: str
    manufacturers: tuple[str, ...]
    models: tuple[str, ...]
    soft_kernels: tuple[str, ...]
    bone_kernels: tuple[str, ...]
    body_parts: tuple[str, ...]
    study_descriptions: tuple[str, ...]
    primary_fmt: str
    bone_fmt: str
    thin_fmt: str
    localizer_desc: str
    reformat_desc: str
    reformat_type: tuple[str, ...]
    signed: bool  # int16 + PixelRepresentation 1 + BitsStored 16, else uint16 + BitsStored 12
    spacing_between_slices: bool
    superior_first: bool  # numbers instances from the vertex down: consumers must sort by position
    thicknesses: tuple[float, ...]
    thin_thickness: float
    series_numbers: tuple[tuple[str, int], ...]
    soft_window: tuple[float, float]
    kernel_short: tuple[tuple[str, str], ...] = ()


_VENDORS: dict[str, _Vendor] = {
    v.key: v
    for v in (
        _Vendor(
            "siemens", ("SIEMENS",), ("SOMATOM Definition AS+", "SOMATOM go.Top", "SOMATOM Force"),
            ("H31s", "J40s", "Hr38"), ("H70h", "J70h", "Hr64"), ("HEAD",),
            ("CT^Head", "CT HEAD W/O", "Head^Routine"),
            "Head {thk:.1f} {kernel}", "Head {thk:.1f} {kernel} BONE", "Head {thk:.2f} {kernel}",
            "Topogram 0.6 T20s", "Head MPR Cor", ("DERIVED", "SECONDARY", "MPR"),
            False, False, False, (5.0, 4.0), 0.75,
            (("localizer", 1), ("primary", 2), ("bone", 3), ("thin", 4), ("reformat", 5), ("dose", 501)),
            (40.0, 80.0),
        ),
        _Vendor(
            "ge", ("GE MEDICAL SYSTEMS",), ("LightSpeed VCT", "Revolution CT", "Discovery CT750 HD"),
            ("STANDARD", "SOFT"), ("BONE", "BONEPLUS"), ("HEAD",), ("CT HEAD W/O", "HEAD W/O CONTRAST"),
            "HEAD {thk:g}mm {short}", "HEAD {thk:g}mm BONE", "{thk:g}mm {short}",
            "Scout", "Cor Reformat", ("DERIVED", "SECONDARY", "REFORMATTED"),
            True, True, False, (5.0, 4.5), 0.625,
            (("localizer", 1), ("primary", 2), ("bone", 3), ("thin", 4), ("reformat", 100), ("dose", 999)),
            (40.0, 80.0), (("STANDARD", "STND"), ("SOFT", "SOFT")),
        ),
        _Vendor(
            "canon", ("TOSHIBA", "CANON_MEC"), ("Aquilion ONE", "Aquilion Prime SP"),
            ("FC21", "FC64"), ("FC30",), ("HEAD", "BRAIN"), ("HEAD ROUTINE", "BRAIN"),
            "Brain {thk:.1f} {kernel}", "Brain {thk:.1f} {kernel} BONE", "Brain {thk:.1f} {kernel}",
            "Scanogram", "Coronal MPR", ("DERIVED", "SECONDARY", "REFORMATTED"),
            True, True, True, (5.0, 4.0), 0.5,
            (("localizer", 1), ("thin", 2), ("primary", 3), ("bone", 4), ("reformat", 5), ("dose", 9001)),
            (35.0, 90.0),
        ),
        _Vendor(
            "philips", ("Philips",), ("Brilliance 64", "iCT 256", "Ingenuity CT"),
            ("UB", "UC"), ("YC", "D"), ("", "BRAIN"), ("CT Brain", "HEAD ROUTINE"),
            "Brain {thk:g}mm {kernel}", "Brain {thk:g}mm {kernel} BONE", "Brain {thk:g}mm {kernel}",
            "Surview", "Brain Cor MPR", ("DERIVED", "SECONDARY", "MPR"),
            False, False, False, (5.0, 4.0), 0.9,
            (("localizer", 1), ("primary", 2), ("bone", 3), ("thin", 4), ("reformat", 201), ("dose", 1001)),
            (40.0, 80.0),
        ),
    )
}  # fmt: skip


# Pattern "no_head_words": what sites without an English head word in their protocols send.  Study
# descriptions (also ProtocolName) are protocol names or another language; series descriptions name
# only the protocol, the thickness and the kernel.  None contains HEAD, BRAIN, SKULL, CRANI, NEURO,
# KOPF or SCHAEDEL (the project's head_patterns), so a consumer has to find the head in the image.
NO_HEAD_STUDY_DESCRIPTIONS = (
    "C+ 5mm", "ROUTINE 1", "Schädel nativ", "Cráneo sin contraste", "CEREBRO", "Protocole 2", "CT nativ",
)  # fmt: skip
NO_HEAD_SERIES_FORMATS = (
    "C+ {thk:g}mm", "Axial {thk:g} {kernel}", "ROUTINE {thk:g}", "Nativ {thk:g} {kernel}",
    "Sin contraste {thk:g}mm", "iDose {thk:g}",
)  # fmt: skip
NO_HEAD_DISTRACTOR_DESCRIPTIONS = {
    "bone": ("Knochen {thk:g}", "Hueso {thk:g}mm", "Os {thk:g}"),
    "thin": ("{thk:g}mm {kernel}", "Dünnschicht {thk:g}"),
    "reformat": ("MPR Cor", "Coronal", "Reformat kor"),
}

# Pattern "bone_twin": kernel names that appear in neither soft_kernel_patterns nor
# sharp_kernel_patterns of triage/config.py, so which reconstruction is soft must come from the image.
# (vendor key -> (soft kernels, sharp kernels, sharp series descriptions))
UNLISTED_KERNELS: dict[str, tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]] = {
    "siemens": (("Qr40", "Hr40"), ("Qr69", "Hr69"), ("Bone", "Knochen")),
    "ge": (("STND", "STD+"), ("DETAIL", "BNPLS"), ("Bone", "BONE RECON")),
    "canon": (("FC43", "FC13"), ("FC52", "FC51"), ("Bone", "Hueso")),
    "philips": (("UA", "CB"), ("YB", "EB"), ("Bone", "Knochen")),
}
