"""Stage marks of the segmentation pipeline: exclusive seconds per stage, the stages a real
prediction passes through, and cancellation at a stage boundary."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import SimpleITK as sitk
from test_infer_fast import make_prep, tiny_model

from mtkd.infer.predictor import Predictor
from mtkd.infer.stages import CancelCheck, Cancelled, StageTimes, stage, watching


class StepClock:
    """A clock that advances by one second each time it is read."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


def test_nested_stages_count_for_the_inner_one_only():
    times = StageTimes(clock=StepClock())
    # the clock is read on entering total (1), outer (2: 1 s of "other"), inner (3: 1 s of
    # "outer"), on leaving inner (4: 1 s of "inner"), outer (5: 1 s of "outer") and total (6:
    # 1 s of "other")
    with times.total(), stage("outer"), stage("inner"):
        pass
    assert times.seconds == {"other": 2.0, "outer": 2.0, "inner": 1.0}
    assert times.calls == {"outer": 1, "inner": 1}
    assert times.table()[0][0] in {"other", "outer"} and times.table()[-1] == ("inner", 1.0, 1)


def test_marks_do_nothing_without_an_observer():
    times = StageTimes(clock=StepClock())
    with stage("network"):
        pass
    assert times.seconds == {} and times.calls == {}


@pytest.fixture(scope="module")
def small_ct(data_dir) -> sitk.Image:
    ct = sitk.ReadImage(str(data_dir / "abdomen_ct.nii.gz"))
    return sitk.RegionOfInterest(ct, [96, 80, 40], [20, 20, 10])


def test_a_prediction_passes_through_the_marked_stages(small_ct):
    model = tiny_model(3, make_prep(3, (4.5, 4.5, 4.0), patch_size=(32, 32, 16)))
    predictor = Predictor(model)
    times = StageTimes()
    with times.total():
        profiled = predictor.predict(small_ct)
    expected = {
        "foreground crop",
        "host to device",
        "resampling",
        "normalisation",
        "network",
        "softmax",
        "inverse mapping",
        "argmax",
        "device to host",
        "label copy",
        "to SimpleITK",
    }
    assert expected <= set(times.seconds), expected - set(times.seconds)
    assert all(seconds >= 0 for seconds in times.seconds.values())
    plain = predictor.predict(small_ct)  # watching changes nothing in the result
    np.testing.assert_array_equal(
        sitk.GetArrayViewFromImage(profiled.labelmap), sitk.GetArrayViewFromImage(plain.labelmap)
    )


def test_a_cancelled_prediction_stops_at_the_next_stage(small_ct):
    model = tiny_model(2, make_prep(2, slice_size=(32, 32)))
    predictor = Predictor(model)
    cancel = CancelCheck(threading.Event())
    cancel.event.set()
    times = StageTimes()
    with times.total(), watching(cancel), pytest.raises(Cancelled, match="cancelled before"):
        predictor.predict(small_ct)
    assert times._stack == []  # every stage that began has ended
    assert "network" not in times.seconds
    assert predictor.predict(small_ct).labelmap.GetSize() == small_ct.GetSize()  # still usable
