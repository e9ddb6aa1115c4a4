"""``mtkd demo``: the whole pipeline on the bundled real CT, in a few minutes on a CPU.

The bundled sample is one patient (an abdominal CT with a TotalSegmentator label map). To
hold data out honestly, the demo cuts the CT's whole axial extent into slabs of consecutive
slices and treats each slab as a case (:mod:`mtkd.demo_data`): a slab is in exactly one of
train, validation or test, so no test slice is ever seen in training, and slabs without any of
the structures teach the models where there is no organ. Adjacent slabs are still the same
patient, so the demo shows that the pipeline works end to end, not how well a model
generalises.
"""

from __future__ import annotations

import time
from pathlib import Path

from mtkd.config import RunConfig
from mtkd.data.datasets import load_dataset
from mtkd.data.image_io import check_writable, read_image
from mtkd.data.segnrrd import write_seg_nrrd
from mtkd.demo_data import SLAB, STRUCTURES, write_slab_dataset, write_whole_ct_slabs
from mtkd.devices import resolve_device
from mtkd.engine.trainer import Trainer
from mtkd.errors import MTKDError
from mtkd.infer.evaluate import evaluate, format_score, format_table, summarise
from mtkd.infer.predictor import Predictor
from mtkd.metrics import PENALTY_NOTE, format_missed
from mtkd.modelfiles.model_io import load_model

__all__ = ["SLAB", "STRUCTURES", "run_demo", "write_slab_dataset", "write_whole_ct_slabs"]

SEG_NAME = "abdomen_student.seg.nrrd"


# the bundled sample: Testing/Data in a source checkout; mtkd/sample/ where the Slicer
# extension installed the engine (its CMakeLists.txt copies the same files there)
BUNDLED = Path(__file__).resolve().parents[1] / "Testing" / "Data"
INSTALLED_SAMPLE = Path(__file__).resolve().parent / "sample"
SAMPLE_FILES = ("abdomen_ct.nii.gz", "abdomen_seg_total_fast.nii.gz", "labels_total_v2.json")


def bundled_sample() -> tuple[Path, Path, Path]:
    """CT, label map and label names of the bundled sample."""
    folder = INSTALLED_SAMPLE if (INSTALLED_SAMPLE / SAMPLE_FILES[0]).is_file() else BUNDLED
    files = tuple(folder / name for name in SAMPLE_FILES)
    missing = [f for f in files if not f.is_file()]
    if missing:
        raise MTKDError("bundled sample not found; pass --ct and --labels", path=missing[0])
    return files


def bundled_names() -> Path:
    """TotalSegmentator's label names, bundled with the sample."""
    folder = INSTALLED_SAMPLE if (INSTALLED_SAMPLE / SAMPLE_FILES[2]).is_file() else BUNDLED
    return folder / SAMPLE_FILES[2]


def demo_configs(
    dataset: Path, labels_json: Path, split: dict, quick: bool
) -> tuple[RunConfig, dict]:
    """The teacher's config and the students' shared recipe (a dict without ``distill``)."""
    # only a third of the whole CT's slices hold organs: epochs measured to learn them all
    epochs_teacher, epochs_student = (2, 2) if quick else (60, 200)
    data = {
        "source": str(dataset),
        "labels_json": str(labels_json),
        "structures": STRUCTURES,
        "dims": 2,
        "hu_window": [-160.0, 240.0],
        "slice_size": [64, 64],
    }
    split_config = {"fixed": split, "student_fraction": 0.5, "seed": 0}
    teacher = RunConfig.from_dict(
        {
            "kind": "train",
            "name": "teacher",
            "data": data,
            "split": split_config,
            "model": {
                "name": "thesis_unet",
                "params": {"channels": [16, 32, 64, 128], "bottleneck": 256, "convs_per_block": 2},
            },
            "multitask": {"reconstruction": "masked", "weight": 0.2},
            "train": {
                "epochs": epochs_teacher,
                "batch_size": 4,
                "optimizer": {"name": "adamw", "lr": 3e-3},
            },
        }
    )
    student_recipe = {
        "kind": "distill",
        "data": data,
        "split": split_config,
        "model": {"name": "thesis_s1"},
        "train_on": "student_train",
        "train": {
            "epochs": epochs_student,
            "batch_size": 4,
            "optimizer": {"name": "adamw", "lr": 1e-2},
            "seg_loss": "dice_ce",
        },
    }
    return teacher, student_recipe


