"""The console commands: argument parsing, one-line errors and exit codes over the engine's functions.

``agvm-train`` (:mod:`.train`), ``agvm-eval`` (:mod:`.evaluate`), ``agvm-predict`` (:mod:`.predict`),
``agvm-export`` (:mod:`.export`), ``agvm-plot`` (:mod:`.plot`) and ``agvm-model-info`` (:mod:`.model_info`).
"""
