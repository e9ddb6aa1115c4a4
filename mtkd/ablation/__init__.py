"""Ablation grids: the configuration and its cells (:mod:`.grid`), the tables and plots
(:mod:`.report`) and the TensorBoard mirror (:mod:`.tensorboard`); ``mtkd.ablate`` runs them."""