def run_demo(
    output: Path, ct: str | None = None, labels: str | None = None, quick: bool = False
) -> dict:
    """Run the demo into ``output``; print and return the results table.

    ``ct``/``labels`` replace the bundled sample; the label map must use TotalSegmentator's
    "total" class ids (as the bundled one does).
    """
    started = time.perf_counter()
    if ct is None and labels is None:
        sample_ct, sample_seg, names = bundled_sample()
    elif ct is None or labels is None:
        raise MTKDError("give both --ct and --labels (a label map with TotalSegmentator ids)")
    else:
        sample_ct, sample_seg, names = Path(ct), Path(labels), bundled_names()
        if not names.is_file():
            raise MTKDError("TotalSegmentator label names not found", path=names)
    check_writable(output / SEG_NAME)  # a file in the way fails now, not after training
    dataset = output / "dataset"  # made (with ``output``) once the inputs have been read
    case_ids, split, bounds = write_whole_ct_slabs(
        sample_ct, sample_seg, names, dataset, STRUCTURES
    )
    print(
        f"dataset: {dataset}: the whole CT ({bounds[-1].stop} axial slices) as {len(case_ids)} "
        f"slabs of {SLAB} slices, each a case; slabs without the structures are negatives"
    )
    for part in ("train", "val", "test", "student_train"):
        print(f"  {part} {' '.join(split[part])}")
    teacher, student_recipe = demo_configs(dataset, names, split, quick)
    teacher_run = output / "teacher"
    Trainer(teacher, teacher_run).run()
    runs = {"teacher": teacher_run}
    for name, weight_scale in (("student_kd", 1.0), ("student_nokd", 0.0)):
        # the recommended recipe (distill.preset unset: config.RECOMMENDED_PRESET), teacher
        # targets also on the training slabs without labels (distill.unlabelled: auto)
        distill = {"teacher": str(teacher_run), "scale": weight_scale}
        recipe = {**student_recipe, "name": name, "distill": distill}
        Trainer(RunConfig.from_dict(recipe), output / name).run()
        runs[name] = output / name
    return report(runs, dataset, names, split["test"], sample_ct, output, started)


def report(
    runs: dict[str, Path],
    dataset: Path,
    names: Path,
    test: list[str],
    ct: Path,
    output: Path,
    started: float,
) -> dict:
    device = resolve_device("auto")
    data = load_dataset(dataset, labels_json=names)
    image = read_image(ct)
    header = ["model", "params", *STRUCTURES, "mean Dice", "mean HD95 mm", "missed", "CT seconds"]
    rows, results = [], {}
    for name, run in runs.items():
        model = load_model(run, device)
        predictor = Predictor(model, device)
        summary = summarise(evaluate(predictor, data, test))
        whole = predictor.predict(image)
        results[name] = {
            "summary": summary,
            "parameters": model.metadata["parameters"],
            "seconds": whole.seconds,
        }
        rows.append(
            [name, f"{model.metadata['parameters']:,}"]
            + [format_score(summary[s]["dice"]) for s in STRUCTURES]
            + [
                format_score(summary["mean"]["dice"]),
                format_score(summary["mean"]["hd95_mm"]),
                format_missed(summary["mean"]["missed"], summary["mean"]["spurious"]),
                f"{whole.seconds:.2f}",
            ]
        )
        if name == "student_kd":
            write_seg_nrrd(whole.labelmap, model.labels, output / SEG_NAME)
    print()
    print(
        f"Test slabs {', '.join(test)} (held out; per-volume Dice and HD95 on the original grid):"
    )
    print(format_table(header, rows))
    print(PENALTY_NOTE)
    print(f"\nthe distilled student's segmentation of the whole CT: {output / SEG_NAME}")
    print(f"demo finished in {time.perf_counter() - started:.0f} s")
    return results
