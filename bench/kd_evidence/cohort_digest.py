"""A digest of a cohort's voxels, to check that a cohort written again elsewhere (``mtkd synth``
with the same arguments, e.g. on the GPU machine, where carrying it would not fit) is the one
the teachers were trained on.

    python bench/kd_evidence/cohort_digest.py COHORT            # prints the digest
    python bench/kd_evidence/cohort_digest.py COHORT --check HEX  # exit 1 when it differs

The digest is SHA-256 over every image and label of ``imagesTr``/``labelsTr`` in name order:
its name, size, spacing, origin, direction, pixel type and voxels. Files compressed at another
time (gzip stores one) give the same digest; one voxel changed gives another.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk

FOLDERS = ("imagesTr", "labelsTr")


def cohort_digest(cohort: Path) -> str:
    """The hex SHA-256 of the voxels and geometry of ``cohort``'s images and labels."""
    digest = hashlib.sha256()
    files = [path for folder in FOLDERS for path in sorted((cohort / folder).glob("*.nii*"))]
    if not files:
        raise SystemExit(f"no images in {cohort}/imagesTr or labelsTr")
    for path in files:
        image = sitk.ReadImage(str(path))
        geometry = (
            path.parent.name,
            path.name,
            image.GetSize(),
            image.GetSpacing(),
            image.GetOrigin(),
            image.GetDirection(),
            image.GetPixelIDTypeAsString(),
        )
        digest.update(repr(geometry).encode())
        digest.update(np.ascontiguousarray(sitk.GetArrayViewFromImage(image)).tobytes())
    return digest.hexdigest()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("cohort", type=Path)
    parser.add_argument("--check", metavar="HEX", help="the digest the cohort must have")
    args = parser.parse_args(argv)
    digest = cohort_digest(args.cohort)
    if args.check is None:
        print(digest)
        return 0
    if digest != args.check.strip():
        print(
            f"{args.cohort} is not the cohort the teachers were trained on: digest {digest}, "
            f"expected {args.check.strip()}",
            file=sys.stderr,
        )
        return 1
    print(f"{args.cohort}: the expected cohort ({digest[:12]}...)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
