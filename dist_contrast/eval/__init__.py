"""Evaluation: probes of a frozen encoder (kNN, linear), image-text figures (zero-shot,
retrieval), of a run (:mod:`dist_contrast.eval.run`) or of an export
(:mod:`dist_contrast.eval.export`)."""
