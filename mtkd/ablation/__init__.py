"""Ablation grids (``mtkd ablate``): the configuration and its cells (:mod:`.grid`), running
them (:mod:`.run`, with :mod:`.parallel` for several runs at once) in their folder
(:mod:`.folder`), each run's scored result (:mod:`.results`), the evidence statistics
(:mod:`.stats`, :mod:`.evidence`), the tables and plots (:mod:`.report`) and the TensorBoard
mirror (:mod:`.tensorboard`)."""
