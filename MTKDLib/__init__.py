"""Slicer-side code shared by the MTKD modules: MRML <-> engine files, the engine process
runner, the segment and compare logic, and Python dependency handling.

Nothing here imports Qt, so it runs against real MRML from the ``slicer-core`` package in the
tests; the widgets in ``MTKDSegment.py`` and ``MTKDTrain.py`` are thin layers over it.
"""
