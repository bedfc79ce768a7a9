"""Deterministic generator of SYNTHETIC DICOM studies for demos, tests and benchmarks.

Every name, identifier and pixel here is made up: no real patient data is involved.
The same arguments always give byte-identical files, because UIDs are hashed from the
seed and indices (``generate_uid(entropy_srcs=...)``), dates are fixed and the noise comes
from ``numpy.random.default_rng`` seeded with the seed and indices. Files made with another
pydicom version may differ in ImplementationVersionName.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    MRImageStorage,
    generate_uid,
)

__all__ = ["generate"]

_FOV_MM = {"CHEST": 350.0, "ABDOMEN": 380.0, "HEAD": 230.0, "KNEE": 160.0}

# Tissue values: Hounsfield units for CT, arbitrary signal for MR T1/T2 weighting.
_TISSUE = {
    "CT": {
        "air": -1000,
        "fat": -100,
        "soft": 40,
        "lung": -850,
        "bone": 700,
        "fluid": 5,
        "brain": 35,
        "liver": 60,
    },
    "T1": {
        "air": 0,
        "fat": 900,
        "soft": 500,
        "lung": 0,
        "bone": 80,
        "fluid": 150,
        "brain": 650,
        "liver": 550,
    },
    "T2": {
        "air": 0,
        "fat": 700,
        "soft": 400,
        "lung": 0,
        "bone": 60,
        "fluid": 1400,
        "brain": 550,
        "liver": 300,
    },
}


@dataclass(frozen=True, slots=True)
class _Series:
    description: str
    instances: int
    contrast: str  # key of _TISSUE
    window: tuple[int, int]  # centre, width (HU for CT)


@dataclass(frozen=True, slots=True)
class _Study:
    modality: str  # "CT" or "MR"
    body_part: str  # key of _FOV_MM
    description: str
    series: tuple[_Series, ...]


@dataclass(frozen=True, slots=True)
class _Patient:
    name: str
    sex: str
    birth_date: str
    issuer: str
    studies: tuple[_Study, ...]


_CHEST = _Study(
    "CT",
    "CHEST",
    "CT THORAX",
    (
        _Series("Thorax 5mm soft tissue", 6, "CT", (40, 400)),
        _Series("Thorax 5mm lung", 6, "CT", (-600, 1500)),
    ),
)
_HEAD = _Study(
    "MR",
    "HEAD",
    "MR BRAIN",
    (
        _Series("T1 SE axial", 5, "T1", (600, 1200)),
        _Series("T2 TSE axial", 5, "T2", (700, 1400)),
    ),
)
_ABDOMEN = _Study(
    "CT", "ABDOMEN", "CT ABDOMEN", (_Series("Abdomen 5mm venous", 8, "CT", (50, 350)),)
)
_KNEE = _Study("MR", "KNEE", "MR KNEE RIGHT", (_Series("PD TSE coronal", 4, "T2", (700, 1400)),))

# Patient i uses template i % 3; beyond the named ones, made-up serial names keep IDs unique.
_TEMPLATES = (
    _Patient("DOE^JANE", "F", "19700412", "HOSP-A", (_CHEST,)),
    _Patient("MÜLLER^JÖRG", "M", "19581103", "HOSP-B", (_HEAD,)),
    _Patient("SMITH^JOHN", "M", "19850227", "HOSP-A", (_ABDOMEN, _KNEE)),
)
_EXTRA_NAMES = (
    ("ROE^RICHARD", "M"),
    ("MUSTERMANN^ERIKA", "F"),
    ("ROSSI^MARIO", "M"),
    ("DUPONT^MARIE", "F"),
)


def _uid(seed: int, *parts: object) -> str:
    """A UID under pydicom's root that depends only on the seed and the given indices."""
    # prefix=None would make generate_uid ignore entropy_srcs (random UUID), so keep the
    # default prefix. It hashes "".join(entropy_srcs), so join with a separator ourselves:
    # otherwise (1, 23) and (12, 3) would hash the same.
    return generate_uid(entropy_srcs=["|".join(["anim-sample", str(seed), *map(str, parts)])])


