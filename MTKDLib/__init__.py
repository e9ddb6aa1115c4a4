"""Slicer-side code shared by the MTKD modules: MRML <-> engine files, the engine process
runner and its liveness checks (``process``), following a run's events (``run_monitor``) and
plotting them (``run_plots``), the segment, compare, train and distill-again logic, and Python
dependency handling.

Only ``gui`` (the widgets the two module panels share) imports Qt; everything else runs
against real MRML from the ``slicer-core`` package in the tests, and the panels in
``MTKDSegment.py`` and ``MTKDTrain.py`` are thin layers over it.
"""
