"""A second writer of a loop's training set, in its own process (for the loop's tests):

    python loop_writer.py add FOLDER CT SEG COUNT     add COUNT cases, all named "case"
    python loop_writer.py crash FOLDER CT SEG         add one case and die (SIGKILL) between
                                                      writing its record and dataset.json

Each case is a CT volume node and its segmentation read from files into a headless scene
(``slicer-core``), added with :meth:`MTKDLib.training_set.TrainingSet.add`.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

from slicer_scene import load_volume, new_scene

from MTKDLib import training_set
from MTKDLib.mrml_io import load_segmentation
from MTKDLib.training_set import SceneCase, TrainingSet


def main(mode: str, folder: str, ct: str, seg: str, count: str = "1") -> None:
    scene, _ = new_scene()
    volume = load_volume(scene, ct, "case")
    case = SceneCase(volume, load_segmentation(scene, Path(seg), "case labels", volume))
    if mode == "crash":

        def die(*_args) -> None:
            os.kill(os.getpid(), signal.SIGKILL)

        training_set.write_dataset_json = die
    for _ in range(int(count)):
        print(TrainingSet(folder).add(case, added_by=f"writer-{os.getpid()}"), flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