def _ds(value: float) -> str:
    """Format a decimal string that always fits the DS 16-character limit."""
    return f"{value:.8g}"


def _shapes(body_part: str, t: float) -> list[tuple[str, float, float, float, float]]:
    """Ellipses (tissue, cx, cy, ax, ay) in [-1, 1] image space, painted in order.

    ``t`` in [0, 1] is the slice position, so inner structures grow and shrink along z
    and neighbouring slices differ.
    """
    s = 0.6 + 0.4 * math.sin(math.pi * t)
    if body_part == "CHEST":
        return [
            ("fat", 0, 0, 0.85, 0.6),
            ("soft", 0, 0, 0.78, 0.53),
            ("lung", -0.38, -0.05, 0.28 * s, 0.38 * s),
            ("lung", 0.38, -0.05, 0.28 * s, 0.38 * s),
            ("soft", 0.05, 0.05, 0.18, 0.16),
            ("bone", 0, 0.42, 0.09, 0.09),
        ]
    if body_part == "ABDOMEN":
        return [
            ("fat", 0, 0, 0.88, 0.62),
            ("soft", 0, 0, 0.8, 0.55),
            ("liver", -0.35, -0.1, 0.35 * s, 0.3 * s),
            ("fluid", 0.3, 0.2, 0.08 * s, 0.12 * s),
            ("fluid", -0.3 + 0.5 * s, 0.2, 0.08, 0.12),
            ("bone", 0, 0.42, 0.1, 0.1),
        ]
    if body_part == "HEAD":
        return [
            ("bone", 0, 0, 0.72 * s + 0.1, 0.9 * s + 0.05),
            ("brain", 0, 0, 0.65 * s + 0.1, 0.82 * s + 0.05),
            ("fluid", -0.12, -0.05, 0.05, 0.25 * s),
            ("fluid", 0.12, -0.05, 0.05, 0.25 * s),
        ]
    # KNEE (coronal): femur and tibia shafts in soft tissue, joint fluid between them.
    return [
        ("fat", 0, 0, 0.7, 0.95),
        ("soft", 0, 0, 0.6, 0.9),
        ("bone", 0, -0.5, 0.3 * s, 0.45),
        ("fat", 0, -0.5, 0.22 * s, 0.38),
        ("bone", 0, 0.5, 0.28 * s, 0.4),
        ("fat", 0, 0.5, 0.2 * s, 0.33),
        ("fluid", 0, 0, 0.35 * s, 0.04),
    ]


def _pixels(
    study: _Study, series: _Series, t: float, rows: int, rng: np.random.Generator
) -> np.ndarray:
    """A rows x rows uint16 phantom slice (CT stored as HU + 1024, 12 bits used)."""
    values = _TISSUE[series.contrast]
    axis = (np.arange(rows) + 0.5) / rows * 2 - 1
    y, x = np.meshgrid(axis, axis, indexing="ij")
    img = np.full((rows, rows), float(values["air"]))
    for tissue, cx, cy, ax, ay in _shapes(study.body_part, t):
        img[((x - cx) / ax) ** 2 + ((y - cy) / ay) ** 2 <= 1] = values[tissue]
    if study.modality == "CT":
        img = img + rng.normal(0, 12, img.shape) + 1024
    else:
        # Magnitude images: noise never makes the signal negative.
        img = np.abs(img + rng.normal(0, 20, img.shape))
    return np.clip(np.rint(img), 0, 4095).astype("<u2")


def _file_meta(sop_class: str, sop_instance: str) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_instance
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = f"PYDICOM {pydicom.__version__}"[:16]
    meta.SourceApplicationEntityTitle = "ANIM_SAMPLE"
    return meta


