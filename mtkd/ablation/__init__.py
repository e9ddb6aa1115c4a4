"""Ablation grids (``mtkd ablate``): the configuration and its cells (:mod:`.grid`), running
and scoring them (:mod:`.run`, with :mod:`.parallel` for several runs at once), the evidence
statistics (:mod:`.stats`, :mod:`.evidence`), the tables and plots (:mod:`.report`) and the
TensorBoard mirror (:mod:`.tensorboard`)."""
