"""Write one teacher config per split seed of a student's evidence grid (used by run.sh).

    python bench/kd_evidence/teacher_config.py STUDENT.yaml TEACHER.yaml COHORT OUT_DIR

For each ``ablation.split_seeds`` of STUDENT.yaml, writes OUT_DIR/<teacher name>-split<k>.yaml:
TEACHER.yaml with ``data.source`` = COHORT and the student grid's ``split`` (same fractions)
at ``split.seed`` = k, so that the teacher of split seed k is validated and tested on the same
patients as the students of that split seed and never sees their test cases. Prints the
written paths, one a line (paths inside are absolute).
"""

from __future__ import annotations

import sys
from pathlib import Path

from mtkd.ablation.grid_config import load_ablation
from mtkd.config import dump_config, load_config


def main(student: str, teacher: str, cohort: str, out_dir: str) -> None:
    grid = load_ablation(student, data_source=cohort)
    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    for split_seed in grid.splits:
        config = load_config(teacher)
        config.data.source = grid.base.data.source
        config.split = type(grid.base.split)(**vars(grid.base.split))
        config.split.seed = split_seed
        path = folder / f"{config.name}-split{split_seed}.yaml"
        config.name = path.stem
        path.write_text(dump_config(config), encoding="utf-8")
        print(path)


if __name__ == "__main__":
    if len(sys.argv) != 5:
        sys.exit(__doc__)
    main(*sys.argv[1:])