def _patient(index: int) -> tuple[_Patient, str]:
    """Plan and PatientID for patient ``index``."""
    base = _TEMPLATES[index % len(_TEMPLATES)]
    if index >= len(_TEMPLATES):
        extra = index - len(_TEMPLATES)
        name, sex = _EXTRA_NAMES[extra % len(_EXTRA_NAMES)]
        if extra >= len(_EXTRA_NAMES):
            name += f"^{extra // len(_EXTRA_NAMES)}"  # middle name keeps names distinct
        # Bounded shift so ages stay plausible however many patients are asked for.
        year = int(base.birth_date[:4]) + index % 30
        base = _Patient(name, sex, f"{year}{base.birth_date[4:]}", base.issuer, base.studies)
    return base, f"SYN{index + 1:04d}"


def _patient_study(
    ds: Dataset, seed: int, p: int, st: int, patient: _Patient, pid: str, study: _Study
) -> None:
    """Patient, study and equipment attributes shared by all instances of a study."""
    if not patient.name.isascii():
        ds.SpecificCharacterSet = "ISO_IR 192"
    ds.PatientName = patient.name
    ds.PatientID = pid
    ds.IssuerOfPatientID = patient.issuer
    ds.PatientBirthDate = patient.birth_date
    ds.PatientSex = patient.sex
    study_date = f"2024{3 + p % 9:02d}{10 + st * 7:02d}"
    ds.PatientAge = f"{2024 - int(patient.birth_date[:4]):03d}Y"
    ds.StudyInstanceUID = _uid(seed, "study", p, st)
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = study_date
    ds.StudyTime = f"{8 + st:02d}{15 + p % 40:02d}00"
    ds.AccessionNumber = f"ACC{seed % 10000:04d}{p:03d}{st}"
    ds.StudyID = f"{p + 1}{st + 1:02d}"
    ds.StudyDescription = study.description
    ds.ReferringPhysicianName = "WELBY^MARCUS"
    ds.InstitutionName = f"ANIM Synthetic Hospital {patient.issuer[-1]}"
    ds.Manufacturer = "ANIM synthetic"
    ds.ManufacturerModelName = "anim.sample"
    ds.StationName = "SYNTH01"
    ds.SoftwareVersions = "1"
    ds.FrameOfReferenceUID = _uid(seed, "for", p, st)
    ds.PositionReferenceIndicator = ""
    ds.BodyPartExamined = study.body_part
    ds.PatientPosition = "FFS" if study.body_part == "KNEE" else "HFS"
    ds.Modality = study.modality


def _modality(ds: Dataset, study: _Study, series: _Series) -> None:
    """Modality-specific image module attributes (CT Image / MR Image)."""
    if study.modality == "CT":
        ds.SOPClassUID = CTImageStorage
        ds.KVP = "120"
        ds.RescaleIntercept = "-1024"
        ds.RescaleSlope = "1"
        ds.RescaleType = "HU"
        ds.ConvolutionKernel = "LUNG" if "lung" in series.description else "STANDARD"
        return
    ds.SOPClassUID = MRImageStorage
    ds.ScanningSequence = "SE"
    ds.SequenceVariant = "SK" if series.contrast == "T2" else "NONE"
    ds.ScanOptions = ""
    ds.MRAcquisitionType = "2D"
    ds.MagneticFieldStrength = "1.5"
    ds.RepetitionTime = "3500" if series.contrast == "T2" else "550"
    ds.EchoTime = "95" if series.contrast == "T2" else "12"
    ds.EchoTrainLength = "12" if series.contrast == "T2" else "1"
    ds.ImagingFrequency = "63.87"
    ds.ImagedNucleus = "1H"


def _geometry(ds: Dataset, study: _Study, rows: int, index: int, count: int) -> float:
    """Plane geometry for slice ``index`` of ``count``; returns its position in [0, 1]."""
    thickness = 5.0 if study.modality == "CT" else 4.0
    fov = _FOV_MM[study.body_part]
    spacing = fov / rows
    offset = (index - (count - 1) / 2) * thickness
    half = -fov / 2
    if study.body_part == "KNEE":
        # Coronal slices step along the anterior-posterior (y) axis.
        ds.ImageOrientationPatient = ["1", "0", "0", "0", "0", "-1"]
        ds.ImagePositionPatient = [_ds(half), _ds(offset), _ds(-half)]
    else:
        ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
        ds.ImagePositionPatient = [_ds(half), _ds(half), _ds(offset)]
    ds.SliceLocation = _ds(offset)
    ds.SliceThickness = _ds(thickness)
    ds.SpacingBetweenSlices = _ds(thickness)
    ds.PixelSpacing = [_ds(spacing), _ds(spacing)]
    return index / (count - 1) if count > 1 else 0.5


def _instance(seed: int, rows: int, p: int, st: int, se: int, i: int) -> Dataset:
    """Build one complete instance (without file meta)."""
    patient, pid = _patient(p)
    study = patient.studies[st]
    series = study.series[se]
    ds = Dataset()
    _patient_study(ds, seed, p, st, patient, pid, study)
    _modality(ds, study, series)
    ds.SOPInstanceUID = _uid(seed, "instance", p, st, se, i)
    ds.InstanceCreationDate = ds.ContentDate
    ds.SeriesInstanceUID = _uid(seed, "series", p, st, se)
    ds.SeriesNumber = se + 1
    ds.SeriesDescription = series.description
    ds.SeriesTime = ds.StudyTime
    ds.ContentTime = f"{ds.StudyTime[:4]}{i:02d}"
    ds.ProtocolName = series.description
    ds.AcquisitionNumber = 1
    ds.InstanceNumber = i + 1
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL" if study.modality == "CT" else "OTHER"]
    ds.ImageComments = "SYNTHETIC - not a real patient"
    t = _geometry(ds, study, rows, i, series.instances)
    ds.WindowCenter = str(series.window[0])
    ds.WindowWidth = str(series.window[1])
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = ds.Columns = rows
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    # Seeding with the indices (not one shared stream) keeps each image independent of
    # generation order and of how many patients were requested.
    rng = np.random.default_rng([seed, p, st, se, i])
    ds.PixelData = _pixels(study, series, t, rows, rng).tobytes()
    ds.file_meta = _file_meta(ds.SOPClassUID, ds.SOPInstanceUID)
    return ds


def generate(out_dir: Path, patients: int = 3, seed: int = 2026, rows: int = 64) -> list[Path]:
    """Write synthetic studies as Part 10 files under out_dir; return the paths, sorted.

    Layout: ``<out_dir>/<PatientID>/study<n>/series<n>/<instance n>.dcm``. Existing files
    with the same names are overwritten; nothing else in ``out_dir`` is touched.
    """
    if patients < 0:
        raise ValueError("patients must be >= 0")
    if not 8 <= rows <= 1024:
        raise ValueError("rows must be between 8 and 1024")
    out_dir = Path(out_dir)
    paths: list[Path] = []
    for p in range(patients):
        patient, pid = _patient(p)
        for st, study in enumerate(patient.studies):
            for se, series in enumerate(study.series):
                folder = out_dir / pid / f"study{st + 1}" / f"series{se + 1}"
                folder.mkdir(parents=True, exist_ok=True)
                for i in range(series.instances):
                    path = folder / f"{i + 1:04d}.dcm"
                    ds = _instance(seed, rows, p, st, se, i)
                    ds.save_as(path, enforce_file_format=True)
                    paths.append(path)
    return sorted(paths)


def main(argv: list[str] | None = None) -> None:
    """``python -m anim.sample --out DIR``: write the sample set and print a summary."""
    parser = argparse.ArgumentParser(description="Write synthetic DICOM sample studies.")
    parser.add_argument("--out", type=Path, default=Path("sample_dicom"))
    parser.add_argument("--patients", type=int, default=3)
    parser.add_argument("--seed", type=int, default=2026)
    parser.add_argument("--rows", type=int, default=64)
    args = parser.parse_args(argv)
    paths = generate(args.out, patients=args.patients, seed=args.seed, rows=args.rows)
    size = sum(path.stat().st_size for path in paths)
    print(f"wrote {len(paths)} files, {size} bytes, under {args.out}")


if __name__ == "__main__":
    main()
